//! The source's RAM saver (placeholder).
