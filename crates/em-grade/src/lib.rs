//! Answer extraction and math answer equivalence for grading model outputs.
//!
//! The grader knows nothing about where text came from: [`grade`] takes a response and gold
//! answers. Extraction follows the Qwen2.5-Math toolkit's order; equivalence is decided by a small
//! LaTeX parser and a complex-number evaluator (exact forms compared at 1e-9, decimal golds at a
//! relative 1e-4, free variables at random points), bounded in input length, nesting depth and
//! evaluation steps so that no input can hang or panic it.

mod agree;
mod equiv;
mod expr;
mod extract;
mod normalize;
mod stats;

pub use agree::plurality;
pub use equiv::is_equivalent;
pub use extract::{extract_answer, last_boxed, states_final_answer};
pub use stats::{
    mcnemar_exact_p, mean_interval, paired_difference, spearman, spearman_interval,
    wilson_interval, wilson_interval_p,
};

use serde::{Deserialize, Serialize};

/// The verdict on one response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The extracted answer, if any.
    pub pred: Option<String>,
    /// Whether it is equivalent to one of the gold answers.
    pub correct: bool,
}

/// Extract the answer of `response` and check it against any of `golds`.
pub fn grade(response: &str, golds: &[String]) -> Verdict {
    let pred = extract_answer(response);
    let correct = pred
        .as_deref()
        .is_some_and(|p| golds.iter().any(|g| is_equivalent(p, g)));
    Verdict { pred, correct }
}
