//! Named moments where a process can be killed for testing resumption: `EM_CRASH_AT=NAME:N` sends
//! SIGKILL to this process the Nth time it reaches [`crash_point`] `NAME` (the harness in
//! `xtask/tests/kill_harness.rs` uses it to kill inside a rename or an append, windows too short to
//! hit from outside), and `EM_CRASH_TRACE=FILE` appends each point's name to FILE as it is passed,
//! to learn how many times a run passes each. Unset, a point costs one atomic load.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

struct Plan {
    at: Option<(String, usize)>,
    trace: Option<std::path::PathBuf>,
    hits: Mutex<HashMap<String, usize>>,
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| Plan {
        at: std::env::var("EM_CRASH_AT").ok().and_then(|v| {
            let (name, n) = v.rsplit_once(':')?;
            Some((name.to_string(), n.parse().ok()?))
        }),
        trace: std::env::var_os("EM_CRASH_TRACE").map(Into::into),
        hits: Mutex::new(HashMap::new()),
    })
}

/// Whether a kill is planned at this passage of `name` (counting it); traces it.
fn due(name: &str) -> bool {
    let plan = plan();
    if plan.at.is_none() && plan.trace.is_none() {
        return false;
    }
    if let Some(path) = &plan.trace {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{name}");
        }
    }
    let Some((at, n)) = &plan.at else {
        return false;
    };
    if at != name {
        return false;
    }
    let mut hits = plan.hits.lock().unwrap_or_else(|e| e.into_inner());
    let count = hits.entry(name.to_string()).or_insert(0);
    *count += 1;
    *count == *n
}

/// Kills this process with SIGKILL if `EM_CRASH_AT` names this passage of `name`.
pub fn crash_point(name: &str) {
    if due(name) {
        kill_self();
    }
}

/// [`crash_point`] that first runs `before` (e.g. writing half a line, as a kill mid-write leaves).
pub fn crash_point_with(name: &str, before: impl FnOnce()) {
    if due(name) {
        before();
        kill_self();
    }
}

fn kill_self() -> ! {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid takes no pointers.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
