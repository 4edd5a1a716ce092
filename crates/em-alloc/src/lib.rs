//! Memory budgets for code that runs untrusted input, such as a chat template from a downloaded
//! model: [`run_bounded`] runs a closure on its own thread and returns [`Error::OverBudget`] once
//! that thread holds more than a given number of bytes, instead of letting it exhaust the process.
//!
//! The budget is enforced by [`BudgetAlloc`], which a binary installs as its global allocator:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: em_alloc::BudgetAlloc = em_alloc::BudgetAlloc;
//!
//! fn main() {
//!     let grow = || (0..40).fold(String::from("x"), |s, _| s.repeat(2)).len();
//!     let out = em_alloc::run_bounded(16 << 20, grow);
//!     assert!(matches!(out, Err(em_alloc::Error::OverBudget { .. })));
//!     assert_eq!(em_alloc::run_bounded(16 << 20, || vec![0u8; 1 << 20].len()).unwrap(), 1 << 20);
//! }
//! ```
//!
//! Without it (see [`enforced`]), `run_bounded` still runs the closure on its own thread, unbounded.
//!
//! An allocator cannot fail gracefully (a null return aborts the process) and must not unwind, so
//! the thread that goes over budget is never resumed: its allocation blocks forever, the caller is
//! woken and gets the error, and whatever that thread held (at most the budget) stays allocated.
//! This is meant for a process that reports the error and stops, or that meets it rarely.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

/// Why a bounded closure gave no result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The closure's thread tried to hold more than the budget.
    #[error("needs more than {limit} bytes of memory")]
    OverBudget {
        /// The budget, in bytes.
        limit: usize,
    },
    /// The closure panicked (the panic message went to stderr).
    #[error("panicked: {0}")]
    Panicked(String),
    /// No thread could be started.
    #[error("cannot start a thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// The system allocator, counting what the current thread holds while [`run_bounded`] runs on it.
pub struct BudgetAlloc;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static BLOCKED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Budget of this thread in bytes; 0 while unbounded.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    /// Bytes this thread has allocated and not freed since its budget was set.
    static LIVE: Cell<usize> = const { Cell::new(0) };
    /// Whom to tell when the budget is exceeded.
    static SIGNAL: Cell<*const Signal> = const { Cell::new(std::ptr::null()) };
}

/// Shared by a bounded thread and the caller waiting for it.
struct Signal {
    over_budget: AtomicBool,
    caller: Thread,
}

/// Has glibc's malloc keep the memory a process frees for its next allocations, instead of
/// returning it to the kernel: blocks up to 32 MiB (glibc's most) come from the heap rather than
/// their own mmap, and the heap is trimmed only past 2 GiB free. A training update allocates and
/// frees the same large activations over and over; without this each one is mapped afresh and
/// every page faults and is zeroed by the kernel again (13% of an update's CPU time on SmolLM2,
/// `bench em-step --profile`). Peak memory stays the same within a few percent. Returns whether
/// it took effect (glibc on Linux only; elsewhere nothing changes).
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; both values are in its range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Whether [`BudgetAlloc`] is this process's global allocator (known once it has allocated).
pub fn enforced() -> bool {
    // Make sure at least one allocation went through the global allocator.
    drop(std::hint::black_box(Box::new(0u8)));
    INSTALLED.load(Ordering::Relaxed)
}

/// How many threads this process has left blocked for going over budget.
pub fn threads_left_blocked() -> usize {
    BLOCKED.load(Ordering::Relaxed)
}

/// Count `size` more bytes against this thread's budget. Never returns when the budget is exceeded.
#[inline]
fn charge(size: usize) {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
    let _ = LIMIT.try_with(|limit| {
        let limit = limit.get();
        if limit == 0 {
            return;
        }
        let live = LIVE.get().saturating_add(size);
        // A panic's own allocations (message, payload) are let through: stopping here would leave
        // the panic machinery's locks held for good.
        if live > limit && !std::thread::panicking() {
            over_budget();
        }
        LIVE.set(live);
    });
}

#[inline]
fn refund(size: usize) {
    let _ = LIMIT.try_with(|limit| {
        if limit.get() != 0 {
            LIVE.set(LIVE.get().saturating_sub(size));
        }
    });
}

#[cold]
fn over_budget() -> ! {
    BLOCKED.fetch_add(1, Ordering::Relaxed);
    let signal = SIGNAL.get();
    // SAFETY: `run_bounded` sets SIGNAL together with LIMIT, from an `Arc<Signal>` that the
    // bounded thread's closure owns; that closure never returns from here, so the Arc outlives us.
    if let Some(signal) = unsafe { signal.as_ref() } {
        signal.over_budget.store(true, Ordering::SeqCst);
        signal.caller.unpark();
    }
    // Sleeping neither allocates nor takes a lock another thread could need.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for BudgetAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refund(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size());
        } else {
            refund(layout.size() - new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Run `f` on a new thread that may hold at most `limit` bytes at a time (what it allocates and
/// has not freed; memory it was handed is not counted), and wait for it.
///
/// Over budget, the thread is left blocked for good with what it held, and this returns
/// [`Error::OverBudget`]. A panic in `f` is [`Error::Panicked`].
pub fn run_bounded<T, F>(limit: usize, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let signal = Arc::new(Signal {
        over_budget: AtomicBool::new(false),
        caller: std::thread::current(),
    });
    let result: Arc<Mutex<Option<std::thread::Result<T>>>> = Arc::new(Mutex::new(None));
    let thread = {
        let signal = Arc::clone(&signal);
        let result = Arc::clone(&result);
        std::thread::Builder::new()
            .name("em-alloc-bounded".into())
            .spawn(move || {
                SIGNAL.set(Arc::as_ptr(&signal));
                LIVE.set(0);
                LIMIT.set(limit.max(1));
                let out = catch_unwind(AssertUnwindSafe(f));
                LIMIT.set(0);
                SIGNAL.set(std::ptr::null());
                *result.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                signal.caller.unpark();
            })?
    };
    loop {
        let done = result.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(out) = done {
            let _ = thread.join();
            return out.map_err(|payload| Error::Panicked(panic_message(&*payload)));
        }
        if signal.over_budget.load(Ordering::SeqCst) {
            return Err(Error::OverBudget { limit });
        }
        // Both outcomes unpark this thread; a spurious wake-up only loops again.
        std::thread::park();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
