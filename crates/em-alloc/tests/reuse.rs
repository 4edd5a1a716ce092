//! After `reuse_freed_memory`, a large buffer allocated again after being freed comes back
//! without the kernel faulting its pages in anew.

fn minor_faults() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given.
    unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init().ru_minflt
    }
}

/// Minor page faults of allocating, filling and freeing `bytes` once.
fn faults_of_a_buffer(bytes: usize) -> i64 {
    let before = minor_faults();
    let buffer = vec![1u8; bytes];
    std::hint::black_box(&buffer);
    drop(buffer);
    minor_faults() - before
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_freed_buffer_is_reused_without_page_faults() {
    let bytes = 16 << 20;
    let pages = (bytes / 4096) as i64;
    // glibc's default: a 16 MiB block is its own mapping, faulted in page by page every time.
    let default = faults_of_a_buffer(bytes);
    assert!(default > pages / 2, "{default} faults for {pages} pages");
    assert!(em_alloc::reuse_freed_memory());
    faults_of_a_buffer(bytes);
    let reused = faults_of_a_buffer(bytes);
    assert!(reused < pages / 20, "{reused} faults for {pages} pages");
}
