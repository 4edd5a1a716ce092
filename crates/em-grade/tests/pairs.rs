//! Equivalence verdicts on answer pairs whose forms come from the real benchmark answers, and a
//! property test that hostile input neither panics nor hangs.

use em_grade::{extract_answer, grade, is_equivalent};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A hang guard, not a speed target: the whole property test normally takes a second or two.
const HANG: Duration = Duration::from_secs(600);

#[test]
fn pairs_from_benchmark_forms() {
    let text = include_str!("pairs.tsv");
    let mut failures = Vec::new();
    let mut n = 0;
    for (k, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            f.len(),
            3,
            "pairs.tsv line {}: want 3 tab-separated fields",
            k + 1
        );
        let want = match f[0] {
            "Y" => true,
            "N" => false,
            v => panic!("pairs.tsv line {}: verdict {v:?} is not Y or N", k + 1),
        };
        n += 1;
        if is_equivalent(f[1], f[2]) != want {
            failures.push(format!(
                "line {}: {} {:?} vs gold {:?}",
                k + 1,
                f[0],
                f[1],
                f[2]
            ));
        }
    }
    assert!(n >= 200, "only {n} pairs");
    assert!(
        failures.is_empty(),
        "{} of {n} pairs wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn grade_end_to_end() {
    let g = |r: &str, gold: &str| grade(r, &[gold.to_string()]).correct;
    assert!(g("So $x = \\boxed{\\dfrac{1}{2}}$.", "\\frac12"));
    assert!(g(
        "The final answer is $4.5\\times 10^{33}$. I hope it is correct.",
        "4.5e33"
    ));
    assert!(!g("So \\boxed{5", "5"));
    assert!(g("Janet makes 9 * 2 = $18 every day.", "18"));
    assert!(g("The answer is (B).", "\\text{(B)}"));
    assert!(!g("no answer at all", "5"));
    let v = grade("\\boxed{3}", &["4".into(), "3".into()]);
    assert_eq!(v.pred.as_deref(), Some("3"));
    assert!(v.correct);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn hostile_input_neither_panics_nor_hangs() {
    // On its own thread, so that a hang fails the test instead of stalling the run.
    let (done, finished) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = done.send(hostile_inputs());
    });
    match finished.recv_timeout(HANG) {
        Ok((worst, total)) => {
            eprintln!(
                "20,000 random inputs and the deep ones in {total:.2?}, slowest call {worst:.2?}"
            );
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
            unreachable!("the worker ended without a result");
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("hostile inputs still running after {HANG:?}")
        }
    }
}

/// Grades random strings of LaTeX pieces and deep or long inputs; the slowest random call and the
/// total time, for the log.
fn hostile_inputs() -> (Duration, Duration) {
    const PIECES: &[&str] = &[
        "\\frac",
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        "\\sqrt",
        "^",
        "_",
        "\\boxed{",
        "1",
        "23",
        ".",
        "-",
        "+",
        "x",
        "\\pi",
        "\\pm",
        ",",
        "=",
        "\\le",
        "|",
        "!",
        "e",
        "i",
        "\\left(",
        "\\right)",
        "\\{",
        "\\}",
        "\\begin{pmatrix}",
        "\\end{pmatrix}",
        "&",
        "\\\\",
        "\\text{",
        "%",
        "°",
        "π",
        "\\cup",
        "\\infty",
        "9999999",
        "^{999}",
        "\\binom",
        "\\lfloor",
        "\\rfloor",
        "\\overline{3}",
        "e99",
        " ",
        "\\",
        "$",
        "\\sin",
        "\\log_",
        "0",
        "/",
        "\\cdot",
        "é",
        "√",
        "\\mathbb{R}",
        "or",
        "∞",
    ];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    for _ in 0..20_000 {
        let mut a = String::new();
        let mut b = String::new();
        for s in [&mut a, &mut b] {
            let len = rng.next() % 40;
            for _ in 0..len {
                s.push_str(PIECES[(rng.next() % PIECES.len() as u64) as usize]);
            }
        }
        let t = Instant::now();
        let _ = is_equivalent(&a, &b);
        let _ = extract_answer(&a);
        let _ = is_equivalent(&a, &a);
        worst = worst.max(t.elapsed());
    }
    // deep nesting and long inputs
    let deep = "(".repeat(5000) + "1" + &")".repeat(5000);
    let _ = is_equivalent(&deep, "1");
    let braces = "{".repeat(5000);
    let _ = is_equivalent(&braces, &braces.replace('{', "}"));
    let long = "1+".repeat(400) + "1";
    let _ = is_equivalent(&long, "401");
    let list = (0..500)
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let _ = is_equivalent(&list, &list.chars().rev().collect::<String>());
    let pows = "2^{".repeat(40) + "9" + &"}".repeat(40);
    let _ = is_equivalent(&pows, "3");
    let _ = extract_answer(&"\\boxed{".repeat(10_000));
    (worst, start.elapsed())
}
