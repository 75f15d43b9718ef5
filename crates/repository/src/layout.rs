//! Where things live in a repository, and the identifiers that name them.
//!
//! ```text
//! points/<point-id>.json              recovery point, written last
//! postgres/<point-id>.dump.zst        pg_dump --format=custom, zstd-compressed (.dump when not);
//!                                     points before parallel dumps
//! postgres/<point-id>/schema.dump.zst parallel dumps: definitions (pre- and post-data) ...
//! postgres/<point-id>/data.dump.zst   ... the data of every table not split off ...
//! postgres/<point-id>/data-<n>.dump.zst ... and of the tables split off into part n
//! objects/snapshots/<snapshot-id>.json manifest: key -> size, sha256, etag, version
//! objects/blobs/<aa>/<sha256>         content-addressed bodies shared by all snapshots (in an
//!                                     encrypted repository named by a keyed hash instead)
//! objects/staging/<snapshot-id>/...   large bodies being uploaded before their hash is known
//! locks/<lock-id>.json                shared (snapshot) and exclusive (prune) repository locks
//! sequence/<20-digit n>               the commit number n, claimed by one point (create-only
//!                                     put); prune keeps the newest 64, so numbers only grow
//! quarantine/<tag>/<key>              what a fleet restore (run tag) replaced or removed (in
//!                                     an encrypted repository <key> is its keyed hash:
//!                                     `Repository::quarantine_entry`)
//! quarantine/<tag>.records/<..>.json  written before that restore changes anything: each key
//!                                     it may write or remove and what it held (undo reads it)
//! wal/<timeline>/<name>-<sha256>.zst  archived WAL (`wal`): the body, then its record
//! wal/<timeline>/<name>.json          (create-only) that commits it; wal/history/ for
//!                                     timeline history files
//! base/<id>/base.tar.zst              physical base backups (`postgres::physical`): the tar,
//! base/<id>.json                      then its record (create-only) once its WAL is archived
//! rollcall-repository.json            the config object (`repo init`): plaintext, or the
//!                                     wrapped data key of an encrypted repository (`cipher`);
//!                                     every other object is then sealed (`sealed`)
//! ```
//!
//! A restore of objects by hand keeps what it displaced in the target store (or, if asked, in
//! the repository) under `rollcall-quarantine/<UTC time>-<snapshot-id>/`, with the same
//! `.records/` beside it; snapshots skip that prefix.

use std::fmt;

use anyhow::{Result, bail};
use chrono::{DateTime, NaiveDateTime, Utc};
use object_store::path::Path;
use serde::{Deserialize, Serialize};

pub(crate) const POINTS: &str = "points";
pub(crate) const POSTGRES: &str = "postgres";
pub(crate) const SNAPSHOTS: &str = "objects/snapshots";
pub(crate) const BLOBS: &str = "objects/blobs";
pub(crate) const STAGING: &str = "objects/staging";
pub(crate) const LOCKS: &str = "locks";
pub(crate) const SEQUENCE: &str = "sequence";
/// Where fleet restores and undos keep what they displaced, one prefix per run tag.
pub(crate) const QUARANTINE: &str = "quarantine";

/// Top-level prefix of the target store under which restores keep what they displaced.
pub const QUARANTINE_ROOT: &str = "rollcall-quarantine";

const TIMESTAMP: &str = "%Y%m%dT%H%M%SZ";
const TIMESTAMP_LEN: usize = 16;
const SUFFIX_LEN: usize = 8;

pub(crate) fn point_key(id: &PointId) -> Path {
    Path::from(format!("{POINTS}/{id}.json"))
}

/// `sequence/<n>`, zero-padded so the keys list in numeric order.
pub(crate) fn sequence_key(n: u64) -> Path {
    Path::from(format!("{SEQUENCE}/{n:020}"))
}

/// The number a `sequence/` key names, if it is a well-formed one.
pub(crate) fn sequence_of(key: &Path) -> Option<u64> {
    let name = key.filename()?;
    if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

pub(crate) fn dump_key(id: &PointId, compressed: bool) -> Path {
    let ext = if compressed { "dump.zst" } else { "dump" };
    Path::from(format!("{POSTGRES}/{id}.{ext}"))
}

/// The directory of a parallel (multi-archive) dump.
pub(crate) fn dump_dir(id: &PointId) -> Path {
    Path::from(format!("{POSTGRES}/{id}"))
}

/// One archive of a parallel dump: `postgres/<point-id>/<name>.dump[.zst]`.
pub(crate) fn dump_file_key(id: &PointId, name: &str, compressed: bool) -> Path {
    let ext = if compressed { "dump.zst" } else { "dump" };
    Path::from(format!("{POSTGRES}/{id}/{name}.{ext}"))
}

/// A short, stable tag for a run, fit for database names and repository prefixes: `r` + 8 hex
/// digits of its id's sha256. A restore keeps the live database as `<db>_pre_<tag>` and its
/// quarantine under `quarantine/<tag>/`; the agents and the coordinator (which names them to
/// operators) must agree on it.
pub fn run_tag(run_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(run_id.as_bytes());
    format!("r{}", &hex::encode(digest)[..8])
}

/// Whether `name` has the shape of [`run_tag`]'s tags, so a database or prefix so named is a
/// run's.
pub fn is_run_tag(name: &str) -> bool {
    name.len() == 9
        && name.starts_with('r')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The default quarantine of one restore: `rollcall-quarantine/<UTC time>-<snapshot-id>`.
pub(crate) fn quarantine_prefix(snapshot: &SnapshotId, at: DateTime<Utc>) -> Path {
    Path::from(format!(
        "{QUARANTINE_ROOT}/{}-{snapshot}",
        at.format(TIMESTAMP)
    ))
}

pub(crate) fn manifest_key(id: &SnapshotId) -> Path {
    Path::from(format!("{SNAPSHOTS}/{id}.json"))
}

/// `objects/blobs/<first two hex digits>/<id>`: the fan-out keeps directories small on file
/// systems and spreads S3 key prefixes. The id is the content's sha256, or in an encrypted
/// repository its keyed hash: [`crate::Repository::blob_id`] is the one mapping every reader,
/// writer and pruner of blobs uses.
pub(crate) fn blob_path(id: &str) -> Path {
    let fan = id.get(..2).unwrap_or("00");
    Path::from(format!("{BLOBS}/{fan}/{id}"))
}

/// The id a blob key names (see [`blob_path`]), if it is a well-formed blob key.
pub(crate) fn blob_id_of(key: &Path) -> Option<String> {
    let name = key.filename()?;
    is_sha256_hex(name).then(|| name.to_owned())
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Environment names are path- and URL-safe: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_environment(env: &str) -> Result<()> {
    let ok = !env.is_empty()
        && env.len() <= 63
        && env
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        bail!(
            "environment name {env:?} is not valid: use 1-63 lowercase letters, digits, `-` or \
             `_`, starting with a letter or digit"
        );
    }
    Ok(())
}

/// A recovery point id: `<UTC timestamp>-<environment>-<8 hex>`, e.g.
/// `20260421T101500Z-private-beta-3f2a9c01`. Ids sort by creation time across environments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PointId(String);

impl PointId {
    /// A fresh id for a point of `environment` taken at `at`.
    pub fn new(environment: &str, at: DateTime<Utc>) -> Result<PointId> {
        validate_environment(environment)?;
        Ok(PointId(format!(
            "{}-{environment}-{}",
            at.format(TIMESTAMP),
            random_suffix()
        )))
    }

    pub fn parse(s: &str) -> Result<PointId> {
        let valid = s.len() > TIMESTAMP_LEN + SUFFIX_LEN + 2
            && s.is_char_boundary(TIMESTAMP_LEN)
            && parse_timestamp(&s[..TIMESTAMP_LEN]).is_some()
            && s.as_bytes()[TIMESTAMP_LEN] == b'-'
            && s.as_bytes()[s.len() - SUFFIX_LEN - 1] == b'-'
            && is_hex(&s[s.len() - SUFFIX_LEN..])
            && validate_environment(&s[TIMESTAMP_LEN + 1..s.len() - SUFFIX_LEN - 1]).is_ok();
        if !valid {
            bail!(
                "{s:?} is not a recovery point id (expected TIMESTAMP-ENVIRONMENT-SUFFIX, e.g. \
                 20260421T101500Z-private-beta-3f2a9c01): list ids with `rollcall points`"
            );
        }
        Ok(PointId(s.to_owned()))
    }

    pub fn environment(&self) -> &str {
        &self.0[TIMESTAMP_LEN + 1..self.0.len() - SUFFIX_LEN - 1]
    }

    /// When the id was minted (second precision).
    pub fn timestamp(&self) -> DateTime<Utc> {
        parse_timestamp(&self.0[..TIMESTAMP_LEN]).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PointId {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        PointId::parse(&s)
    }
}

impl From<PointId> for String {
    fn from(id: PointId) -> String {
        id.0
    }
}

impl std::str::FromStr for PointId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        PointId::parse(s)
    }
}

/// An object snapshot id: `<UTC timestamp>-<8 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    pub fn new(at: DateTime<Utc>) -> SnapshotId {
        SnapshotId(format!("{}-{}", at.format(TIMESTAMP), random_suffix()))
    }

    pub fn parse(s: &str) -> Result<SnapshotId> {
        let valid = s.len() == TIMESTAMP_LEN + 1 + SUFFIX_LEN
            && s.is_char_boundary(TIMESTAMP_LEN)
            && parse_timestamp(&s[..TIMESTAMP_LEN]).is_some()
            && s.as_bytes()[TIMESTAMP_LEN] == b'-'
            && is_hex(&s[TIMESTAMP_LEN + 1..]);
        if !valid {
            bail!(
                "{s:?} is not an object snapshot id (expected TIMESTAMP-SUFFIX, e.g. \
                 20260421T101500Z-3f2a9c01)"
            );
        }
        Ok(SnapshotId(s.to_owned()))
    }

    pub fn timestamp(&self) -> DateTime<Utc> {
        parse_timestamp(&self.0[..TIMESTAMP_LEN]).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        SnapshotId::parse(&s)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> String {
        id.0
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        SnapshotId::parse(s)
    }
}

pub(crate) fn random_suffix() -> String {
    let bytes: [u8; SUFFIX_LEN / 2] = rand::random();
    hex::encode(bytes)
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, TIMESTAMP)
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_round_trip_and_carry_environment_and_time() {
        let at = DateTime::parse_from_rfc3339("2026-04-21T10:15:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let id = PointId::new("private-beta", at).expect("id");
        assert!(id.as_str().starts_with("20260421T101500Z-private-beta-"));
        let parsed = PointId::parse(id.as_str()).expect("parse");
        assert_eq!(parsed.environment(), "private-beta");
        assert_eq!(parsed.timestamp(), at);
        let json = serde_json::to_string(&parsed).expect("json");
        assert_eq!(serde_json::from_str::<PointId>(&json).expect("back"), id);
    }

    #[test]
    fn rejects_malformed_ids_and_environments() {
        for bad in [
            "",
            "../../etc/passwd",
            "20260421T101500Z-prod",
            "20260421T101500Z-Prod-3f2a9c01",
            "2026-04-21-prod-3f2a9c01",
            "20260421T101500Z-pr/od-3f2a9c01",
        ] {
            assert!(PointId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_environment("Prod").is_err());
        assert!(validate_environment("-x").is_err());
        assert!(validate_environment("private-beta").is_ok());
        assert!(SnapshotId::parse("20260421T101500Z-3f2a9c01").is_ok());
        assert!(SnapshotId::parse("20260421T101500Z-3f2a9c01x").is_err());
    }

    #[test]
    fn blob_keys_fan_out_by_prefix() {
        let sha = "ab".repeat(32);
        let key = blob_path(&sha);
        assert_eq!(key.as_ref(), format!("objects/blobs/ab/{sha}"));
        assert_eq!(blob_id_of(&key), Some(sha));
        assert_eq!(blob_id_of(&Path::from("objects/blobs/ab/nothex")), None);
    }

    #[test]
    fn sequence_keys_sort_numerically_and_round_trip() {
        let (a, b) = (sequence_key(9), sequence_key(10));
        assert_eq!(b.as_ref(), "sequence/00000000000000000010");
        assert!(a.as_ref() < b.as_ref());
        assert_eq!(sequence_of(&b), Some(10));
        assert_eq!(sequence_of(&sequence_key(u64::MAX)), Some(u64::MAX));
        assert_eq!(sequence_of(&Path::from("sequence/12")), None);
        assert_eq!(
            sequence_of(&Path::from("sequence/0000000000000000001x")),
            None
        );
    }
}
