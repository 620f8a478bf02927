//! candle's CPU thread settings, decided once at start-up.
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
//!   kernels that follow, which run on rayon's pool: on two cores prefill
//!   and the vision tower measured about 20 % slower. A short spin keeps
//!   the cores for the work.
//!
//! BENCHMARKS.md has both measured against candle's defaults.

/// Rounds a pool worker spins before it sleeps.
const SPIN_LIMIT: &str = "100";

/// Sets `RAYON_NUM_THREADS` to candle's own choice and a short spin for
/// candle's elementwise pool, each unless already set. Call first thing in
/// `main`, before any other thread exists (the environment is
/// process-wide). Returns the thread count in use.
pub fn configure() -> usize {
    let threads = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT);
    }
    threads
}
