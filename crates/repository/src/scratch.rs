//! Blob bodies a preflight read and proved, kept on local disk so that the restore of the same
//! run does not read them from the repository a second time.
//!
//! A scratch is one directory of files named by their sha256, written through object_store's
//! local file system (a part file renamed into place once complete, so a half-written blob
//! never carries a blob's name). It is bounded: it keeps at most its limit, and never more than
//! half the space its file system had free when it was opened; a blob that does not fit is
//! proved all the same and simply not kept. Nothing in it is trusted: the restore hashes every
//! body it takes from the scratch again, and reads the repository's copy when they differ.
//! Which directories exist and when they are removed is the caller's (the objects agent keeps
//! one per run).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::{GetResult, ObjectStore, ObjectStoreExt, WriteMultipart};

/// Parts a kept blob is written in.
const PART: usize = 8 << 20;

/// A directory of proved blob bodies. Cheap to clone.
#[derive(Clone)]
pub struct BlobScratch {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    store: Arc<dyn ObjectStore>,
    limit: u64,
    used: AtomicU64,
}

impl std::fmt::Debug for BlobScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobScratch")
            .field("dir", &self.inner.dir)
            .field("limit", &self.inner.limit)
            .field("used", &self.used())
            .finish()
    }
}

impl BlobScratch {
    /// Opens `dir`, creating it, to hold at most `limit` bytes (what it already holds counts),
    /// and no more than half the space free on its file system now.
    pub async fn open(dir: &Path, limit: u64) -> Result<BlobScratch> {
        let shown = dir.display().to_string();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the blob scratch directory {shown}"))?;
        let store: Arc<dyn ObjectStore> = Arc::new(
            LocalFileSystem::new_with_prefix(dir)
                .with_context(|| format!("open the blob scratch directory {shown}"))?,
        );
        let used: u64 = store
            .list(None)
            .map_ok(|meta| meta.size)
            .try_fold(0u64, |sum, size| async move { Ok(sum + size) })
            .await
            .with_context(|| format!("list the blob scratch directory {shown}"))?;
        let free = free_bytes(dir).unwrap_or(0);
        let limit = limit.min(used.saturating_add(free / 2));
        Ok(BlobScratch {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                store,
                limit,
                used: AtomicU64::new(used),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes of blobs held (or being written).
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// The most it will hold.
    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Claims `size` bytes of room; false when that would pass the limit.
    fn reserve(&self, size: u64) -> bool {
        self.inner
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(size).filter(|&n| n <= self.inner.limit)
            })
            .is_ok()
    }

    fn release(&self, size: u64) {
        let _ = self
            .inner
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(size))
            });
    }

    /// Starts keeping blob `sha` of `size` bytes; `None` when it does not fit or the file
    /// cannot be started (the blob is then read from the repository when needed).
    pub(crate) async fn keep(&self, sha: &str, size: u64) -> Option<Keeper> {
        if !self.reserve(size) {
            return None;
        }
        match self
            .inner
            .store
            .put_multipart(&object_store::path::Path::from(sha))
            .await
        {
            Ok(upload) => Some(Keeper {
                scratch: self.clone(),
                writer: Some(WriteMultipart::new_with_chunk_size(upload, PART)),
                size,
            }),
            Err(e) => {
                self.release(size);
                tracing::warn!(
                    dir = %self.inner.dir.display(),
                    "start keeping blob {sha} in scratch: {e}"
                );
                None
            }
        }
    }

    /// The kept body of blob `sha` when the scratch holds one of `size` bytes. Its content is
    /// the caller's to check.
    pub(crate) async fn get(&self, sha: &str, size: u64) -> Option<GetResult> {
        match self
            .inner
            .store
            .get(&object_store::path::Path::from(sha))
            .await
        {
            Ok(got) if got.meta.size == size => Some(got),
            Ok(_) => {
                self.discard(sha, None).await;
                None
            }
            Err(_) => None,
        }
    }

    /// Removes the kept body of blob `sha` (damaged, or no longer needed); `size` when known
    /// gives its room back.
    pub(crate) async fn discard(&self, sha: &str, size: Option<u64>) {
        let path = object_store::path::Path::from(sha);
        let size = match size {
            Some(size) => Some(size),
            None => self.inner.store.head(&path).await.ok().map(|m| m.size),
        };
        if self.inner.store.delete(&path).await.is_ok()
            && let Some(size) = size
        {
            self.release(size);
        }
    }
}

/// One blob being written into the scratch while it is hashed. Dropped without `commit`, its
/// part file is removed and its room given back.
pub(crate) struct Keeper {
    scratch: BlobScratch,
    writer: Option<WriteMultipart>,
    size: u64,
}

impl Keeper {
    /// Adds a chunk. On a write error the blob is no longer kept (the proof goes on).
    pub(crate) async fn write(&mut self, chunk: Bytes) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        match writer.wait_for_capacity(2).await {
            Ok(()) => writer.put(chunk),
            Err(e) => {
                tracing::warn!(
                    dir = %self.scratch.inner.dir.display(),
                    "write to the blob scratch, the blob is not kept: {e}"
                );
                self.abandon().await;
            }
        }
    }

    /// Puts the written blob in place under its name; false when it could not be.
    pub(crate) async fn commit(mut self) -> bool {
        let Some(writer) = self.writer.take() else {
            return false;
        };
        match writer.finish().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    dir = %self.scratch.inner.dir.display(),
                    "complete a blob in scratch, the blob is not kept: {e}"
                );
                self.scratch.release(self.size);
                false
            }
        }
    }

    /// Stops writing and removes what was written.
    pub(crate) async fn abandon(&mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = writer.abort().await;
            self.scratch.release(self.size);
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // The upload's own drop removes its part file.
        if self.writer.take().is_some() {
            self.scratch.release(self.size);
        }
    }
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
}
