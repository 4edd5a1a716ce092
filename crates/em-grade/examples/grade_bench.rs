//! Responses graded per second on one core, over all MATH500 gold solutions as responses.
//!
//! `cargo run --release -p em-grade --example grade_bench -- MATH500.jsonl` (the file
//! `cargo xtask fetch math-data` puts at `~/.cache/oneshot-em/data/math500/test.jsonl`)

use std::time::Instant;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: grade_bench MATH500.jsonl (cargo xtask fetch math-data provides it)");
        std::process::exit(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            std::process::exit(1);
        }
    };
    let mut items = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{path}:{}: {e}", k + 1);
                std::process::exit(1);
            }
        };
        let sol = v["solution"].as_str().unwrap_or_default().to_string();
        let ans = v["answer"].as_str().unwrap_or_default().to_string();
        items.push((sol, vec![ans]));
    }
    let mut correct = 0;
    let mut misses = Vec::new();
    for (sol, golds) in &items {
        let v = em_grade::grade(sol, golds);
        if v.correct {
            correct += 1;
        } else {
            misses.push(format!("  pred {:?} gold {:?}", v.pred, golds[0]));
        }
    }
    let rounds = 20;
    let start = Instant::now();
    let mut n = 0usize;
    for _ in 0..rounds {
        for (sol, golds) in &items {
            std::hint::black_box(em_grade::grade(sol, golds));
            n += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for m in &misses {
        println!("{m}");
    }
    println!(
        "{} items, {correct} graded correct ({:.1}%); {:.0} responses/s on one core ({:.1} µs each)",
        items.len(),
        100.0 * correct as f64 / items.len().max(1) as f64,
        n as f64 / secs,
        1e6 * secs / n as f64
    );
}
