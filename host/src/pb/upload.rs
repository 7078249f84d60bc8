//! Uploads: a header, then the bytes in chunks (`Deploy` carries a module, `Restore` a
//! backup, node-to-node `PrepareModule` a module). One reader for all, so all refuse the same
//! malformed streams the same way.

use crate::pb::{api, raft};
use tonic::{Status, Streaming};

/// One message of an upload stream: its header or a piece of the bytes.
#[derive(Debug)]
pub enum Part<H> {
    Header(H),
    Data(Vec<u8>),
}

/// A chunk type of an upload stream and its header's announced size.
pub trait Chunk: Send + 'static {
    type Header;
    /// What the chunk is; `None` for a chunk with nothing in it.
    fn part(self) -> Option<Part<Self::Header>>;
    /// The number of bytes the header announces.
    fn size(header: &Self::Header) -> u64;
}

impl Chunk for api::DeployChunk {
    type Header = api::DeployHeader;
    fn part(self) -> Option<Part<api::DeployHeader>> {
        use api::deploy_chunk::Kind;
        self.kind.map(|k| match k {
            Kind::Header(h) => Part::Header(h),
            Kind::Data(d) => Part::Data(d),
        })
    }
    fn size(header: &api::DeployHeader) -> u64 {
        header.size
    }
}

impl Chunk for raft::ModuleChunk {
    type Header = raft::ModuleHeader;
    fn part(self) -> Option<Part<raft::ModuleHeader>> {
        use raft::module_chunk::Kind;
        self.kind.map(|k| match k {
            Kind::Header(h) => Part::Header(h),
            Kind::Data(d) => Part::Data(d),
        })
    }
    fn size(header: &raft::ModuleHeader) -> u64 {
        header.size
    }
}

impl Chunk for api::BackupChunk {
    type Header = api::BackupHeader;
    fn part(self) -> Option<Part<api::BackupHeader>> {
        use api::backup_chunk::Kind;
        self.kind.map(|k| match k {
            Kind::Header(h) => Part::Header(h),
            Kind::Data(d) => Part::Data(d),
        })
    }
    fn size(header: &api::BackupHeader) -> u64 {
        header.size
    }
}

/// What is uploaded, for errors: `call` names the stream ("deploy"), `item` its bytes
/// ("module").
#[derive(Debug)]
pub struct Upload<'a> {
    /// The stream, for errors ("deploy").
    pub call: &'a str,
    /// Its bytes, for errors ("module").
    pub item: &'a str,
    /// Largest size accepted, in bytes.
    pub max: u64,
    /// How long the sender may take to send the next chunk (`None`: the call's deadline).
    pub chunk_timeout: Option<std::time::Duration>,
}

impl Upload<'_> {
    /// The next chunk, or an error when none comes within the chunk timeout.
    async fn next<C: Chunk>(&self, input: &mut Streaming<C>) -> Result<Option<C>, Status> {
        match self.chunk_timeout {
            None => input.message().await,
            Some(t) => tokio::time::timeout(t, input.message())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "no {} chunk for {t:?}; upload abandoned",
                        self.call
                    ))
                })?,
        }
    }

    /// Reads the header; `check` refuses a bad one before any byte is read; then the bytes,
    /// exactly as many as the header announced (at most `max`, which is checked first, so a
    /// stream that lies costs no more memory than its header allows).
    pub async fn read<C: Chunk>(
        &self,
        input: &mut Streaming<C>,
        check: impl FnOnce(&C::Header) -> Result<(), Status>,
    ) -> Result<(C::Header, Vec<u8>), Status> {
        let call = self.call;
        let header = match self.next(input).await?.and_then(Chunk::part) {
            Some(Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "a {call} stream must start with its header"
                )));
            }
        };
        check(&header)?;
        let size = C::size(&header);
        if size > self.max {
            return Err(Status::resource_exhausted(format!(
                "{} of {size} bytes is over the {}-byte limit",
                self.item, self.max
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        while let Some(chunk) = self.next(input).await? {
            let Some(Part::Data(data)) = chunk.part() else {
                return Err(Status::invalid_argument(format!(
                    "a {call} header may only come first"
                )));
            };
            if (bytes.len() + data.len()) as u64 > size {
                return Err(Status::invalid_argument(format!(
                    "the {call} stream is longer than the {size} bytes its header announced"
                )));
            }
            bytes.extend_from_slice(&data);
        }
        if bytes.len() as u64 != size {
            return Err(Status::invalid_argument(format!(
                "the {call} stream ended after {} of {size} bytes",
                bytes.len()
            )));
        }
        Ok((header, bytes))
    }
}
