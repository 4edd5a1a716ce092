//! Every bad input to `convert` exits non-zero with one line naming the file and the problem, and
//! leaves no output behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen2")
}

fn xtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

/// Runs `convert input -o output`, expecting failure with one stderr line that mentions `names`.
fn expect_failure(input: &Path, output: &Path, extra: &[&str], names: &[&str]) {
    let mut args = vec![
        "convert",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = xtask(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{:?}", lines[0]);
    for name in names {
        assert!(
            lines[0].contains(name),
            "{:?} does not mention {name:?}",
            lines[0]
        );
    }
    assert!(!output.exists(), "{} left behind", output.display());
    let parent = output.parent().unwrap();
    let leftovers: Vec<_> = fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A writable copy of the fixture directory.
fn fixture_copy(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(fixture()).unwrap().flatten() {
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    config[key] = value;
    fs::write(path, config.to_string()).unwrap();
}

#[test]
fn bad_hf_directories_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.gguf");

    let d = fixture_copy(tmp.path(), "truncated-st");
    let st = d.join("model.safetensors");
    let len = fs::metadata(&st).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_failure(&d, &out, &[], &["model.safetensors"]);

    let d = fixture_copy(tmp.path(), "corrupt-st");
    fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    expect_failure(
        &d,
        &out,
        &[],
        &["model.safetensors", "not a valid safetensors"],
    );

    let d = fixture_copy(tmp.path(), "shape");
    edit_config(&d, "intermediate_size", serde_json::json!(384));
    expect_failure(&d, &out, &[], &["model.safetensors", "shape"]);

    let d = fixture_copy(tmp.path(), "arch");
    edit_config(&d, "model_type", serde_json::json!("mamba"));
    expect_failure(
        &d,
        &out,
        &[],
        &["config.json", "unsupported architecture", "mamba"],
    );

    let d = fixture_copy(tmp.path(), "no-tokenizer");
    fs::remove_file(d.join("tokenizer.json")).unwrap();
    expect_failure(&d, &out, &[], &["tokenizer.json", "missing"]);

    let d = fixture_copy(tmp.path(), "no-config");
    fs::remove_file(d.join("config.json")).unwrap();
    expect_failure(&d, &out, &[], &["config.json", "missing"]);

    let d = fixture_copy(tmp.path(), "bad-json");
    fs::write(
        d.join("config.json"),
        "{\"model_type\": \"qwen2\",\n \"hidden_size\": }",
    )
    .unwrap();
    expect_failure(&d, &out, &[], &["config.json", "malformed JSON", "line 2"]);

    expect_failure(
        &tmp.path().join("nowhere"),
        &out,
        &[],
        &["nowhere", "no such file"],
    );
}

#[test]
fn bad_gguf_files_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    let out = xtask(&[
        "convert",
        fixture().to_str().unwrap(),
        "-o",
        good.to_str().unwrap(),
        "--outtype",
        "q8_0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = fs::read(&good).unwrap();
    let hf_out = tmp.path().join("hf");

    let truncated = tmp.path().join("truncated.gguf");
    fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    expect_failure(&truncated, &hf_out, &[], &["truncated.gguf", "truncated"]);

    let header_only = tmp.path().join("header.gguf");
    fs::write(&header_only, &bytes[..100]).unwrap();
    expect_failure(&header_only, &hf_out, &[], &["header.gguf"]);

    let corrupt = tmp.path().join("corrupt.gguf");
    let mut garbage = bytes.clone();
    garbage[..4].copy_from_slice(b"NOPE");
    fs::write(&corrupt, &garbage).unwrap();
    expect_failure(&corrupt, &hf_out, &[], &["corrupt.gguf", "not a GGUF file"]);

    // The output already exists: refuse rather than overwrite.
    let exists = tmp.path().join("exists");
    fs::create_dir(&exists).unwrap();
    let out = xtask(&[
        "convert",
        good.to_str().unwrap(),
        "-o",
        exists.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}
