//! Every file of `corpus/<target>/` through its target, then a few thousand seeded mutations of
//! every seed (bit flips, inserted and deleted bytes, 1/2/4/8-byte fields overwritten with
//! boundary values, inserted syntax), on stable Rust without libFuzzer. A panic or an input that
//! hangs (past a guard of seconds, where inputs take milliseconds) fails the test, printing the
//! input in hex and saving it for the corpus.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use em_fuzz::{seeds, TARGETS};

/// Wall time after which the mutations of one target stop, once [`MIN_MUTATIONS`] have run: keeps
/// the test short on a fast machine; a slow one runs the minimum however long it takes.
const MUTATION_BUDGET: Duration = Duration::from_secs(3);
/// Mutations every target gets whatever the time.
const MIN_MUTATIONS: usize = 100;
/// Rounds of mutation: each round mutates every seed once.
const ROUNDS: usize = 3000;
/// The slowest a single input may be: a hang guard (inputs take milliseconds).
const SLOW_INPUT: Duration = Duration::from_secs(10);
/// How long the watchdog waits for one target's mutations before it reports the input it is on
/// as hung: far beyond the normal few seconds, so only a hang reaches it.
const HANG: Duration = Duration::from_secs(600);
/// Highest resident memory the test process may reach.
const MAX_RSS_BYTES: u64 = 2 << 30;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

fn target(name: &str) -> em_fuzz::Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no target {name}"))
        .1
}

/// Runs `target` on `input`; the error names the target, what the input was and the input.
fn check(name: &str, input: &[u8], what: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| target(name)(input)));
    let took = start.elapsed();
    match outcome {
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            Err(report(
                name,
                input,
                &format!("panicked ({message}) on {what}"),
            ))
        }
        Ok(()) if took > SLOW_INPUT => {
            Err(report(name, input, &format!("took {took:?} on {what}")))
        }
        Ok(()) => Ok(took),
    }
}

fn report(name: &str, input: &[u8], what: &str) -> String {
    let saved = std::env::temp_dir().join(format!("em-fuzz-{name}-{:016x}", fnv(input)));
    let _ = std::fs::write(&saved, input);
    const SHOWN: usize = 4096;
    let hex: String = input
        .iter()
        .take(SHOWN)
        .map(|b| format!("{b:02x}"))
        .collect();
    let part = if input.len() > SHOWN {
        " (the first 4096)"
    } else {
        ""
    };
    format!(
        "{name}: {what}; the input ({} bytes) is saved as {}; add it to crates/em-fuzz/corpus/{name}/ once fixed; hex{part}: {hex}",
        input.len(),
        saved.display()
    )
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn every_corpus_file_and_seed_runs_clean() {
    let mut total_bytes = 0;
    for (name, _) in TARGETS {
        let files = corpus(name);
        assert!(
            !files.is_empty(),
            "{}: empty corpus",
            corpus_dir(name).display()
        );
        for (file, bytes) in &files {
            total_bytes += bytes.len();
            check(name, bytes, &format!("corpus/{name}/{file}")).unwrap_or_else(|e| panic!("{e}"));
        }
        // Seeds are made afresh too, so a change to a writer reaches the targets without a rewrite.
        for (seed, bytes) in seeds::for_target(name) {
            check(name, &bytes, &format!("seed {seed}")).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert!(
        total_bytes < 1 << 20,
        "the corpus is {total_bytes} bytes; keep it under 1 MiB"
    );
}

/// Rewrites `corpus/` from [`seeds::for_target`] (crash inputs added by hand stay).
#[test]
#[ignore = "writes the corpus: EM_FUZZ_WRITE_CORPUS=1 cargo test --release -p em-fuzz --test replay write_corpus -- --ignored"]
fn write_corpus() {
    assert!(
        std::env::var_os("EM_FUZZ_WRITE_CORPUS").is_some(),
        "set EM_FUZZ_WRITE_CORPUS=1 to rewrite the corpus"
    );
    let n = seeds::write_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")).unwrap();
    eprintln!("wrote {n} seed files");
}

/// The sampler's seeded stream: the mutations are the same on every run.
struct Rng(em_sampler::maths::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(em_sampler::maths::Rng::new(seed, 0))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// An offset into `len` bytes, three times in four among the first 1024 (where headers are).
    fn offset(&mut self, len: usize) -> usize {
        if self.below(4) > 0 {
            self.below(len.min(1024))
        } else {
            self.below(len)
        }
    }
}

/// Values written over 1, 2, 4 and 8-byte fields (little-endian, truncated to the width).
const BOUNDARY: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1_000_000_000_000,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Syntax of the text formats, inserted whole.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "null",
    "-1",
    "0",
    "1e309",
    "4294967296",
    "{%",
    "%}",
    "{{",
    "}}",
    "{% for x in messages %}",
    "{% endfor %}",
    "\\boxed{",
    "\\frac",
    "^",
    "\t",
    "\n",
    "\0",
    "▁",
    "Ġ",
    "\u{fffd}",
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !b.is_empty() => {
                let at = rng.offset(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = rng.offset(b.len() + 1);
                b.insert(at, rng.next() as u8);
            }
            2 if !b.is_empty() => {
                let at = rng.offset(b.len());
                let n = (1 + rng.below(8)).min(b.len() - at);
                b.drain(at..at + n);
            }
            3 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                if b.len() >= width {
                    let at = rng.offset(b.len() - width + 1);
                    let value = BOUNDARY[rng.below(BOUNDARY.len())].to_le_bytes();
                    b[at..at + width].copy_from_slice(&value[..width]);
                }
            }
            4 => {
                let at = rng.offset(b.len() + 1);
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                b.splice(at..at, token.iter().copied());
            }
            5 if !b.is_empty() => {
                // A chunk repeated elsewhere: a list item twice, a loop inside a loop.
                let from = rng.offset(b.len());
                let n = (1 + rng.below(64)).min(b.len() - from);
                let chunk = b[from..from + n].to_vec();
                let at = rng.offset(b.len() + 1);
                b.splice(at..at, chunk);
            }
            6 if !b.is_empty() => b.truncate(rng.offset(b.len())),
            _ => {}
        }
    }
    b
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Mutates every seed of `name` for [`ROUNDS`] rounds, or [`MIN_MUTATIONS`] and then until
/// [`MUTATION_BUDGET`], on a thread a watchdog waits for, so that a hang fails with the input
/// rather than stalling the run.
fn mutate_target(name: &'static str) {
    let mut seeds: Vec<Vec<u8>> = corpus(name).into_iter().map(|(_, b)| b).collect();
    seeds.extend(seeds::for_target(name).into_iter().map(|(_, b)| b));
    let current = Arc::new(Mutex::new(Vec::new()));
    let (done, finished) = mpsc::channel();
    let watched = Arc::clone(&current);
    std::thread::spawn(move || {
        let mut rng = Rng::new(fnv(name.as_bytes()));
        let start = Instant::now();
        let (mut runs, mut slowest) = (0usize, Duration::ZERO);
        'rounds: for _ in 0..ROUNDS {
            for seed in &seeds {
                let input = mutate(seed, &mut rng);
                watched.lock().unwrap().clone_from(&input);
                match check(name, &input, &format!("mutation {runs}")) {
                    Ok(took) => slowest = slowest.max(took),
                    Err(e) => {
                        let _ = done.send(Err(e));
                        return;
                    }
                }
                runs += 1;
                if runs >= MIN_MUTATIONS && start.elapsed() > MUTATION_BUDGET {
                    break 'rounds;
                }
            }
        }
        let _ = done.send(Ok((runs, slowest, start.elapsed())));
    });
    match finished.recv_timeout(HANG) {
        Ok(Ok((runs, slowest, took))) => {
            eprintln!("{name}: {runs} mutations in {took:.1?}, slowest {slowest:.1?}");
            if name == "chat_template" {
                eprintln!(
                    "{name}: {} renders over their memory budget left blocked",
                    em_alloc::threads_left_blocked()
                );
            }
            assert!(runs >= MIN_MUTATIONS, "{name}: only {runs} mutations ran");
        }
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => {
            let input = current.lock().unwrap().clone();
            panic!("{}", report(name, &input, "hung"));
        }
    }
    if let Some(rss) = peak_rss_bytes() {
        assert!(
            rss < MAX_RSS_BYTES,
            "{name}: the process reached {rss} bytes resident"
        );
    }
}

macro_rules! mutation_tests {
    ($($name:ident),* $(,)?) => {
        mod mutations {
            $(#[test] fn $name() { super::mutate_target(stringify!($name)); })*
        }
        const MUTATED: &[&str] = &[$(stringify!($name)),*];
    };
}

mutation_tests!(
    gguf,
    safetensors,
    safetensors_index,
    tokenizer_json,
    config,
    chat_template,
    suite,
    pool,
    grader,
);

#[test]
fn every_target_has_a_mutation_test() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, MUTATED);
}
