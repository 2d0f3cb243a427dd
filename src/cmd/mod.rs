//! The commands, one file each: what `pixel <command>` does once its flags are parsed. A command
//! opens what it needs through `session` or `run`, calls into the core and prints; nothing below
//! imports from here, and no logic the core needs lives here.

pub mod bench;
pub mod check;
pub mod eval;
pub mod export;
pub mod figures;
pub mod run;
pub mod sample;
pub mod sweep;
