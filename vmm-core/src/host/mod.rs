//! The host side of the VMM process, with no VM in it: what the host can give a VM
//! ([`limits`]), the terminal a console on stdio puts in raw mode ([`terminal`]), the
//! signals that end the VMM in order ([`signals`]) and the log ([`logger`]).

pub mod limits;
pub mod logger;
pub mod signals;
pub mod terminal;
