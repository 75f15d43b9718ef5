//! Commit numbers: the order in which the repository committed its points, independent of any
//! machine's clock.
//!
//! A point's wall-clock stamp says when the machine that wrote it *thought* it was; a point
//! taken while a clock ran fast would otherwise sort after every newer point until real time
//! caught up. So each point carries a commit number instead, and "newest" means "highest
//! number".
//!
//! The rule: a writer lists `sequence/`, takes 1 + the highest number there and claims it by
//! writing `sequence/<n>` with a create-only put (`PutMode::Create`: `If-None-Match: *` on
//! S3 and Azure, a generation precondition on GCS, a hard link on a local directory). If
//! another writer got there first the put fails with `AlreadyExists` and it tries `n + 1`, so
//! two racing writers (a scheduled backup and a break-glass `rollcall repo backup-postgres`)
//! get distinct numbers, in the order their claims landed. The number is claimed right before
//! the point file is written; a writer that dies in between leaves a gap, which is harmless.
//!
//! A store that cannot put create-only (`NotImplemented`/`NotSupported`) gets a plain put of
//! the same marker: two racing writers may then share a number, and such ties are ordered by
//! stamp, then id. An S3-compatible service that ignores `If-None-Match` behaves the same.
//! Prune deletes old markers but always keeps the newest [`SEQUENCE_KEPT`], so the highest
//! number is never deleted and numbers only grow; a point carries its own number, so a marker
//! is not needed to order it once it is written.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{PutMode, PutPayload};
use serde::{Deserialize, Serialize};

use crate::layout::{PointId, SEQUENCE, sequence_key, sequence_of};
use crate::repo::{Repository, encode_document};
use crate::store::retry;

const FORMAT: &str = "rollcall.sequence.v1";

/// Numbers tried past the highest listed before giving up (each failure means another writer
/// committed meanwhile; this many in one commit means something is wrong).
const CLAIM_ATTEMPTS: u64 = 64;

/// Markers prune keeps below and including the highest: the highest keeps numbers growing, the
/// rest keep recent claims recognisable to a writer retrying its own put.
pub(crate) const SEQUENCE_KEPT: u64 = 64;

/// What `sequence/<n>` holds: who claimed the number, so a writer whose put was acknowledged
/// late (a retry after a lost answer) recognises its own claim.
#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    point: PointId,
    claimed_at: DateTime<Utc>,
}

impl Repository {
    /// The highest commit number claimed so far (0 when none).
    pub(crate) async fn highest_sequence(&self) -> Result<u64> {
        let prefix = Path::from(SEQUENCE);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("list commit numbers in repository {}", self.label))?;
        Ok(metas
            .iter()
            .filter_map(|m| sequence_of(&m.location))
            .max()
            .unwrap_or(0))
    }

    /// The markers prune may delete: every one more than [`SEQUENCE_KEPT`] below the highest.
    /// (A claim always goes above the highest listed, so deleting older markers never lets a
    /// number be claimed twice.)
    pub(crate) async fn stale_sequence_markers(&self) -> Result<Vec<Path>> {
        let prefix = Path::from(SEQUENCE);
        let numbered: Vec<(u64, Path)> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| sequence_of(&m.location).map(|n| (n, m.location)))
            .try_collect::<Vec<_>>()
            .await
            .with_context(|| format!("list commit numbers in repository {}", self.label))?
            .into_iter()
            .flatten()
            .collect();
        let highest = numbered.iter().map(|(n, _)| *n).max().unwrap_or(0);
        Ok(numbered
            .into_iter()
            .filter(|(n, _)| n.saturating_add(SEQUENCE_KEPT) <= highest)
            .map(|(_, key)| key)
            .collect())
    }

    /// Claims the next commit number for `point` (see the module doc for the rule).
    pub(crate) async fn claim_sequence(&self, point: &PointId) -> Result<u64> {
        let first = self.highest_sequence().await?.saturating_add(1);
        let claim = Claim {
            point: point.clone(),
            claimed_at: Utc::now(),
        };
        let body = bytes::Bytes::from(encode_document(FORMAT, &claim)?);
        for n in first..first.saturating_add(CLAIM_ATTEMPTS) {
            let key = sequence_key(n);
            let created = retry(&self.options.retry, "claim a commit number", || async {
                self.store
                    .put_opts(
                        &key,
                        PutPayload::from_bytes(body.clone()),
                        PutMode::Create.into(),
                    )
                    .await
                    .map_err(anyhow::Error::from)
            })
            .await;
            let Err(e) = created else {
                return Ok(n);
            };
            match e.downcast_ref::<object_store::Error>() {
                Some(object_store::Error::AlreadyExists { .. }) => {
                    if self.claimed_by(&key, point).await {
                        return Ok(n);
                    }
                    tracing::debug!(n, "commit number taken by another writer, trying the next");
                }
                Some(
                    object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. },
                ) => {
                    tracing::warn!(
                        repository = %self.label,
                        "the store cannot create an object only if it is missing: a point \
                         committed at the same moment may share number {n} (ordered by stamp)"
                    );
                    retry(&self.options.retry, "write a commit number", || async {
                        self.store
                            .put_opts(
                                &key,
                                PutPayload::from_bytes(body.clone()),
                                PutMode::Overwrite.into(),
                            )
                            .await
                            .map_err(anyhow::Error::from)
                    })
                    .await
                    .with_context(|| format!("write {key} to repository {}", self.label))?;
                    return Ok(n);
                }
                _ => {
                    return Err(e.context(format!(
                        "claim commit number {n} ({key}) in repository {}",
                        self.label
                    )));
                }
            }
        }
        bail!(
            "could not claim a commit number for point {point} in repository {}: numbers \
             {first} to {} were all taken while it tried; check for a writer looping on this \
             repository and commit the point again",
            self.label,
            first.saturating_add(CLAIM_ATTEMPTS - 1)
        )
    }

    /// Whether the marker at `key` names `point` (our own put, acknowledged too late).
    async fn claimed_by(&self, key: &Path, point: &PointId) -> bool {
        match self
            .get_document::<Claim>(key, FORMAT, "commit number")
            .await
        {
            Ok((claim, _, _)) => &claim.point == point,
            Err(_) => false,
        }
    }
}
