//! `manifest.json`: what an output directory holds, checked before anything is resumed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{write_atomic, Identity, StoreError};

/// What produced an output: the model, the input files and every setting that changes results.
/// Two runs may share a directory only when all three are equal; `info` is recorded, not compared.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Manifest {
    /// `screen`, `eval`, `train`.
    pub kind: String,
    /// The model the results come from.
    pub model: Identity,
    /// Input files by role (`pool`, `prompt`, `suite:math500`).
    pub inputs: BTreeMap<String, Identity>,
    /// Every setting that changes the results.
    pub settings: Value,
    /// Recorded for readers, not compared (tool version, backend, rendered prompts).
    #[serde(default)]
    pub info: Value,
}

impl Manifest {
    /// A manifest with no inputs and no info.
    pub fn new(kind: &str, model: Identity, settings: Value) -> Self {
        Self {
            kind: kind.into(),
            model,
            inputs: BTreeMap::new(),
            settings,
            info: Value::Null,
        }
    }

    /// What differs between the run recorded (`self`) and the one asked for (`now`), one phrase each.
    pub fn differences(&self, now: &Manifest) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind != now.kind {
            out.push(format!("it holds a {} output, not {}", self.kind, now.kind));
        }
        if self.model != now.model {
            out.push(format!("model: {} there, {} now", self.model, now.model));
        }
        let roles: std::collections::BTreeSet<&String> =
            self.inputs.keys().chain(now.inputs.keys()).collect();
        for role in roles {
            match (self.inputs.get(role), now.inputs.get(role)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => out.push(format!("{role}: {a} there, {b} now")),
                (Some(a), None) => out.push(format!("{role}: {a} there, none now")),
                (None, Some(b)) => out.push(format!("{role}: none there, {b} now")),
                (None, None) => {}
            }
        }
        diff_values("settings", &self.settings, &now.settings, &mut out);
        out
    }

    /// Records `value` under `info[key]` in the manifest that `dir` holds (a claimed output): what
    /// is only known once the run has started, such as a suite's first rendered prompt.
    pub fn note(dir: &Path, key: &str, value: Value) -> Result<(), StoreError> {
        let path = dir.join("manifest.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| StoreError::io(&path, "cannot read", e))?;
        let mut manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                line: e.line(),
                message: format!("not a manifest ({e})"),
            })?;
        if !manifest.info.is_object() {
            manifest.info = Value::Object(Default::default());
        }
        manifest.info[key] = value;
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| StoreError::io(&path, "cannot serialise", e))?;
        write_atomic(&path, text + "\n")
    }

    /// Claims `dir` for this run: writes `dir/manifest.json`, or checks the one there and refuses a
    /// directory that holds another run (or files without a manifest). `fresh` empties it first.
    pub fn claim(&self, dir: &Path, fresh: bool) -> Result<(), StoreError> {
        let path = dir.join("manifest.json");
        if fresh && dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| StoreError::io(dir, "cannot empty (--fresh)", e))?;
        }
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| StoreError::io(&path, "cannot read", e))?;
            let old: Manifest = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                line: e.line(),
                message: format!("not a manifest ({e}); use --fresh to replace the output"),
            })?;
            let diff = old.differences(self);
            if diff.is_empty() {
                // This run owns the directory now: what a killed writer left is cleaned up.
                return crate::remove_stale_staged(dir);
            }
            return Err(StoreError::Mismatch {
                path,
                message: format!(
                    "this output holds another run ({}); use --fresh to replace it, or another output directory",
                    diff.join("; ")
                ),
            });
        }
        // A writer killed while staging the manifest leaves only its staging behind.
        if dir.is_dir() {
            crate::remove_stale_staged(dir)?;
        }
        let occupied = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if occupied {
            return Err(StoreError::Mismatch {
                path,
                message: format!(
                    "missing, but {} holds files: an output of an older version or of something else; use --fresh to replace it",
                    dir.display()
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "cannot create", e))?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| StoreError::io(&path, "cannot serialise", e))?;
        write_atomic(&path, text + "\n")
    }
}

fn diff_values(at: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                diff_values(
                    &format!("{at}.{k}"),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{at}: {a} there, {b} now")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(sha: &str) -> Identity {
        Identity {
            kind: "gguf".into(),
            sha256: sha.into(),
            bytes: 1,
            path: format!("{sha}.gguf"),
        }
    }

    #[test]
    fn refuses_another_model_input_or_setting_and_fresh_replaces() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let mut m = Manifest::new(
            "screen",
            id("aaaa"),
            json!({"k": 8, "sampling": {"t": 0.5}}),
        );
        m.inputs.insert("pool".into(), id("p1"));
        m.claim(&dir, false).unwrap();
        std::fs::write(dir.join("results.jsonl"), "x\n").unwrap();
        m.claim(&dir, false).unwrap();
        let mut other = m.clone();
        other.info = json!({"not": "compared"});
        other.claim(&dir, false).unwrap();

        let mut other = m.clone();
        other.model = id("bbbb");
        let e = other.claim(&dir, false).unwrap_err().to_string();
        assert!(
            e.contains(
                "model: gguf aaaa.gguf (sha256 aaaa) there, gguf bbbb.gguf (sha256 bbbb) now"
            ),
            "{e}"
        );
        let mut other = m.clone();
        other.inputs.insert("pool".into(), id("p2"));
        assert!(other
            .claim(&dir, false)
            .unwrap_err()
            .to_string()
            .contains("pool: "));
        let mut other = m.clone();
        other.settings = json!({"k": 8, "sampling": {"t": 1.0}});
        let e = other.claim(&dir, false).unwrap_err().to_string();
        assert!(
            e.contains("settings.sampling.t: 0.5 there, 1.0 now") && e.contains("--fresh"),
            "{e}"
        );
        assert!(
            dir.join("results.jsonl").exists(),
            "a refusal touches nothing"
        );

        other.claim(&dir, true).unwrap();
        assert!(
            !dir.join("results.jsonl").exists(),
            "--fresh empties the directory"
        );
        let back: Manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                .unwrap();
        assert!(back.differences(&other).is_empty());

        let stray = root.path().join("stray");
        std::fs::create_dir(&stray).unwrap();
        std::fs::write(stray.join("prompts.jsonl"), "").unwrap();
        assert!(m
            .claim(&stray, false)
            .unwrap_err()
            .to_string()
            .contains("holds files"));
    }

    #[test]
    fn a_note_is_recorded_and_changes_no_identity() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let m = Manifest::new("eval", id("aaaa"), json!({"n": 1}));
        m.claim(&dir, false).unwrap();
        Manifest::note(&dir, "first_prompt:gsm8k", json!({"ids": [1, 2]})).unwrap();
        let back: Manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(back.info["first_prompt:gsm8k"]["ids"], json!([1, 2]));
        m.claim(&dir, false).unwrap();
        let e = Manifest::note(&root.path().join("none"), "k", json!(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("manifest.json") && !e.contains('\n'), "{e}");
    }
}
