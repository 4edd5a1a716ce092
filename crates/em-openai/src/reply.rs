//! Reading one `/v1/completions` answer, whichever server wrote it.

use em_sampler::FinishReason;
use serde::Deserialize;
use serde_json::Value;

/// One completion as the sampler needs it.
#[derive(Debug, PartialEq)]
pub(crate) struct Reply {
    pub text: String,
    /// The generated ids, where the server returned them.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// One per token the server reports, when log-probs were asked for.
    pub logprobs: Option<Vec<f32>>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Prompt tokens the server took from its cache, where it says.
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    /// llama-server's.
    #[serde(default)]
    timings: Option<Timings>,
}

#[derive(Deserialize)]
struct Choice {
    text: String,
    #[serde(default)]
    finish_reason: Option<String>,
    /// vLLM's: the stop string (or stop token id) that ended the text.
    #[serde(default)]
    stop_reason: Option<Value>,
    /// SGLang's `stop_reason`.
    #[serde(default)]
    matched_stop: Option<Value>,
    /// vLLM's and SGLang's, with `return_token_ids`.
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: Option<u64>,
}

/// Reads `body`, or says in one line what is wrong with it.
pub(crate) fn parse(
    body: &str,
    served_model: &str,
    stops: &[String],
    want_logprobs: bool,
) -> Result<Reply, String> {
    let c: Completion = serde_json::from_str(body)
        .map_err(|e| format!("malformed response ({e}): {}", crate::http::snippet(body)))?;
    if let Some(model) = c.model.as_deref().filter(|m| *m != served_model) {
        return Err(format!(
            "the response is from model `{model}`, not `{served_model}`"
        ));
    }
    let n = c.choices.len();
    let Some(choice) = c.choices.into_iter().next().filter(|_| n == 1) else {
        return Err(format!("malformed response: {n} choices, not 1"));
    };
    let finish = match choice.finish_reason.as_deref() {
        Some("length") => FinishReason::Length,
        Some("stop") => match choice.stop_reason.or(choice.matched_stop) {
            Some(Value::String(s)) if stops.contains(&s) => FinishReason::Stop(s),
            _ => FinishReason::Eos,
        },
        other => {
            return Err(format!(
                "the generation ended with finish_reason {}",
                other.map_or("null".to_string(), |r| format!("`{r}`"))
            ))
        }
    };
    let lp = choice.logprobs.filter(|v| !v.is_null());
    let logprobs = match (&lp, want_logprobs) {
        (Some(v), true) => Some(logprobs(v)?),
        (None, true) => return Err("the response has no logprobs".into()),
        (_, false) => None,
    };
    let tokens = choice
        .token_ids
        .or_else(|| lp.as_ref().and_then(ids_in_logprobs))
        .unwrap_or_default();
    let usage = c.usage;
    Ok(Reply {
        text: choice.text,
        tokens,
        finish,
        logprobs,
        prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens),
        completion_tokens: usage.as_ref().and_then(|u| u.completion_tokens),
        cached_tokens: usage
            .and_then(|u| u.prompt_tokens_details)
            .and_then(|d| d.cached_tokens)
            .or(c.timings.and_then(|t| t.cache_n))
            .unwrap_or(0),
    })
}

/// The sampled tokens' log-probs: OpenAI's legacy `token_logprobs`, or llama-server's `content`
/// (`logprob`, or `prob` with `post_sampling_probs`).
fn logprobs(v: &Value) -> Result<Vec<f32>, String> {
    let bad = |what: &str| Err(format!("malformed logprobs: {what}"));
    if let Some(list) = v.get("token_logprobs").and_then(Value::as_array) {
        return list
            .iter()
            .enumerate()
            .map(|(i, x)| match x.as_f64() {
                Some(x) => Ok(x as f32),
                None => Err(format!("malformed logprobs: token {i} has {x}")),
            })
            .collect();
    }
    let Some(content) = v.get("content").and_then(Value::as_array) else {
        return bad("neither token_logprobs nor content");
    };
    content
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if let Some(x) = t.get("logprob").and_then(Value::as_f64) {
                Ok(x as f32)
            } else if let Some(p) = t.get("prob").and_then(Value::as_f64) {
                Ok((p as f32).ln())
            } else {
                Err(format!(
                    "malformed logprobs: token {i} has neither logprob nor prob"
                ))
            }
        })
        .collect()
}

/// Token ids inside log-probs: llama-server's `content[].id`, vLLM's `token_id:N` tokens.
fn ids_in_logprobs(v: &Value) -> Option<Vec<u32>> {
    let id = |x: &Value| x.as_u64().and_then(|i| u32::try_from(i).ok());
    if let Some(content) = v.get("content").and_then(Value::as_array) {
        return content.iter().map(|t| t.get("id").and_then(id)).collect();
    }
    v.get("tokens")?
        .as_array()?
        .iter()
        .map(|t| t.as_str()?.strip_prefix("token_id:")?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stops() -> Vec<String> {
        vec!["</s>".into(), "\n\n".into()]
    }

    fn choice(extra: Value) -> String {
        let mut c = json!({"index": 0, "text": "hello", "finish_reason": "stop"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({
            "model": "m",
            "choices": [c],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        })
        .to_string()
    }

    #[test]
    fn vllm_reply() {
        let body = choice(json!({
            "stop_reason": "</s>",
            "token_ids": [7, 8, 9],
            "logprobs": {"tokens": ["token_id:7", "token_id:8", "token_id:9"],
                         "token_logprobs": [-0.5, -1.0, -0.25], "top_logprobs": null, "text_offset": []},
        }));
        let r = parse(&body, "m", &stops(), true).unwrap();
        assert_eq!(r.text, "hello");
        assert_eq!(r.tokens, [7, 8, 9]);
        assert_eq!(r.finish, FinishReason::Stop("</s>".into()));
        assert_eq!(r.logprobs, Some(vec![-0.5, -1.0, -0.25]));
        assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(5), Some(3)));
    }

    #[test]
    fn vllm_ids_from_logprob_tokens_when_no_token_ids() {
        let body = choice(json!({
            "logprobs": {"tokens": ["token_id:4", "token_id:2"], "token_logprobs": [-0.1, -0.2]},
        }));
        let r = parse(&body, "m", &stops(), false).unwrap();
        assert_eq!(r.tokens, [4, 2]);
        assert_eq!(r.logprobs, None);
    }

    #[test]
    fn stop_reasons() {
        let finish = |extra| parse(&choice(extra), "m", &stops(), false).unwrap().finish;
        assert_eq!(finish(json!({"stop_reason": null})), FinishReason::Eos);
        assert_eq!(finish(json!({"stop_reason": 151645})), FinishReason::Eos);
        assert_eq!(finish(json!({"stop_reason": "other"})), FinishReason::Eos);
        assert_eq!(
            finish(json!({"matched_stop": "\n\n"})),
            FinishReason::Stop("\n\n".into())
        );
        assert_eq!(
            finish(json!({"finish_reason": "length"})),
            FinishReason::Length
        );
        let e = parse(
            &choice(json!({"finish_reason": "abort"})),
            "m",
            &stops(),
            false,
        );
        assert!(e.unwrap_err().contains("`abort`"));
        let e = parse(
            &choice(json!({"finish_reason": null})),
            "m",
            &stops(),
            false,
        );
        assert!(e.unwrap_err().contains("null"));
    }

    #[test]
    fn llama_server_reply() {
        let body = choice(json!({
            "logprobs": {"content": [
                {"id": 3, "token": "a", "bytes": [97], "prob": 1.0, "top_probs": []},
                {"id": 4, "token": "b", "bytes": [98], "prob": 0.5, "top_probs": []},
            ]},
        }));
        let r = parse(&body, "m", &stops(), true).unwrap();
        assert_eq!(r.tokens, [3, 4]);
        assert_eq!(r.finish, FinishReason::Eos);
        assert_eq!(r.logprobs, Some(vec![0.0, 0.5f32.ln()]));
        let raw = choice(json!({"logprobs": {"content": [{"id": 3, "logprob": -2.0}]}}));
        assert_eq!(
            parse(&raw, "m", &stops(), true).unwrap().logprobs,
            Some(vec![-2.0])
        );
    }

    #[test]
    fn text_tokens_give_no_ids() {
        let body = choice(json!({
            "logprobs": {"tokens": ["he", "llo"], "token_logprobs": [-0.1, -0.2]},
        }));
        let r = parse(&body, "m", &stops(), true).unwrap();
        assert!(r.tokens.is_empty());
        assert_eq!(r.logprobs, Some(vec![-0.1, -0.2]));
    }

    #[test]
    fn cached_prompt_tokens() {
        let body = json!({
            "choices": [{"text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1,
                      "prompt_tokens_details": {"cached_tokens": 6}},
        });
        let r = parse(&body.to_string(), "m", &[], false).unwrap();
        assert_eq!(r.cached_tokens, 6);
        let body = json!({
            "choices": [{"text": "", "finish_reason": "length"}],
            "timings": {"cache_n": 4},
        });
        assert_eq!(
            parse(&body.to_string(), "m", &[], false)
                .unwrap()
                .cached_tokens,
            4
        );
    }

    #[test]
    fn defects_are_one_line() {
        let cases = [
            ("{\"choices\": [", "malformed response"),
            ("{\"model\": \"m\", \"choices\": []}", "0 choices"),
            ("{\"object\": \"x\"}", "malformed response"),
            (&choice(json!({"logprobs": null})), "no logprobs"),
            (
                &choice(json!({"logprobs": {"token_logprobs": [null]}})),
                "token 0",
            ),
        ];
        for (body, what) in cases {
            let e = parse(body, "m", &[], true).unwrap_err();
            assert!(e.contains(what) && !e.contains('\n'), "{e}");
        }
        let e = parse(
            &choice(json!({})).replace("\"m\"", "\"x\""),
            "m",
            &[],
            false,
        );
        assert_eq!(e.unwrap_err(), "the response is from model `x`, not `m`");
    }
}
