//! One file per task.

pub mod bpb;
pub mod hellaswag;
pub mod samples;
pub mod squad;
