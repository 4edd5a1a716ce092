//! Math benchmark and prompt-pool loading, and chat-template rendering.
//!
//! Architecture invariant: this crate knows file formats and prompt templates, nothing about
//! grading. The one rule it shares with grading, "content of the last `\boxed{}`" (for gold
//! answers stored in solutions), is em-grade's `last_boxed`, so gold answers and responses are
//! extracted alike; em-grade depends on nothing of the project, so there is no cycle.

mod load;
mod prompt;
pub mod synthetic;

pub use load::{load_pool, load_suite, parse_pool, parse_suite, ChatMessage, DataError, Problem};
pub use prompt::{
    ChatTemplate, PromptError, MAX_RENDERED_BYTES, MAX_TEMPLATE_DEPTH, MAX_TEMPLATE_MEMORY,
    MAX_TEMPLATE_STEPS, QWEN_MATH_COT_SYSTEM, STEP_BY_STEP,
};
