//! The CUDA kernels run on the CPU emulator (feature `emulator`): harness self-tests with
//! deliberately broken kernels, checks of the emulated built-ins, and the real kernels compared
//! with the CPU backend and an f64 reference.
//!
//! Run with `cargo test --offline --features emulator --test emulator`.

#![cfg(feature = "emulator")]

#[path = "emulator/builtins.rs"]
mod builtins;
#[path = "emulator/cases.rs"]
mod cases;
#[path = "emulator/check.rs"]
mod check;
#[path = "emulator/harness.rs"]
mod harness;
#[path = "emulator/kernels.rs"]
mod kernels;
#[path = "emulator/reference.rs"]
mod reference;
