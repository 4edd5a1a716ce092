//! Math benchmark and prompt-pool loading, and chat-template rendering.
//!
//! Architecture invariant: this crate knows file formats and prompt templates, nothing about
//! grading; it does not depend on em-grade (the one piece they share, "content of the last
//! `\boxed{}`" for gold answers stored in solutions, is a ten-line function here).

mod load;
mod prompt;
pub mod synthetic;

pub use load::{
    last_boxed, load_pool, load_suite, parse_pool, parse_suite, ChatMessage, DataError, Problem,
};
pub use prompt::{
    ChatTemplate, PromptError, MAX_RENDERED_BYTES, MAX_TEMPLATE_DEPTH, MAX_TEMPLATE_MEMORY,
    MAX_TEMPLATE_STEPS, QWEN_MATH_COT_SYSTEM, STEP_BY_STEP,
};
