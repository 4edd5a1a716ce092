//! The JSON body of one `/v1/completions` call in each dialect, all but its seed.

use em_sampler::{Prompt, Request};
use serde_json::{json, Map, Value};

use crate::{Dialect, PromptFormat};

/// llama-server's sampler chain in Hugging Face's order (its own default puts temperature last).
const LLAMA_SERVER_SAMPLERS: [&str; 5] = ["penalties", "temperature", "top_k", "top_p", "min_p"];

/// The body for `request` (the caller adds `seed`), or why this server cannot take it.
pub(crate) fn build(
    dialect: Dialect,
    format: PromptFormat,
    model: &str,
    request: &Request,
) -> Result<Map<String, Value>, String> {
    let prompt = match (&request.prompt, format) {
        (Prompt::Tokens(ids) | Prompt::Rendered { tokens: ids, .. }, PromptFormat::Tokens) => {
            json!(ids)
        }
        (Prompt::Text(text) | Prompt::Rendered { text, .. }, _) => json!(text),
        (Prompt::Tokens(_), PromptFormat::Text) => {
            return Err("the prompt has token ids only, but the prompt format is text".into())
        }
    };
    let p = &request.params;
    let off_top_k = match dialect {
        Dialect::Vllm | Dialect::Sglang => -1,
        Dialect::LlamaServer | Dialect::LlamaCppPython => 0,
    };
    let mut b = Map::new();
    let mut set = |k: &str, v: Value| {
        b.insert(k.to_string(), v);
    };
    set("model", json!(model));
    set("prompt", prompt);
    set("n", json!(1));
    set("stream", json!(false));
    set("max_tokens", json!(p.max_new_tokens));
    set(
        "temperature",
        if p.is_greedy() {
            json!(0.0)
        } else {
            num(p.temperature)
        },
    );
    set("top_p", num(p.top_p));
    set(
        "top_k",
        if p.top_k == 0 {
            json!(off_top_k)
        } else {
            json!(p.top_k)
        },
    );
    set("min_p", num(p.min_p));
    set("stop", json!(p.stop));
    match dialect {
        Dialect::Vllm | Dialect::Sglang => {
            set("repetition_penalty", num(p.repetition_penalty));
            set("ignore_eos", json!(p.ignore_eos));
            set("skip_special_tokens", json!(false));
            set("return_token_ids", json!(true));
            if dialect == Dialect::Vllm {
                set("spaces_between_special_tokens", json!(false));
            }
            if p.logprobs {
                set("logprobs", json!(0));
                if dialect == Dialect::Vllm {
                    set("return_tokens_as_token_ids", json!(true));
                }
            }
        }
        Dialect::LlamaServer => {
            set("repeat_penalty", num(p.repetition_penalty));
            // The whole prompt and generation (HF's rule); llama-server refuses -1 ("whole
            // context") since 2025, so the window is given as a count: the prompt's tokens (or its
            // bytes, which are at least as many) plus the new tokens.
            let prompt_len = match &request.prompt {
                Prompt::Tokens(ids) | Prompt::Rendered { tokens: ids, .. } => ids.len(),
                Prompt::Text(text) => text.len(),
            };
            set("repeat_last_n", json!(prompt_len + p.max_new_tokens));
            set("frequency_penalty", json!(0.0));
            set("presence_penalty", json!(0.0));
            set("mirostat", json!(0));
            set("ignore_eos", json!(p.ignore_eos));
            set("samplers", json!(LLAMA_SERVER_SAMPLERS));
            if p.logprobs {
                set("n_probs", json!(1));
                set("post_sampling_probs", json!(true));
            }
        }
        Dialect::LlamaCppPython => {
            if p.ignore_eos {
                return Err(format!("ignore_eos is not supported by {}", dialect.name()));
            }
            set("repeat_penalty", num(p.repetition_penalty));
            set("frequency_penalty", json!(0.0));
            set("presence_penalty", json!(0.0));
            set("mirostat_mode", json!(0));
            if p.logprobs {
                set("logprobs", json!(0));
            }
        }
    }
    Ok(b)
}

/// `x` as the JSON number it reads as (0.95, not 0.949999988079071).
fn num(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .map_or(Value::Null, |v| json!(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use em_sampler::SamplingParams;

    fn request(prompt: Prompt, params: SamplingParams) -> Request {
        Request {
            prompt,
            n_samples: 1,
            params,
        }
    }

    fn rendered() -> Prompt {
        Prompt::Rendered {
            text: "<s>hi".into(),
            tokens: vec![1, 22, 333],
        }
    }

    fn body(dialect: Dialect, params: SamplingParams) -> Map<String, Value> {
        build(
            dialect,
            PromptFormat::Tokens,
            "m",
            &request(rendered(), params),
        )
        .unwrap()
    }

    const ALL: [Dialect; 4] = [
        Dialect::Vllm,
        Dialect::Sglang,
        Dialect::LlamaServer,
        Dialect::LlamaCppPython,
    ];

    #[test]
    fn common_fields_are_always_sent() {
        for d in ALL {
            let b = body(d, SamplingParams::reference(64, 7));
            assert_eq!(b["model"], "m", "{d:?}");
            assert_eq!(b["n"], 1);
            assert_eq!(b["stream"], false);
            assert_eq!(b["max_tokens"], 64);
            assert_eq!(b["temperature"], 0.5);
            assert_eq!(b["top_p"], 0.95);
            assert_eq!(b["min_p"], 0.0);
            assert_eq!(b["stop"], json!([]));
            assert!(!b.contains_key("seed"), "the caller adds the seed");
        }
    }

    #[test]
    fn vllm_fields() {
        let mut p = SamplingParams::reference(16, 0);
        p.logprobs = true;
        p.ignore_eos = true;
        let b = body(Dialect::Vllm, p);
        assert_eq!(b["prompt"], json!([1, 22, 333]));
        assert_eq!(b["top_k"], -1);
        assert_eq!(b["repetition_penalty"], 1.15);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["skip_special_tokens"], false);
        assert_eq!(b["spaces_between_special_tokens"], false);
        assert_eq!(b["return_token_ids"], true);
        assert_eq!(b["logprobs"], 0);
        assert_eq!(b["return_tokens_as_token_ids"], true);
        assert!(!b.contains_key("repeat_penalty"));
    }

    #[test]
    fn sglang_fields() {
        let mut p = SamplingParams::reference(16, 0);
        p.top_k = 20;
        let b = body(Dialect::Sglang, p);
        assert_eq!(b["top_k"], 20);
        assert_eq!(b["repetition_penalty"], 1.15);
        assert_eq!(b["ignore_eos"], false);
        assert_eq!(b["return_token_ids"], true);
        assert!(!b.contains_key("logprobs"));
        assert!(!b.contains_key("return_tokens_as_token_ids"));
        assert_eq!(
            body(Dialect::Sglang, SamplingParams::default())["top_k"],
            -1
        );
    }

    #[test]
    fn llama_server_fields() {
        let mut p = SamplingParams::reference(16, 0);
        p.logprobs = true;
        p.ignore_eos = true;
        let b = body(Dialect::LlamaServer, p);
        assert_eq!(b["top_k"], 0);
        assert_eq!(b["repeat_penalty"], 1.15);
        // The test prompt has 3 token ids; 16 new tokens.
        assert_eq!(b["repeat_last_n"], 3 + 16);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["samplers"], json!(LLAMA_SERVER_SAMPLERS));
        assert_eq!(b["n_probs"], 1);
        assert_eq!(b["post_sampling_probs"], true);
        assert!(!b.contains_key("repetition_penalty"));
        assert!(!b.contains_key("logprobs"));
    }

    #[test]
    fn llama_cpp_python_fields() {
        let mut p = SamplingParams::reference(16, 0);
        p.logprobs = true;
        let r = request(rendered(), p);
        let b = build(Dialect::LlamaCppPython, PromptFormat::Text, "m", &r).unwrap();
        assert_eq!(b["prompt"], "<s>hi");
        assert_eq!(b["top_k"], 0);
        assert_eq!(b["repeat_penalty"], 1.15);
        assert_eq!(b["logprobs"], 0);
        assert!(!b.contains_key("ignore_eos"));
        assert!(!b.contains_key("repeat_last_n"));
    }

    #[test]
    fn greedy_sends_temperature_zero() {
        for d in ALL {
            let mut p = SamplingParams::greedy(8);
            p.temperature = 0.7;
            let b = body(d, p);
            assert_eq!(b["temperature"], 0.0, "{d:?}");
            assert_eq!(b["stop"], json!(em_sampler::EVAL_STOP));
        }
    }

    #[test]
    fn ignore_eos_on_llama_cpp_python_is_refused() {
        let p = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let r = request(Prompt::Text("x".into()), p);
        let e = build(Dialect::LlamaCppPython, PromptFormat::Text, "m", &r).unwrap_err();
        assert!(
            e.contains("ignore_eos") && e.contains("llama-cpp-python"),
            "{e}"
        );
    }

    #[test]
    fn prompt_forms() {
        let p = SamplingParams::default;
        let tokens_only = request(Prompt::Tokens(vec![5, 6]), p());
        let text_only = request(Prompt::Text("t".into()), p());
        let both = request(rendered(), p());
        let send = |r: &Request, f| build(Dialect::Vllm, f, "m", r).map(|b| b["prompt"].clone());
        assert_eq!(send(&tokens_only, PromptFormat::Tokens), Ok(json!([5, 6])));
        assert_eq!(send(&text_only, PromptFormat::Tokens), Ok(json!("t")));
        assert_eq!(send(&both, PromptFormat::Tokens), Ok(json!([1, 22, 333])));
        assert_eq!(send(&both, PromptFormat::Text), Ok(json!("<s>hi")));
        assert_eq!(send(&text_only, PromptFormat::Text), Ok(json!("t")));
        let e = send(&tokens_only, PromptFormat::Text).unwrap_err();
        assert!(e.contains("token ids only"), "{e}");
    }

    #[test]
    fn numbers_read_as_written() {
        assert_eq!(num(0.95).to_string(), "0.95");
        assert_eq!(num(1.15).to_string(), "1.15");
        assert_eq!(num(1.0).to_string(), "1.0");
    }
}
