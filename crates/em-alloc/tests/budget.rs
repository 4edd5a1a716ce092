//! `run_bounded` under `BudgetAlloc`: what goes over budget stops with an error (the caller is
//! woken, not left waiting), and the rest of the process carries on.

use em_alloc::{run_bounded, BudgetAlloc, Error};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: BudgetAlloc = BudgetAlloc;

const MIB: usize = 1 << 20;

/// A hang guard, not a speed target: going over budget is noticed in milliseconds.
const HANG: Duration = Duration::from_secs(300);

/// `f` on a thread of its own, waited for at most [`HANG`]: a caller never woken fails the test
/// instead of stalling the run.
fn without_hanging<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let start = Instant::now();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    let out = match finished.recv_timeout(HANG) {
        Ok(out) => out,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still waiting after {HANG:?}"),
        Err(e) => panic!("{what}: the thread ended without a result: {e}"),
    };
    eprintln!("{what}: {:.2?}", start.elapsed());
    out
}

#[test]
fn the_allocator_is_installed() {
    assert!(em_alloc::enforced());
}

#[test]
fn a_thread_over_budget_gives_an_error_instead_of_the_memory() {
    // Doubling a string, as a hostile template does: the 17th doubling needs 128 MiB.
    let out = without_hanging("doubling a string", || {
        run_bounded(16 * MIB, || {
            let mut s = String::from("x");
            for _ in 0..40 {
                s = format!("{s}{s}");
            }
            s.len()
        })
    });
    assert!(
        matches!(out, Err(Error::OverBudget { limit }) if limit == 16 * MIB),
        "{out:?}"
    );
    // One allocation far past what the machine has is refused before it is made.
    let out = without_hanging("one 1 TiB allocation", || {
        run_bounded(16 * MIB, || vec![1u8; 1 << 40].len())
    });
    assert!(matches!(out, Err(Error::OverBudget { .. })), "{out:?}");
    assert!(em_alloc::threads_left_blocked() >= 2);
    // The process goes on allocating, bounded or not.
    assert_eq!(vec![0u8; 64 * MIB].len(), 64 * MIB);
    assert_eq!(run_bounded(16 * MIB, || vec![0u8; MIB].len()).unwrap(), MIB);
}

#[test]
fn the_budget_counts_what_is_held_not_what_was_ever_allocated() {
    let out = run_bounded(4 * MIB, || {
        let mut total = 0;
        for i in 0..200 {
            let v = vec![i as u8; MIB];
            total += v.len();
        }
        total
    });
    assert_eq!(out.unwrap(), 200 * MIB);
    // Growing in place (realloc) is counted by the growth.
    let out = run_bounded(4 * MIB, || {
        let mut v: Vec<u8> = Vec::new();
        for _ in 0..(8 * MIB) {
            v.push(1);
        }
        v.len()
    });
    assert!(matches!(out, Err(Error::OverBudget { .. })), "{out:?}");
}

#[test]
fn what_the_thread_is_handed_is_not_counted() {
    let big = vec![7u8; 32 * MIB];
    let out = run_bounded(MIB, move || big.iter().map(|&b| b as usize).sum::<usize>());
    assert_eq!(out.unwrap(), 7 * 32 * MIB);
}

#[test]
fn a_panic_is_an_error_with_its_message() {
    let out = run_bounded(MIB, || -> usize { panic!("template said no") });
    match out {
        Err(Error::Panicked(m)) => assert_eq!(m, "template said no"),
        other => panic!("{other:?}"),
    }
}
