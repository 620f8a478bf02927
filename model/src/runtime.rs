//! Process settings for the CPU path, decided once at start-up.
//!
//! - candle 0.11 asks for its thread count on every matrix product, and
//!   unless `RAYON_NUM_THREADS` is set that means reading CPU masks and
//!   `/proc/cpuinfo`: on a small model most of a decode step. Setting the
//!   variable once, to the count candle would have found, gives the same
//!   parallelism without the reads.
//! - candle runs large elementwise ops on its own pool, whose workers spin
//!   for about a millisecond after every op before they sleep
//!   (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, 25 000 rounds). Those spinning
//!   threads compete for the cores with the matrix products and the fused
//!   kernels that follow, which run on rayon's pool. A short spin keeps
//!   the cores for the work.
//! - glibc's allocator gives large freed blocks back to the kernel (every
//!   block above its mmap threshold, and the top of the heap beyond its
//!   trim threshold), so the next tensor of that size page-faults and is
//!   zeroed all over again. Every op allocates its output, so on a CPU that
//!   was 5 to 10 % of prefill and VQ decoding. Blocks up to 32 MiB now come
//!   from the heap, and up to 256 MiB of freed heap is kept for reuse.
//!
//! Each setting is left alone when the user set it in the environment.
//! BENCHMARKS.md has them measured against the defaults.

/// Rounds a pool worker spins before it sleeps.
const SPIN_LIMIT: &str = "100";

/// Applies the settings above. Call first thing in `main`, before any other
/// thread exists (the environment is process-wide). Returns the CPU thread
/// count in use.
pub fn configure() -> usize {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT);
    }
    keep_freed_memory();
    threads
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    let set_by_user = [
        "GLIBC_TUNABLES",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some());
    if set_by_user {
        return;
    }
    // SAFETY: mallopt only changes glibc's allocation thresholds; called
    // before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
