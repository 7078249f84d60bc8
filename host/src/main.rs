//! The `waft` binary: parse the command line, hand it to the library.

use clap::Parser;

/// jemalloc rather than glibc's malloc: compiling a big guest allocates and frees hundreds of
/// megabytes on many threads, and glibc kept most of it in per-thread arenas for good (a
/// `waft dev` cluster with one Python service: 1,475 MB after 10 deploy/rollback cycles
/// against 407 MB; 1.15× the puts/s, same session; docs/benchmarks.md). Background threads
/// return freed pages to the system after a few seconds: without them, pages freed by a thread
/// that then went idle (a compiler thread) stayed resident (450 against 148 MB per node with a
/// Python and a JS service). Statistics are on, for `/metrics`.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's own account of the heap, for `/metrics`.
fn allocator_stats() -> Option<waft::metrics::AllocatorStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken when the epoch advances.
    epoch::advance().ok()?;
    Some(waft::metrics::AllocatorStats {
        allocated: stats::allocated::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
    })
}

fn main() -> std::process::ExitCode {
    waft::metrics::set_allocator_stats(allocator_stats);
    waft::cli::run(waft::cli::Cli::parse())
}
