//! placeholder
pub mod dirty;
