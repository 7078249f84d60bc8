//! The `waft` binary: parse the command line, hand it to the library.

use clap::Parser;

/// jemalloc rather than glibc's malloc: compiling a big guest allocates and frees hundreds of
/// megabytes on many threads, and glibc kept most of it in per-thread arenas for good (a
/// `waft dev` cluster with one Python service: 1,475 MB after 10 deploy/rollback cycles
/// against 407 MB; 1.15× the puts/s, same session; docs/benchmarks.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    waft::cli::run(waft::cli::Cli::parse())
}
