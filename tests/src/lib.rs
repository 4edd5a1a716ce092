//! Helpers shared by the end-to-end tests in `tests/tests/`.

use std::path::PathBuf;

pub use em_testkit::repo_root;

/// The committed tiny qwen2 fixture.
pub fn tiny_qwen2() -> PathBuf {
    repo_root().join("fixtures/tiny-qwen2")
}

/// A fetched asset, or None when it is absent (the test skips locally, fails under
/// `EM_REQUIRE_ASSETS`): see `em_testkit`.
pub use em_testkit::fetched as asset;

/// Index of the largest value.
pub fn argmax(xs: &[f32]) -> usize {
    xs.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// Text with math, unicode and odd whitespace, for tokenizer comparisons.
pub const TOKENIZER_PROBES: &[&str] = &[
    "What is 12 + 30? Let's think step by step.",
    "The final answer is $\\boxed{\\frac{3}{4}}$.",
    "x^2 + y^2 = r^2, \\sqrt[3]{27} = 3, 1234567 * 3.14159",
    "naïve café, größer, 日本語のテキスト, emoji 🙂👍",
    "  leading spaces\n\n\ttabs and\r\nCRLF   trailing   ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't, I'm, they'll, we've, you'd, IT'S",
    "",
];
