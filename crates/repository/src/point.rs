//! Recovery points: one file per point naming a Postgres dump, an object snapshot, the secret
//! references and the table counts. The point file is written last, in one atomic put, after
//! every part it names is checked to be complete; so a point exists only when it is whole, and
//! listing never shows a partial one.
//!
//! Points are ordered by the number the repository gave them when it committed them
//! (`sequence`, see `sequence.rs`), never by their stamps: the stamp is one machine's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::layout::{POINTS, PointId, point_key};
use crate::postgres::PgBackupPart;
use crate::repo::{RepoError, Repository, is_not_found};
use crate::secrets::SecretRef;
use crate::snapshot::ObjectSnapshotPart;

pub(crate) const POINT_FORMAT: &str = "rollcall.point.v1";

/// How far a point's stamp may be ahead of the reading machine's clock before it is flagged as
/// stamped in the future (clocks kept by NTP agree far better than this).
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(60);

/// A recovery point as stored in `points/<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub id: PointId,
    pub environment: String,
    /// When the point was committed (after all its parts completed), by the clock of the
    /// machine that committed it: for people, never for ordering (see `sequence`).
    pub created_at: DateTime<Utc>,
    /// The repository's commit number: points are ordered by it, so a point committed later
    /// is newer whatever the clocks said. `None` in points written before numbers existed;
    /// they order before every numbered point, among themselves by stamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// The Postgres dump with the table counts taken in the dump's snapshot.
    pub postgres: Option<PgBackupPart>,
    /// The object-store snapshot.
    pub objects: Option<ObjectSnapshotPart>,
    /// Secret names, managers, references, versions: never values.
    pub secrets: Vec<SecretRef>,
    /// `rollcall`, `pg_dump` and server versions that made the point.
    pub tool_versions: BTreeMap<String, String>,
}

impl Point {
    /// Table counts at backup time, taken in the same snapshot as the dump.
    pub fn table_counts(&self) -> Option<&BTreeMap<String, i64>> {
        self.postgres.as_ref().map(|p| &p.table_counts)
    }

    /// Bytes stored for this point: the (compressed) dump plus the logical size of the
    /// snapshot's objects (blobs are shared, so this overstates what deleting it frees).
    pub fn size_bytes(&self) -> u64 {
        self.postgres.as_ref().map_or(0, |p| p.size) + self.objects.as_ref().map_or(0, |o| o.bytes)
    }

    /// The order of commits: by commit number (unnumbered points first), then stamp, then id.
    /// The newest point is the greatest.
    pub fn commit_order(&self) -> (Option<u64>, DateTime<Utc>, &str) {
        (self.sequence, self.created_at, self.id.as_str())
    }

    /// How far the stamp is ahead of `now` when that is more than [`CLOCK_TOLERANCE`]: the
    /// clock of the machine that committed the point ran fast (or the reader's runs slow), so
    /// its age cannot be told from its stamp.
    pub fn stamped_ahead(&self, now: DateTime<Utc>) -> Option<Duration> {
        let ahead = (self.created_at - now).to_std().ok()?;
        (ahead > CLOCK_TOLERANCE).then_some(ahead)
    }
}

/// What [`Repository::write_point`] commits.
#[derive(Debug, Clone)]
pub struct NewPoint {
    /// The id the parts were taken for (see [`PointId::new`]).
    pub id: PointId,
    pub postgres: Option<PgBackupPart>,
    pub objects: Option<ObjectSnapshotPart>,
    pub secrets: Vec<SecretRef>,
}

/// Result of [`Repository::list_points`].
#[derive(Debug, Clone, Default)]
pub struct PointListing {
    /// Whole, checked points in commit order, oldest first: the last is the newest.
    pub points: Vec<Point>,
    /// Point files that could not be read as a point (truncated, edited, wrong format).
    pub damaged: Vec<DamagedPoint>,
}

#[derive(Debug, Clone)]
pub struct DamagedPoint {
    pub key: String,
    /// The id its file name carries, when it carries one.
    pub id: Option<PointId>,
    pub reason: String,
}

impl Repository {
    /// Commits a point whose parts are complete. Checks that every part it names exists with
    /// the recorded size, claims the next commit number, then writes `points/<id>.json` in one
    /// put, stamped with this machine's clock.
    pub async fn write_point(&self, new: NewPoint) -> Result<Point> {
        self.write_point_stamped(new, Utc::now()).await
    }

    /// [`Repository::write_point`] with the stamp given: what a machine whose clock reads
    /// `created_at` would write (tests of skewed clocks; the order never depends on it).
    pub async fn write_point_stamped(
        &self,
        new: NewPoint,
        created_at: DateTime<Utc>,
    ) -> Result<Point> {
        let id = new.id;
        if new.postgres.is_none() && new.objects.is_none() {
            bail!("point {id} names neither a Postgres backup nor an object snapshot");
        }
        let mut tool_versions = BTreeMap::new();
        tool_versions.insert("rollcall".to_owned(), env!("CARGO_PKG_VERSION").to_owned());
        if let Some(pg) = &new.postgres {
            let expected = if pg.files.is_empty() {
                crate::layout::dump_key(&id, pg.compression.is_compressed())
            } else {
                crate::layout::dump_dir(&id)
            };
            let inside = format!("{expected}/");
            if pg.key != expected.to_string()
                || pg.files.iter().any(|f| !f.key.starts_with(&inside))
            {
                bail!(
                    "the Postgres backup {} was taken for another point than {id}",
                    pg.key
                );
            }
            for archive in pg.archives() {
                self.check_part(
                    &Path::from(archive.key.as_str()),
                    archive.size,
                    "Postgres dump",
                )
                .await?;
            }
            tool_versions.insert("pg_dump".to_owned(), pg.pg_dump_version.clone());
            tool_versions.insert("postgres".to_owned(), pg.server_version.clone());
        }
        if let Some(objects) = &new.objects {
            self.check_part(
                &Path::from(objects.manifest_key.as_str()),
                objects.manifest_size,
                "object snapshot manifest",
            )
            .await?;
        }
        let key = point_key(&id);
        match self.store.head(&key).await {
            Ok(_) => bail!("point {id} already exists in repository {}", self.label),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("check that point {id} is new in {}", self.label)));
            }
        }
        // Claimed last, after every check, so the number orders commits, not attempts.
        let sequence = self
            .claim_sequence(&id)
            .await
            .with_context(|| format!("commit point {id}"))?;
        let point = Point {
            environment: id.environment().to_owned(),
            id,
            created_at,
            sequence: Some(sequence),
            postgres: new.postgres,
            objects: new.objects,
            secrets: new.secrets,
            tool_versions,
        };
        // Parts first (a backup on another host may have written them), then the point.
        self.make_durable().await?;
        self.put_document(&key, POINT_FORMAT, &point)
            .await
            .with_context(|| format!("commit point {}", point.id))?;
        self.make_durable().await?;
        Ok(point)
    }

    async fn check_part(&self, key: &Path, size: u64, what: &'static str) -> Result<()> {
        let meta = match self.store.head(key).await {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => {
                bail!(
                    "{what} {key} is missing from repository {}: take the backup again",
                    self.label
                )
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("check {what} {key}")));
            }
        };
        if meta.size != size {
            bail!(
                "{what} {key} holds {} bytes, the backup recorded {size}: it is incomplete or \
                 was replaced; take the backup again",
                meta.size
            );
        }
        Ok(())
    }

    /// Reads one point. A missing point is [`RepoError::NotFound`], a damaged file
    /// [`RepoError::Damaged`].
    pub async fn read_point(&self, id: &PointId) -> Result<Point> {
        let key = point_key(id);
        let (point, _, _): (Point, _, _) = self
            .get_document(&key, POINT_FORMAT, "recovery point")
            .await?;
        if &point.id != id {
            return Err(self
                .damaged(
                    "recovery point",
                    &key,
                    format!("the file holds point {} instead", point.id),
                )
                .into());
        }
        Ok(point)
    }

    /// Lists points (of one environment, or all) in commit order, oldest first (see
    /// [`Point::commit_order`]). Damaged point files are returned apart, never as points.
    pub async fn list_points(&self, environment: Option<&str>) -> Result<PointListing> {
        let prefix = Path::from(POINTS);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("list points in repository {}", self.label))?;
        let mut wanted = Vec::new();
        for meta in metas {
            let Some(stem) = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
            else {
                continue;
            };
            let id = PointId::parse(stem).ok();
            if let (Some(env), Some(id)) = (environment, &id)
                && id.environment() != env
            {
                continue;
            }
            wanted.push((meta.location, id));
        }
        let results: Vec<_> = futures::stream::iter(wanted)
            .map(|(key, id)| async move {
                let outcome = match &id {
                    Some(id) => self.read_point(id).await,
                    None => Err(anyhow::anyhow!(
                        "its file name is not a point id; it was not written by rollcall"
                    )),
                };
                (key, id, outcome)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut listing = PointListing::default();
        for (key, id, outcome) in results {
            match outcome {
                Ok(point) => listing.points.push(point),
                // Deleted by a prune between our listing and our read.
                Err(e) if is_not_found(&e) => {}
                Err(e) => match e.downcast::<RepoError>() {
                    Ok(RepoError::Damaged { reason, .. }) => listing.damaged.push(DamagedPoint {
                        key: key.to_string(),
                        id,
                        reason,
                    }),
                    Ok(other) => return Err(other.into()),
                    Err(e) if id.is_none() => listing.damaged.push(DamagedPoint {
                        key: key.to_string(),
                        id,
                        reason: format!("{e:#}"),
                    }),
                    Err(e) => return Err(e),
                },
            }
        }
        listing
            .points
            .sort_by(|a, b| a.commit_order().cmp(&b.commit_order()));
        listing.damaged.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listing)
    }
}
