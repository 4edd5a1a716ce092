//! Wall time per kind of work, for the report's notes.

use std::time::Instant;

/// Wall time per kind of work (steps reused from an earlier run cost nearly nothing).
pub(super) struct Phases {
    last: Instant,
    start: Instant,
    spent: Vec<(&'static str, f64)>,
}

impl Phases {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Phases {
            last: now,
            start: now,
            spent: vec![],
        }
    }

    /// Adds the time since the previous lap to `kind`.
    pub(super) fn lap(&mut self, kind: &'static str) {
        let now = Instant::now();
        let secs = (now - self.last).as_secs_f64();
        self.last = now;
        match self.spent.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, s)) => *s += secs,
            None => self.spent.push((kind, secs)),
        }
    }

    pub(super) fn summary(&self) -> String {
        let parts: Vec<String> = self
            .spent
            .iter()
            .map(|(k, s)| format!("{k} {s:.0} s"))
            .collect();
        format!(
            "wall time {:.0} s: {}",
            self.start.elapsed().as_secs_f64(),
            parts.join(", ")
        )
    }
}
