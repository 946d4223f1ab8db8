pub mod harness;
pub mod probe;
