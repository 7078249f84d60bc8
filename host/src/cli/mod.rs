//! The `waft` command line: argument parsing and the commands it runs.
//!
//! This is the only module that reads arguments or the environment; everything else takes
//! validated values.

mod guest;

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;

/// waft: a replicated state machine you write in WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "waft", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `waft=debug`.
    #[arg(long, global = true, env = "WAFT_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a guest component: is it one, does it implement waft's world, can this host
    /// run it (imports, limits), how big and how slow to compile.
    #[command(
        after_help = "Example:\n  waft check examples/guests/target/wasm32-wasip2/release/kv.wasm"
    )]
    Check(guest::CheckArgs),
    /// Apply commands to a fresh instance of a guest, locally, with no cluster, and print each
    /// reply. For trying and testing guests.
    #[command(after_help = "Examples:\n  \
        waft exec kv.wasm 'put a 1' 'get a'\n  \
        waft exec kv.wasm 'put a 1' 'put b 2' --query 'scan' --snapshot-roundtrip")]
    Exec(guest::ExecArgs),
}

/// Resource limits for a guest, as flags.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Fuel per apply (about one unit per wasm instruction).
    #[arg(long, value_name = "UNITS")]
    pub fuel: Option<u64>,
    /// Largest guest memory, in MiB.
    #[arg(long, value_name = "MIB")]
    pub max_memory_mib: Option<usize>,
}

impl LimitArgs {
    /// The runtime limits these flags describe, defaults elsewhere.
    pub fn limits(&self) -> crate::runtime::Limits {
        let mut limits = crate::runtime::Limits::default();
        if let Some(fuel) = self.fuel {
            limits.fuel_per_apply = fuel;
            limits.fuel_per_query = fuel;
        }
        if let Some(mib) = self.max_memory_mib {
            limits.max_memory_bytes = mib.saturating_mul(1 << 20);
        }
        limits
    }
}

/// Sets up logging to stderr with the given filter.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Check(args) => guest::check(&args),
        Command::Exec(args) => guest::exec(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
