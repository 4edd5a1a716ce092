//! Test support shared by every crate's tests.
//!
//! A test that needs something outside the repository (a fetched model or suite, a Python venv, a
//! server) asks for it here and nowhere else: when it is absent the test skips with one line
//! saying what provides it, unless `EM_REQUIRE_ASSETS` is set (CI sets it), where a missing asset
//! fails the test instead. `tests/skips.rs` lists every test that can skip and refuses skip
//! messages written anywhere else, so in CI the number of tests that can skip is zero.

use std::path::{Path, PathBuf};

/// The variable that turns every skip into a failure.
pub const REQUIRE_VAR: &str = "EM_REQUIRE_ASSETS";

/// Whether missing assets fail tests (CI) rather than skip them.
pub fn assets_required() -> bool {
    std::env::var_os(REQUIRE_VAR).is_some()
}

/// What a test does about an asset: `Ok(true)` run, `Ok(false)` skip, `Err(message)` fail.
pub fn decide(
    present: bool,
    required: bool,
    what: &str,
    provided_by: &str,
) -> Result<bool, String> {
    match (present, required) {
        (true, _) => Ok(true),
        (false, true) => Err(format!(
            "{what} is missing ({REQUIRE_VAR} is set, so this fails rather than skips): {provided_by}"
        )),
        (false, false) => Ok(false),
    }
}

/// True when `what` is present; otherwise skips (prints why, returns false) or, under
/// `EM_REQUIRE_ASSETS`, panics. `provided_by` says what provides it (a command).
pub fn available(present: bool, what: &str, provided_by: &str) -> bool {
    match decide(present, assets_required(), what, provided_by) {
        Ok(true) => true,
        Ok(false) => {
            eprintln!("SKIPPED: {what} is missing; {provided_by}");
            false
        }
        Err(msg) => panic!("{msg}"),
    }
}

/// A file that `cargo xtask fetch <fetch_name>` provides, when present.
pub fn fetched(path: PathBuf, fetch_name: &str) -> Option<PathBuf> {
    let how = format!("run `cargo xtask fetch {fetch_name}`");
    available(path.exists(), &path.display().to_string(), &how).then_some(path)
}

/// A Python named by the environment variable `var` (`EM_TORCH_PYTHON`, `EM_LLAMA_SERVER_PYTHON`),
/// when set and runnable; `installer` is the script that makes it.
pub fn python(var: &str, installer: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var).map(PathBuf::from);
    let present = path.as_ref().is_some_and(|p| p.is_file());
    let how = format!("run `bash {installer}` and set {var} to the Python it prints");
    available(present, &format!("the Python in {var}"), &how).then(|| path.expect("present"))
}

/// The fetch cache (`$EM_CACHE_DIR`, else `$XDG_CACHE_HOME/oneshot-em`, else
/// `~/.cache/oneshot-em`), as the tool itself resolves it.
pub fn cache_dir() -> PathBuf {
    em_store::cache_dir()
}

/// The repository root (tests run from the source tree they were built from).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    fn missing_skips_locally_and_fails_when_required() {
        assert_eq!(decide(true, true, "x", "y"), Ok(true));
        assert_eq!(decide(true, false, "x", "y"), Ok(true));
        assert_eq!(decide(false, false, "x", "y"), Ok(false));
        let e = decide(false, true, "model.gguf", "run `cargo xtask fetch all`").unwrap_err();
        assert!(
            e.contains("model.gguf") && e.contains("cargo xtask fetch all"),
            "{e}"
        );
    }
}
