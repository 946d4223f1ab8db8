//! x86_64 specifics.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
