//! The command line of oneshot-em and the weight conversion between safetensors and GGUF.
//!
//! This is the only crate that knows both llama.cpp (through `em-sample`) and candle (through
//! `em-train`); everything else is reusable alone.

pub mod bench;
pub mod cli;
pub mod convert;
pub mod fetch;
pub mod fixture;
pub mod grade;
