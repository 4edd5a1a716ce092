//! Templates that grow a value without bound stop with one line, under the allocator the binaries
//! install; real templates render as before.

use em_data::{ChatMessage, ChatTemplate, PromptError};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A hang guard, not a speed target: each of these stops within a second or so.
const HANG: Duration = Duration::from_secs(300);

#[global_allocator]
static ALLOC: em_alloc::BudgetAlloc = em_alloc::BudgetAlloc;

fn render(template: &str, content: &str) -> Result<String, PromptError> {
    ChatTemplate {
        template: template.into(),
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
    }
    .render(&[ChatMessage {
        role: "user".into(),
        content: content.into(),
    }])
}

#[test]
fn templates_that_grow_a_value_without_bound_stop_with_one_line() {
    assert!(em_alloc::enforced());
    let hostile = [
        // Found by the chat_template fuzz target: 40 doublings within the step budget.
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        // The same by recursion, a few levels deep.
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x' * 100000, 20) }}",
        // Straight-line amplification: each step multiplies by 100000.
        "{% set a = range(100000)|join('xyz') %}{% set b = range(100000)|join(a) %}{{ b|length }}",
        // Repetition within minijinja's own limit, then doubled.
        "{% set a = 'x' * 100000000 %}{% set b = a ~ a %}{{ b|length }}",
        "{{ ' '|indent(10000000000) }}",
    ];
    for template in hostile {
        let start = Instant::now();
        // On a thread, so that a render that never stops fails instead of stalling the run.
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(render(template, "What is 1+1?"));
        });
        let e = match finished.recv_timeout(HANG) {
            Ok(out) => out.unwrap_err(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{template}: still rendering after {HANG:?}")
            }
            Err(e) => panic!("{template}: the render thread ended without a result: {e}"),
        };
        eprintln!("stopped in {:.2?}: {template}", start.elapsed());
        assert!(
            matches!(e, PromptError::TooMuchMemory { .. }),
            "{template}: {e}"
        );
        let e = e.to_string();
        assert!(!e.contains('\n') && e.contains("more than 64 MiB"), "{e}");
    }
}

#[test]
fn real_templates_and_long_prompts_render_under_the_budget() {
    let qwen = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
    assert_eq!(
        render(qwen, "What is 1+1?").unwrap(),
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    );
    // A 3 MiB problem: below the output limit, and its copies well below the memory budget.
    let long = "7".repeat(3 << 20);
    assert_eq!(render(qwen, &long).unwrap().len(), long.len() + 50);
}
