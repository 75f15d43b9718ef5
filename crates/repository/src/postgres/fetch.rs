//! Reading dumps back out of the repository: each archive streamed, checked against the
//! point's size and sha256 and decompressed, into a file or into a process's input.

use std::io::Write;
use std::path::Path as FsPath;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::Archive;
use crate::layout::PointId;
use crate::pipe::{ChannelReader, copy_large};
use crate::repo::Repository;
use crate::store::retry;

/// Fetches a point's dump, checks its sha256 and decompresses it into `dest`: a custom-format
/// archive `pg_restore` reads directly, or for a parallel dump a directory holding one such
/// archive per file (`schema.dump`, `data.dump`, `data-1.dump`, ...; restore `--section=pre-data`
/// of the schema, then the data archives, then `--section=post-data` of the schema). `dest`
/// appears only when complete and correct. Returns the archive bytes written.
pub async fn fetch_dump(repo: &Repository, point: &PointId, dest: &FsPath) -> Result<u64> {
    let found = repo.read_point(point).await?;
    let Some(part) = found.postgres else {
        bail!("point {point} has no Postgres backup");
    };
    if part.files.is_empty() {
        let archive = part.archives().remove(0);
        return fetch_archive(repo, &archive, dest, true).await;
    }
    let partial = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("create directory {}", partial.display()))?;
    let result = async {
        let mut total = 0;
        for archive in part.archives() {
            let name = archive
                .key
                .rsplit('/')
                .next()
                .unwrap_or(&archive.key)
                .trim_end_matches(".zst")
                .to_owned();
            total += fetch_archive(repo, &archive, &partial.join(name), true).await?;
        }
        std::fs::rename(&partial, dest)
            .with_context(|| format!("move the archives to {}", dest.display()))?;
        Ok(total)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

/// Fetches one archive into the file `dest`, checked and decompressed; `dest` appears only
/// when complete and correct (and fsync'd with `sync`).
pub(super) async fn fetch_archive(
    repo: &Repository,
    archive: &Archive,
    dest: &FsPath,
    sync: bool,
) -> Result<u64> {
    let partial = dest.with_extension("partial");
    let file =
        std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let sink: Sink = if sync {
        Box::new(SyncingFile(file))
    } else {
        Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
    };
    let (result, sink) = download_dump(repo, archive, sink).await;
    drop(sink);
    match result {
        Ok(n) => {
            std::fs::rename(&partial, dest)
                .with_context(|| format!("move the archive to {}", dest.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// A file that is fsync'd when dropped after a complete write.
struct SyncingFile(std::fs::File);

impl Write for SyncingFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.write(data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.0.sync_all()
    }
}

/// A writer handed back after use, so the caller decides when it closes (closing a child's
/// stdin is end of input for it).
pub(crate) type Sink = Box<dyn Write + Send>;

/// Streams one archive out of the repository into `sink`, decompressing it, and fails if its
/// size or sha256 differ from the point's. Returns the bytes written to `sink`, and the sink.
pub(crate) async fn download_dump(
    repo: &Repository,
    part: &Archive,
    sink: Sink,
) -> (Result<u64>, Option<Sink>) {
    let key = Path::from(part.key.as_str());
    let got = retry(&repo.options.retry, "open dump", || async {
        repo.store.get(&key).await.map_err(anyhow::Error::from)
    })
    .await
    .with_context(|| format!("read dump {key} from repository {}", repo.label));
    let got = match got {
        Ok(got) => got,
        Err(e) => return (Err(e), Some(sink)),
    };
    let mut stream = crate::body::body_stream(got);

    let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(8);
    let compressed = part.compressed;
    let writer = tokio::task::spawn_blocking(move || -> (std::io::Result<u64>, Sink) {
        let mut sink = sink;
        let copy = || -> std::io::Result<u64> {
            let reader = ChannelReader::new(rx);
            let written = if compressed {
                let mut decoder = zstd::stream::read::Decoder::new(reader)?;
                copy_large(&mut decoder, &mut sink)?
            } else {
                let mut reader = reader;
                copy_large(&mut reader, &mut sink)?
            };
            sink.flush()?;
            Ok(written)
        };
        let result = copy();
        (result, sink)
    });

    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut failure: Option<anyhow::Error> = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the consumer failed; its error is reported below
                }
            }
            Err(e) => {
                let _ = tx.send(Err("reading the dump failed".into())).await;
                failure = Some(repo.read_failure("dump", &key, anyhow::Error::new(e)));
                break;
            }
        }
    }
    if failure.is_none() {
        let actual = hex::encode(hasher.finalize());
        if size != part.size || actual != part.sha256 {
            let reason = format!(
                "dump {key} in repository {} does not match the point ({size} bytes with \
                 sha256 {actual}; the point recorded {} bytes with sha256 {}): it is damaged; \
                 restore from another point",
                repo.label, part.size, part.sha256
            );
            let _ = tx.send(Err(reason.clone())).await;
            failure = Some(anyhow::anyhow!(reason));
        }
    }
    drop(tx);
    let (written, sink) = match writer.await {
        Ok((written, sink)) => (written, Some(sink)),
        Err(e) => {
            let e = anyhow::Error::new(e).context("decompress the dump");
            return (Err(failure.unwrap_or(e)), None);
        }
    };
    if let Some(e) = failure {
        return (Err(e), sink);
    }
    (
        written.with_context(|| format!("decompress dump {key} and hand it to its reader")),
        sink,
    )
}
