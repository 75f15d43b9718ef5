//! Repository locks, so a prune never deletes a blob that a running snapshot is about to rely on.
//!
//! A snapshot skips copying any body already in `blobs/`; if a prune swept that blob before the
//! snapshot's manifest was written, the new point would name a missing blob. Snapshots hold a
//! *shared* lock, the prune an *exclusive* one. Each side writes its lock file first and then
//! lists the others, so of two racing parties at least one sees the other and backs off. Locks
//! are refreshed while held and expire after `lock_ttl`, so a killed process blocks nobody for
//! long.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::layout::LOCKS;
use crate::repo::{RepoError, Repository};

const FORMAT: &str = "rollcall.lock.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LockKind {
    Shared,
    Exclusive,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockFile {
    kind: LockKind,
    purpose: String,
    host: String,
    pid: u32,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl LockFile {
    fn describe(&self) -> String {
        format!(
            "a {} lock for {} taken by {} (pid {}) at {}",
            match self.kind {
                LockKind::Shared => "shared",
                LockKind::Exclusive => "exclusive",
            },
            self.purpose,
            self.host,
            self.pid,
            self.created_at.to_rfc3339()
        )
    }
}

/// A held lock. Call [`LockGuard::release`]; dropping it only stops the refresh and deletes
/// the lock file in the background.
pub(crate) struct LockGuard {
    repo: Repository,
    key: Path,
    refresher: Option<JoinHandle<()>>,
    lost: Arc<AtomicBool>,
}

impl LockGuard {
    /// Fails when the lock could not be refreshed in time: someone else may have taken a
    /// conflicting lock since, so the work it protects must not be committed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            anyhow::bail!(
                "lost the repository lock {} (it could not be refreshed before it expired): \
                 the repository may be unreachable; run the operation again",
                self.key
            );
        }
        Ok(())
    }

    pub(crate) async fn release(mut self) -> Result<()> {
        if let Some(task) = self.refresher.take() {
            task.abort();
        }
        let key = self.key.clone();
        self.repo
            .store
            .delete(&key)
            .await
            .with_context(|| format!("release lock {key}"))
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.take() {
            task.abort();
            // Released without `release()` (an error path or cancellation): remove the file
            // in the background if we still can; otherwise it expires on its own.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let store = self.repo.store.clone();
                let key = self.key.clone();
                runtime.spawn(async move {
                    let _ = store.delete(&key).await;
                });
            }
        }
    }
}

impl Repository {
    /// Takes a lock, waiting up to `lock_wait` for conflicting locks to go away.
    pub(crate) async fn lock(&self, kind: LockKind, purpose: &str) -> Result<LockGuard> {
        let ttl = self.options.lock_ttl;
        let deadline = tokio::time::Instant::now() + self.options.lock_wait;
        let key = Path::from(format!("{LOCKS}/{}.json", uuid::Uuid::new_v4()));
        let mut delay = Duration::from_millis(200);
        loop {
            let mine = self.lock_file(kind, purpose, Utc::now())?;
            self.put_document(&key, FORMAT, &mine)
                .await
                .context("take a repository lock")?;
            match self.conflicting_lock(kind, &key).await {
                Ok(None) => {
                    let lost = Arc::new(AtomicBool::new(false));
                    let refresher =
                        tokio::spawn(refresh(self.clone(), key.clone(), mine, ttl, lost.clone()));
                    return Ok(LockGuard {
                        repo: self.clone(),
                        key,
                        refresher: Some(refresher),
                        lost,
                    });
                }
                Ok(Some(other)) => {
                    self.store
                        .delete(&key)
                        .await
                        .with_context(|| format!("withdraw lock {key}"))?;
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(RepoError::Busy {
                            repo: self.label.to_string(),
                            holder: other.describe(),
                            expires_at: other.expires_at.to_rfc3339(),
                        }
                        .into());
                    }
                    tracing::info!(holder = other.describe(), "repository is locked, waiting");
                    let jitter = Duration::from_millis(rand::random::<u64>() % 200);
                    tokio::time::sleep(delay + jitter).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let _ = self.store.delete(&key).await;
                    return Err(e);
                }
            }
        }
    }

    fn lock_file(&self, kind: LockKind, purpose: &str, now: DateTime<Utc>) -> Result<LockFile> {
        let ttl = chrono::Duration::from_std(self.options.lock_ttl)
            .context("lock_ttl is out of range")?;
        Ok(LockFile {
            kind,
            purpose: purpose.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            created_at: now,
            expires_at: now + ttl,
        })
    }

    /// A live lock other than `mine` that conflicts with taking `kind`.
    async fn conflicting_lock(&self, kind: LockKind, mine: &Path) -> Result<Option<LockFile>> {
        let prefix = Path::from(LOCKS);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .context("list repository locks")?;
        let now = Utc::now();
        for meta in metas {
            if &meta.location == mine || meta.location.extension() != Some("json") {
                continue;
            }
            let other: LockFile = match self.get_document(&meta.location, FORMAT, "lock file").await
            {
                Ok((lock, _, _)) => lock,
                // Released between our listing and our read.
                Err(e) if matches!(e.downcast_ref(), Some(RepoError::NotFound { .. })) => continue,
                Err(e) if matches!(e.downcast_ref(), Some(RepoError::Damaged { .. })) => {
                    // Unreadable: treat as exclusive until it is older than any live lock.
                    let ttl = chrono::Duration::from_std(self.options.lock_ttl)
                        .context("lock_ttl is out of range")?;
                    if meta.last_modified + ttl < now {
                        continue;
                    }
                    LockFile {
                        kind: LockKind::Exclusive,
                        purpose: format!("an unreadable lock file {}", meta.location),
                        host: "unknown".into(),
                        pid: 0,
                        created_at: meta.last_modified,
                        expires_at: meta.last_modified + ttl,
                    }
                }
                Err(e) => return Err(e),
            };
            if other.expires_at < now {
                continue;
            }
            if kind == LockKind::Exclusive || other.kind == LockKind::Exclusive {
                return Ok(Some(other));
            }
        }
        Ok(None)
    }
}

async fn refresh(
    repo: Repository,
    key: Path,
    mut lock: LockFile,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    let period = ttl / 3;
    loop {
        tokio::time::sleep(period).await;
        let now = Utc::now();
        if now > lock.expires_at {
            lost.store(true, Ordering::SeqCst);
        }
        let Ok(ttl) = chrono::Duration::from_std(ttl) else {
            lost.store(true, Ordering::SeqCst);
            return;
        };
        let next = LockFile {
            expires_at: now + ttl,
            ..lock.clone()
        };
        match repo.put_document(&key, FORMAT, &next).await {
            Ok(_) => lock = next,
            Err(e) => tracing::warn!("refresh repository lock {key}: {e:#}"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}
