//! The command line of oneshot-em and the weight conversion between safetensors and GGUF.
//!
//! This is the only crate that knows both llama.cpp (through `em-sample`) and candle (through
//! `em-train`); everything else is reusable alone.

pub mod analyze;
pub mod bench;
pub mod bench_sample;
pub mod bench_train;
pub mod cli;
pub mod convert;
pub mod demo;
pub mod em_loss;
pub mod eval;
pub mod fetch;
pub mod fixture;
pub mod fsutil;
pub mod grade;
pub mod organism;
pub mod screen;
pub mod train;
