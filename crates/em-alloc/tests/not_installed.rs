//! Without `BudgetAlloc` as the global allocator, nothing is bounded: `run_bounded` only moves the
//! work to a thread, which is what makes the budget in `budget.rs` the allocator's doing.

#[test]
fn without_the_allocator_nothing_is_bounded() {
    assert!(!em_alloc::enforced());
    let out = em_alloc::run_bounded(1 << 20, || vec![1u8; 8 << 20].len());
    assert_eq!(out.unwrap(), 8 << 20);
}
