//! The `waft` command line: argument parsing and the commands it runs.
//!
//! This is the only module that reads arguments or the environment; everything else takes
//! validated values.

mod admin;
mod backup;
mod bench;
mod bench_events;
mod client;
mod connect;
mod guest;
mod node;
mod output;
mod progress;

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;

/// waft: a replicated state machine you write in WebAssembly.
#[derive(Debug, Parser)]
#[command(
    name = "waft",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("WAFT_COMMIT"), ")"),
    about,
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `waft=debug`. openraft's
    /// warning at every failed heartbeat is turned down unless the filter names openraft.
    #[arg(long, global = true, env = "WAFT_LOG", default_value = "warn")]
    pub log: String,

    #[command(flatten)]
    pub client: connect::ClientArgs,

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
        waft exec kv.wasm 'put a 1' 'put b 2' --query 'scan' --snapshot-roundtrip\n  \
        waft exec kv.wasm --commands-file cmds.txt --query 'scan' --verify")]
    Exec(guest::ExecArgs),
    /// Run one node of a cluster.
    #[command(after_help = "Examples:\n  \
        waft node --id 1 --listen 127.0.0.1:7001 --data-dir data/1\n  \
        waft cluster init --endpoint 127.0.0.1:7001\n  \
        waft node --id 2 --listen 127.0.0.1:7002 --data-dir data/2 --join 127.0.0.1:7001")]
    Node(Box<node::NodeArgs>),
    /// Start a local cluster (3 nodes by default) with the example kv guest deployed as `kv`.
    Dev(node::DevArgs),
    /// Upload a guest and make it serve a service.
    #[command(
        after_help = "Example:\n  waft deploy examples/guests/target/wasm32-wasip2/release/kv.wasm --service kv"
    )]
    Deploy(client::DeployArgs),
    /// Submit a command to a service (replicated; returns once applied).
    #[command(
        after_help = "Examples:\n  waft submit --service kv 'put a 1'\n  waft submit --service kv @command.bin\n  echo 'get a' | waft submit --service kv -\n  waft submit --service kv --lines @commands.txt   (one command per line, in batches)"
    )]
    Submit(client::SubmitArgs),
    /// Run a read-only query against a service.
    #[command(
        after_help = "Examples:\n  waft query --service kv 'get a'\n  waft query --service kv 'scan' --consistency stale"
    )]
    Query(client::QueryArgs),
    /// Follow what a node applies: each command with its outcome, and each version change.
    #[command(
        after_help = "Examples:\n  waft watch --service kv\n  waft watch --service kv --from 120 --count 10\n  waft --output json watch"
    )]
    Watch(client::WatchArgs),
    /// List the services: version, module, where it took over, state size.
    Services,
    /// Make an earlier version of a service serve again (its state carries over).
    #[command(
        after_help = "Examples:\n  waft rollback --service kv\n  waft rollback --service kv --to 1"
    )]
    Rollback(client::RollbackArgs),
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(admin::ClusterCommand),
    /// Write a consistent backup of every service (modules, versions, states) to a file.
    #[command(after_help = "Example:\n  waft backup waft.backup")]
    Backup(backup::BackupArgs),
    /// Load a backup into a cluster (one that runs no services, unless --force), or seed a new
    /// node's data directory with it offline (--data-dir).
    #[command(after_help = "Examples:\n  \
        waft --endpoint 10.0.0.5:7001 restore waft.backup\n  \
        waft restore waft.backup --data-dir data/1 --id 1 --advertise 10.0.0.5:7001")]
    Restore(backup::RestoreArgs),
    /// Load a cluster (waft or etcd, or both side by side) and report throughput and latency.
    #[command(after_help = "Examples:\n  \
        waft bench --clients 16 --duration 10\n  \
        waft bench --endpoints 127.0.0.1:7001,127.0.0.1:7002 --compare-etcd 127.0.0.1:2379 --clients 64\n  \
        waft bench --read-ratio 0.9 --consistency lease --output json")]
    Bench(bench::BenchArgs),
    /// Watch fan-out through etcd's API: many watchers on one prefix while writers put under
    /// it; waft's etcd endpoint and (side by side) a real etcd.
    #[command(after_help = "Example:\n  \
        waft bench-watch --etcd 127.0.0.1:2379,127.0.0.1:2380 --compare-etcd 127.0.0.1:23791 --watchers 1000")]
    BenchWatch(bench_events::WatchBenchArgs),
    /// Timer delivery lag through etcd's API: leases that run out while writers load the
    /// cluster; on waft a lease is a guest timer. waft's etcd endpoint and a real etcd.
    #[command(after_help = "Example:\n  \
        waft bench-timers --etcd 127.0.0.1:2379 --compare-etcd 127.0.0.1:23791 --timers 200 --load 16")]
    BenchTimers(bench_events::TimerBenchArgs),
    /// Make TLS certificates: a cluster CA (created in DIR on first use) and a certificate it
    /// signs for a node or a client, for `--tls-ca`, `--tls-cert` and `--tls-key`.
    #[command(after_help = "Examples:\n  \
        waft certs --dir tls --name node1 --host node1.example.com --host 10.0.0.5\n  \
        waft certs --dir tls --name alice\n  \
        waft node --id 1 --data-dir data/1 --tls-ca tls/ca.pem --tls-cert tls/node1.pem --tls-key tls/node1-key.pem")]
    Certs(CertsArgs),
}

/// Arguments of `waft certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Where the CA (`ca.pem`, `ca-key.pem`) is kept and the new files are written.
    #[arg(long, value_name = "DIR")]
    pub dir: std::path::PathBuf,
    /// The certificate's name: files `NAME.pem` and `NAME-key.pem`, and its common name.
    #[arg(long)]
    pub name: String,
    /// A host name or IP address the certificate is valid for (repeatable; a node needs the
    /// names peers and clients dial it by). Default: localhost, 127.0.0.1 and ::1.
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// How long the certificate (and a new CA) stays valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

fn certs(args: &CertsArgs) -> anyhow::Result<ExitCode> {
    let hosts = if args.hosts.is_empty() {
        vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ]
    } else {
        args.hosts.clone()
    };
    let files = crate::tls::write_certs(&args.dir, &args.name, &hosts, args.days)?;
    println!("CA           {}", files.ca.display());
    println!(
        "certificate  {} (for {})",
        files.cert.display(),
        hosts.join(", ")
    );
    println!("key          {}", files.key.display());
    Ok(ExitCode::SUCCESS)
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

/// Set once every node of this process is being stopped (`waft dev`'s Ctrl-C): from then on,
/// openraft's own lines about cores and peers that are stopping say nothing worth reading.
static STOPPING_ALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Drops openraft's log lines from now on (every node of the process is stopping).
pub(crate) fn quiet_openraft() {
    STOPPING_ALL.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Sets up logging to stderr with the given filter.
pub fn init_logging(filter: &str) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let stopping = tracing_subscriber::filter::filter_fn(|meta| {
        !(STOPPING_ALL.load(std::sync::atomic::Ordering::Relaxed)
            && meta.target().starts_with("openraft"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(stopping);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
}

/// The log filter asked for, with openraft's heartbeat warnings turned down unless it names
/// openraft itself: while a peer is down, openraft warns at every heartbeat (several lines a
/// second per peer), and its replication errors already say the peer is unreachable.
fn log_filter(asked: &str) -> String {
    if asked.contains("openraft") {
        asked.to_owned()
    } else {
        format!("{asked},openraft::core::heartbeat=error")
    }
}

/// A client command whose output goes to a reader that stops early (`waft watch | head`)
/// ends quietly with status 141 (128 + SIGPIPE, as a shell reports it), as other command-line
/// tools do, instead of panicking on the next print. SIGPIPE itself stays ignored: network
/// writes (hyper writes with `writev`) would raise it when a server drops the connection.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    init_logging(&cli.log);
    if !matches!(cli.command, Command::Node(_) | Command::Dev(_)) {
        quiet_on_closed_pipe();
    }
    let local_output = matches!(cli.command, Command::Check(_) | Command::Exec(_));
    let result = match cli.command {
        Command::Check(args) => guest::check(&args),
        Command::Exec(args) => guest::exec(&args),
        Command::Certs(args) => certs(&args),
        command => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(run_async(&cli.client, command)),
            Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
        },
    };
    match result {
        Ok(code) => code,
        // The reader of their output went away (see `quiet_on_closed_pipe`): `check` and
        // `exec` write with `writeln!` and return the error. (Not for network commands: a
        // broken pipe there is a connection's, and must be reported.)
        Err(e)
            if local_output
                && e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                }) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_async(flags: &connect::ClientArgs, command: Command) -> anyhow::Result<ExitCode> {
    if let Command::Dev(args) = &command {
        // It makes its own certificates with --tls, and connects with them.
        return node::dev(args, flags.token.as_deref()).await;
    }
    let client = &connect::Client::from_args(flags)?;
    match command {
        Command::Node(args) => node::node(&args, flags.token.clone(), flags.tls()?).await,
        Command::Deploy(args) => client::deploy(client, &args).await,
        Command::Submit(args) => client::submit(client, &args).await,
        Command::Query(args) => client::query(client, &args).await,
        Command::Watch(args) => client::watch(client, &args).await,
        Command::Services => client::services(client).await,
        Command::Rollback(args) => client::rollback(client, &args).await,
        Command::Cluster(c) => admin::cluster(client, &c).await,
        Command::Bench(args) => bench::bench(client, &args).await,
        Command::BenchWatch(args) => bench_events::bench_watch(client.output, &args).await,
        Command::BenchTimers(args) => bench_events::bench_timers(client.output, &args).await,
        Command::Backup(args) => backup::backup(client, &args).await,
        Command::Restore(args) => backup::restore(client, &args).await,
        Command::Check(_) | Command::Exec(_) | Command::Certs(_) | Command::Dev(_) => {
            unreachable!("handled above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn heartbeat_warnings_are_turned_down_unless_openraft_is_named() {
        assert_eq!(log_filter("warn"), "warn,openraft::core::heartbeat=error");
        assert_eq!(
            log_filter("info,waft=debug"),
            "info,waft=debug,openraft::core::heartbeat=error"
        );
        assert_eq!(log_filter("openraft=debug"), "openraft=debug");
        for f in ["warn", "info,waft=debug"] {
            assert!(
                tracing_subscriber::EnvFilter::try_new(log_filter(f)).is_ok(),
                "{f}"
            );
        }
    }
}
