//! The README's malformed-input table, measured: each hostile input is fed to the command that
//! reads it, which must fail with one line naming the file (or endpoint) and what is wrong; the
//! table in README.md (between its `malformed-inputs` markers) must be exactly these lines, the
//! temporary directory written `DIR`. `EM_UPDATE_README=1` rewrites the table from a run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> PathBuf {
    root().join("fixtures/tiny-qwen2")
}

fn xtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("EM_NO_PROGRESS", "1")
        .output()
        .expect("run xtask")
}

/// A GGUF header written by hand: (key, value type, value bytes) entries and no tensors.
fn gguf_with(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((entries.len() as u64).to_le_bytes());
    for (key, ty, value) in entries {
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b
}

fn fixture_copy(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    fs::create_dir_all(&dir).unwrap();
    for e in fs::read_dir(fixture()).unwrap().flatten() {
        fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, v.to_string()).unwrap();
}

/// One row: what the input is, and the command line reading it.
struct Case {
    input: &'static str,
    args: Vec<String>,
}

fn cases(tmp: &Path) -> Vec<Case> {
    let t = |p: &str| tmp.join(p).to_string_lossy().into_owned();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut cases = vec![];
    let mut convert = |input: &'static str, path: String| {
        cases.push(Case {
            input,
            args: vec!["convert".into(), path, "-o".into(), t("out")],
        })
    };

    let good = tmp.join("good.gguf");
    let made = xtask(&[
        "convert",
        fixture().to_str().unwrap(),
        "-o",
        good.to_str().unwrap(),
        "--outtype",
        "f32",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let bytes = fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| fs::write(tmp.join(name), b).unwrap();

    write("not-gguf.gguf", b"PK\x03\x04 a zip file, not a model");
    convert("GGUF: wrong magic", t("not-gguf.gguf"));
    write("truncated.gguf", &bytes[..bytes.len() / 2]);
    convert("GGUF: truncated in the tensor data", t("truncated.gguf"));
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&1_000_000_000_000u64.to_le_bytes());
    write("many-tensors.gguf", &b);
    convert("GGUF: header claims 10^12 tensors", t("many-tensors.gguf"));
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&(1u64 << 29).to_le_bytes());
    write("long-key.gguf", &b);
    convert("GGUF: a key's length runs past the end", t("long-key.gguf"));
    write(
        "big-array.gguf",
        &gguf_with(&[(
            "tokenizer.ggml.tokens",
            9,
            [8u32.to_le_bytes().as_slice(), &u64::MAX.to_le_bytes()].concat(),
        )]),
    );
    convert("GGUF: an array of 2^64 − 1 strings", t("big-array.gguf"));
    write(
        "alignment.gguf",
        &gguf_with(&[("general.alignment", 4, 0u32.to_le_bytes().to_vec())]),
    );
    convert("GGUF: general.alignment 0", t("alignment.gguf"));
    write(
        "no-arch.gguf",
        &gguf_with(&[(
            "general.name",
            8,
            [4u64.to_le_bytes().to_vec(), b"test".to_vec()].concat(),
        )]),
    );
    convert("GGUF: no architecture key", t("no-arch.gguf"));

    let d = fixture_copy(tmp, "st-header");
    let st = d.join("model.safetensors");
    let mut b = fs::read(&st).unwrap();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&st, &b).unwrap();
    convert(
        "safetensors: header length 2^40",
        d.to_string_lossy().into_owned(),
    );
    let d = fixture_copy(tmp, "st-truncated");
    let st = d.join("model.safetensors");
    let b = fs::read(&st).unwrap();
    fs::write(&st, &b[..b.len() - 100]).unwrap();
    convert("safetensors: truncated", d.to_string_lossy().into_owned());
    let d = fixture_copy(tmp, "cfg-json");
    fs::write(
        d.join("config.json"),
        "{\"model_type\": \"qwen2\",\n  \"hidden_size\": 64,,}",
    )
    .unwrap();
    convert(
        "config.json: malformed JSON",
        d.to_string_lossy().into_owned(),
    );
    let d = fixture_copy(tmp, "cfg-arch");
    edit_json(&d.join("config.json"), |v| v["model_type"] = "mamba".into());
    convert(
        "config.json: unknown architecture",
        d.to_string_lossy().into_owned(),
    );
    let d = fixture_copy(tmp, "cfg-key");
    edit_json(&d.join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("num_attention_heads");
    });
    convert(
        "config.json: a required key missing",
        d.to_string_lossy().into_owned(),
    );
    let d = fixture_copy(tmp, "cfg-shape");
    edit_json(&d.join("config.json"), |v| v["hidden_size"] = 96.into());
    convert(
        "config.json: shapes that the weights do not have",
        d.to_string_lossy().into_owned(),
    );
    let d = fixture_copy(tmp, "no-tokenizer");
    fs::remove_file(d.join("tokenizer.json")).unwrap();
    convert("tokenizer.json missing", d.to_string_lossy().into_owned());

    fs::write(
        tmp.join("suite.jsonl"),
        "{\"id\": \"a\", \"problem\": \"1+1?\", \"answer\": \"2\"}\n{\"id\": \"b\", \"problem\": \n",
    )
    .unwrap();
    fs::write(
        tmp.join("ok.jsonl"),
        "{\"id\": \"a\", \"problem\": \"1+1?\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    let eval = |suite: String| {
        let mut v = s(&["eval", "--model"]);
        v.push(fixture().to_string_lossy().into_owned());
        v.extend(s(&["--quant", "f32", "--suites"]));
        v.push(suite);
        v.extend(s(&["--out"]));
        v.push(t("eval-out"));
        v
    };
    cases.push(Case {
        input: "suite JSONL: a malformed line",
        args: eval(t("suite.jsonl")),
    });
    fs::write(
        tmp.join("no-answer.jsonl"),
        "{\"id\": \"a\", \"problem\": \"1+1?\"}\n",
    )
    .unwrap();
    cases.push(Case {
        input: "suite JSONL: a record without an answer",
        args: eval(t("no-answer.jsonl")),
    });
    cases.push(Case {
        input: "suite file missing",
        args: eval(t("missing.jsonl")),
    });
    let mut v = s(&["eval", "--model"]);
    v.push(t("many-tensors.gguf"));
    v.extend(s(&["--suites"]));
    v.push(t("ok.jsonl"));
    v.extend(s(&["--out"]));
    v.push(t("eval-gguf-out"));
    cases.push(Case {
        input: "GGUF given to llama.cpp (`eval --model`): header claims 10^12 tensors",
        args: v,
    });
    let mut v = s(&["screen", "--model"]);
    v.push(fixture().to_string_lossy().into_owned());
    v.extend(s(&["--quant", "f32", "--pool"]));
    v.push(t("suite.jsonl"));
    v.extend(s(&["--out"]));
    v.push(t("screen-out"));
    cases.push(Case {
        input: "pool JSONL: a malformed line",
        args: v,
    });
    let mut v = s(&["screen", "--model"]);
    v.push(fixture().to_string_lossy().into_owned());
    v.extend(s(&["--quant", "f32", "--pool"]));
    v.push(t("missing-pool.jsonl"));
    v.extend(s(&["--out"]));
    v.push(t("screen-out-2"));
    cases.push(Case {
        input: "pool missing (neither a file nor a bundled name)",
        args: v,
    });
    for (input, name, template) in [
        (
            "chat template: a value that doubles 40 times",
            "template-grows",
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        ),
        (
            "chat template: a loop that does not end",
            "template-loops",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ),
    ] {
        let dir = fixture_copy(tmp, name);
        edit_json(&dir.join("tokenizer_config.json"), |v| {
            v["chat_template"] = template.into()
        });
        let mut v = s(&["prompt", "--style", "chat", "--model"]);
        v.push(dir.to_string_lossy().into_owned());
        v.extend(s(&["--suite"]));
        v.push(t("ok.jsonl"));
        cases.push(Case { input, args: v });
    }
    let mut v = s(&[
        "eval",
        "--backend",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--served-model",
        "tiny",
        "--model",
    ]);
    v.push(fixture().to_string_lossy().into_owned());
    v.extend(s(&["--suites"]));
    v.push(t("ok.jsonl"));
    v.extend(s(&["--out"]));
    v.push(t("openai-out"));
    cases.push(Case {
        input: "OpenAI-compatible server unreachable",
        args: v,
    });
    cases
}

const START: &str = "<!-- malformed-inputs:start -->";
const END: &str = "<!-- malformed-inputs:end -->";

#[test]
fn every_malformed_input_is_one_line_naming_it_as_the_readme_says() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_string_lossy().into_owned();
    let mut table = String::from("| input | the error the user sees |\n|---|---|\n");
    for case in cases(tmp.path()) {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let out = xtask(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!out.status.success(), "{}: {args:?} succeeded", case.input);
        assert_eq!(lines.len(), 1, "{}: not one line: {stderr}", case.input);
        let line = lines[0].replace(&dir, "DIR");
        assert!(
            line.contains("DIR/") || line.contains("http://127.0.0.1:9"),
            "{}: the error names no file or endpoint: {line}",
            case.input
        );
        // A code span holding backticks needs double ones.
        let code = if line.contains('`') {
            format!("`` {line} ``")
        } else {
            format!("`{line}`")
        };
        table += &format!("| {} | {} |\n", case.input, code.replace('|', "\\|"));
    }
    let readme_path = root().join("README.md");
    let readme = fs::read_to_string(&readme_path).unwrap();
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        panic!("README.md has no {START} … {END} section");
    };
    let current = &readme[a + START.len()..b];
    let wanted = format!("\n{table}");
    if std::env::var_os("EM_UPDATE_README").is_some() {
        let updated = format!("{}{START}{wanted}{}", &readme[..a], &readme[b..]);
        fs::write(&readme_path, updated).unwrap();
    } else {
        assert_eq!(
            current, wanted,
            "README.md's malformed-input table is not what the commands print (EM_UPDATE_README=1 rewrites it)"
        );
    }
}
