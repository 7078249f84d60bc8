//! `waft backup` and `waft restore` (online, or offline into an empty data directory).

use super::connect::{Client, Output, retrying};
use crate::pb::api::{self, cluster_client::ClusterClient};
use anyhow::Context;
use clap::Args;
use std::process::ExitCode;

/// Arguments of `waft backup`.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("backup_to")
        .required(true)
        .args(["file", "backup_file"])
))]
pub struct BackupArgs {
    /// Write the backup here (written to FILE.partial, renamed once complete and verified).
    #[arg(value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
    /// The same as FILE, as a flag (the form of earlier releases).
    #[arg(short = 'o', long = "file", id = "backup_file", value_name = "FILE")]
    pub file_flag: Option<std::path::PathBuf>,
}

impl BackupArgs {
    /// Where the backup goes (FILE or --file; clap requires one of them).
    fn path(&self) -> &std::path::Path {
        self.file
            .as_deref()
            .or(self.file_flag.as_deref())
            .expect("clap requires FILE or --file")
    }
}

/// Arguments of `waft restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file written by `waft backup`.
    pub file: std::path::PathBuf,
    /// Replace the services the cluster runs now.
    #[arg(long, conflicts_with = "data_dir")]
    pub force: bool,
    /// Offline: seed this empty data directory with the backup instead, as node --id of a new
    /// one-node cluster; start `waft node` on it, then add nodes with --join.
    #[arg(long, value_name = "DIR", requires = "id")]
    pub data_dir: Option<std::path::PathBuf>,
    /// With --data-dir: the node id the directory is for.
    #[arg(long, requires = "data_dir")]
    pub id: Option<u64>,
    /// With --data-dir: the address the node will be reached at (its --advertise, or its
    /// --listen address).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:7001",
        requires = "data_dir"
    )]
    pub advertise: String,
}

/// `waft backup`.
pub async fn backup(client: &Client, args: &BackupArgs) -> anyhow::Result<ExitCode> {
    use api::backup_chunk::Kind;
    let c = ClusterClient::new(client.connect().await?).max_decoding_message_size(usize::MAX);
    let mut stream = retrying(|| {
        let mut c = c.clone();
        async move { c.backup(api::BackupRequest {}).await }
    })
    .await
    .map_err(|s| client.status_error(s))?
    .into_inner();
    let header = match stream
        .message()
        .await
        .map_err(|s| client.status_error(s))?
        .and_then(|m| m.kind)
    {
        Some(Kind::Header(h)) => h,
        _ => anyhow::bail!("the node sent a backup without a header"),
    };
    let bar = super::progress::bytes(client.output, "backup", header.size);
    let mut bytes = Vec::with_capacity(header.size as usize);
    while let Some(chunk) = stream.message().await.map_err(|s| client.status_error(s))? {
        if let Some(Kind::Data(d)) = chunk.kind {
            bytes.extend_from_slice(&d);
            if let Some(b) = &bar {
                b.set_position(bytes.len() as u64);
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    anyhow::ensure!(
        bytes.len() as u64 == header.size,
        "the backup stream ended after {} of {} bytes",
        bytes.len(),
        header.size
    );
    let summary = crate::storage::snapshot::Reader::from_bytes(&bytes)
        .context("the backup received does not verify")?;
    let file = args.path();
    let partial = {
        let mut p = file.as_os_str().to_owned();
        p.push(".partial");
        std::path::PathBuf::from(p)
    };
    std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, file).with_context(|| format!("renaming to {}", file.display()))?;
    let services: Vec<String> = summary
        .header
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect();
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"file": file, "bytes": bytes.len(), "index": header.index, "services": services})
        ),
        Output::Text => println!(
            "backup of {} service(s) [{}] at log index {} written to {} ({})",
            services.len(),
            services.join(", "),
            header.index,
            file.display(),
            super::output::size(bytes.len() as u64)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `waft restore --data-dir`: seeds a data directory offline.
async fn seed(
    client: &Client,
    args: &RestoreArgs,
    dir: &std::path::Path,
    id: u64,
    bytes: Vec<u8>,
) -> anyhow::Result<ExitCode> {
    let config = crate::node::NodeConfig::new(id, dir);
    let (index, services) =
        crate::node::Node::seed_from_backup(config, args.advertise.clone(), bytes).await?;
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"index": index, "services": services, "data_dir": dir, "id": id})
        ),
        Output::Text => {
            println!(
                "seeded {} as node {id} of a new cluster: {} service(s) [{}] at log index {index}",
                dir.display(),
                services.len(),
                services.join(", "),
            );
            println!(
                "start it with `waft node --id {id} --data-dir {} --listen {}`, then add nodes \
                 with `--join {}`",
                dir.display(),
                args.advertise,
                args.advertise
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `waft restore`.
pub async fn restore(client: &Client, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    crate::storage::snapshot::Reader::from_bytes(&bytes)
        .with_context(|| format!("{} is not a usable backup", args.file.display()))?;
    if let (Some(dir), Some(id)) = (&args.data_dir, args.id) {
        return seed(client, args, dir, id, bytes).await;
    }
    let c = ClusterClient::new(client.connect().await?).max_encoding_message_size(usize::MAX);
    let chunks = crate::api::restore_chunks(&bytes, args.force);
    // On a terminal: the upload counted, then the wait while the cluster applies the backup.
    let spinner = super::progress::spinner(client.output, "uploading");
    let total = bytes.len() as u64;
    let reply = retrying(|| {
        let mut c = c.clone();
        let chunks = chunks.clone();
        let counted = spinner.clone().map(|s| super::progress::upload(s, total));
        if let Some(count) = &counted {
            count(None);
        }
        let spinner = spinner.clone();
        use futures::StreamExt;
        let outgoing = futures::stream::iter(chunks).inspect(move |chunk| {
            if let (Some(count), Some(api::backup_chunk::Kind::Data(d))) = (&counted, &chunk.kind) {
                count(Some(d.len() as u64));
            }
        });
        // After the last chunk: what the wait is for.
        let outgoing = outgoing
            .map(Some)
            .chain(futures::stream::once(async move {
                if let Some(s) = spinner {
                    s.set_message("the cluster restores the backup (every node at the same entry)");
                }
                None
            }))
            .filter_map(futures::future::ready);
        async move { c.restore(outgoing).await }
    })
    .await
    .map_err(|s| client.status_error(s));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let reply = reply?.into_inner();
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"index": reply.index, "services": reply.services})
        ),
        Output::Text => println!(
            "restored {} service(s) [{}] at log index {}",
            reply.services.len(),
            reply.services.join(", "),
            reply.index
        ),
    }
    Ok(ExitCode::SUCCESS)
}
