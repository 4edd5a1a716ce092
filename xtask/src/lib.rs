//! The command line of oneshot-em: argument parsing and the wiring that picks concrete backends.
//!
//! Architecture invariant: the only crate that knows both llama.cpp (`em-llama`) and candle
//! (`em-train`, through `em-pipeline`); everything it runs lives in a library crate.

pub mod backends;
pub mod bench;
pub mod cli;
pub mod convert;
pub mod flags;
pub mod prompt;
pub mod server;
