//! One file per task.

pub mod bpb;
pub mod hellaswag;
pub mod squad;
