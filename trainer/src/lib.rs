//! kiln-trainer: where recipes, data, models and the training loop are wired together.
//! The `kiln` binary (`main.rs`) is a thin CLI over this library.

pub mod data;
pub mod device;
pub mod dist;
pub mod export;
pub mod hub;
pub mod optim;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod optim_cube;
pub mod perf;
pub mod run;
pub mod train_step;
