//! `cargo xtask grade`: grade model outputs (ours, or those of vLLM, lm-eval, …) from a JSONL file.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

/// Arguments of `cargo xtask grade`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GradeOptions {
    /// JSONL input: each line has `response` (model output) and `answer` (gold: string or list).
    pub input: PathBuf,
    /// JSONL output of `{"pred", "correct"}` per input line, in order (default: standard output).
    pub output: Option<PathBuf>,
}

/// Gold answers of one line: a string, a number, or a list of them.
fn golds(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Number(n) => Some(vec![match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        }]),
        Value::Array(a) => {
            let mut out = Vec::new();
            for x in a {
                match x {
                    Value::Array(_) => return None,
                    x => out.extend(golds(x)?),
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// Grade every line of `args.input`; print the summary `{"n", "correct", "accuracy"}` last.
pub fn run(args: &GradeOptions) -> Result<()> {
    let input = &args.input;
    let file =
        std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let mut lines_out = Vec::new();
    let (mut n, mut correct) = (0usize, 0usize);
    for (k, line) in BufReader::new(file).lines().enumerate() {
        let at = || format!("{}:{}", input.display(), k + 1);
        let line = line.with_context(|| format!("{}: cannot read", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
        let Some(response) = v.get("response").and_then(Value::as_str) else {
            bail!("{}: no string field `response`", at());
        };
        let Some(gold) = v.get("answer").and_then(golds) else {
            bail!(
                "{}: `answer` must be a string, a number or a list of them",
                at()
            );
        };
        let verdict = em_grade::grade(response, &gold);
        n += 1;
        correct += usize::from(verdict.correct);
        lines_out.push(json!({ "pred": verdict.pred, "correct": verdict.correct }).to_string());
    }
    match &args.output {
        Some(path) => {
            let text: String = lines_out.iter().map(|l| format!("{l}\n")).collect();
            em_store::write_atomic(path, text)?
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = BufWriter::new(stdout.lock());
            for l in &lines_out {
                writeln!(w, "{l}")?;
            }
            w.flush()?;
        }
    }
    let accuracy = if n == 0 {
        0.0
    } else {
        correct as f64 / n as f64
    };
    println!(
        "{}",
        json!({ "n": n, "correct": correct, "accuracy": accuracy, "ci95": em_grade::wilson_interval(correct, n) })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(
            &input,
            concat!(
                r#"{"response": "so \\boxed{\\frac12}", "answer": "0.5"}"#,
                "\n",
                r#"{"response": "The answer is 3", "answer": ["4", "5"]}"#,
                "\n",
                r#"{"response": "nothing", "answer": 7}"#,
                "\n"
            ),
        )
        .unwrap();
        let output = dir.path().join("out.jsonl");
        run(&GradeOptions {
            input: input.clone(),
            output: Some(output.clone()),
        })
        .unwrap();
        let out = std::fs::read_to_string(&output).unwrap();
        let rows: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], json!({"pred": "\\frac12", "correct": true}));
        assert_eq!(rows[1], json!({"pred": "3", "correct": false}));
        assert_eq!(rows[2], json!({"pred": null, "correct": false}));
        std::fs::write(&input, "{\"response\": \"x\"}\n").unwrap();
        let e = format!(
            "{:#}",
            run(&GradeOptions {
                input: input.clone(),
                output: None
            })
            .unwrap_err()
        );
        assert!(e.contains("in.jsonl:1") && e.contains("answer"), "{e}");
    }
}
