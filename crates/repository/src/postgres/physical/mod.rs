//! Physical backups for point-in-time recovery: base backups streamed from `pg_basebackup`
//! into the repository, and restores of a data directory to any time the archived WAL
//! ([`crate::wal`]) reaches.
//!
//! ```text
//! base/<id>/base.tar.zst   pg_basebackup's tar (with its backup_manifest), zstd-compressed
//! base/<id>.json           its record, written create-only once the WAL the backup needs is
//!                          archived: the record is the commit
//! ```
//!
//! A base backup restores to any time from its `consistent_at` (the server's clock once the
//! backup ended and its WAL was in the repository: never earlier than the backup's end) up to
//! where the archived WAL reaches. A restore never writes into a directory that holds
//! anything: it builds the data directory beside its destination (`.<name>.rollcall-partial`),
//! checks the tar's sha256 before unpacking anything and `pg_verifybackup` before recovery,
//! runs the recovery on a private socket (no TCP) until the server promotes, stops it cleanly,
//! and only then renames the directory into place.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::repo::Repository;
use crate::wal::{ListedWal, segment_name_in, segment_number_in, segments_per_log};

mod backup;
mod kept;
mod recover;
mod swap;

pub use backup::{BaseBackupOptions, base_backup};
pub use kept::{drop_kept_data_dir, kept_dir_name, list_kept_data_dirs};
pub use recover::{PitrOptions, PitrReport, restore_to_time};
pub use swap::{
    Interrupted, ServerTools, SwapDirs as DataDirSwap, SwapMarker, Swapped,
    finish_interrupted_swap, start_options, swap_data_dir,
};

pub(crate) const BASE: &str = "base";

/// One committed base backup, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBackup {
    pub id: String,
    pub env: Option<String>,
    /// The cluster's `pg_control_system().system_identifier`: WAL of another cluster never
    /// recovers it.
    pub system_identifier: String,
    /// `server_version_num` of the server backed up; a restore needs the same major version.
    pub server_version_num: u32,
    pub wal_segment_size: u64,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    /// The first and last WAL segments recovery needs to reach consistency.
    pub start_wal: String,
    pub end_wal: String,
    /// The server's clock when the backup started.
    pub started_at: DateTime<Utc>,
    /// The server's clock after the backup ended and its WAL was archived: the earliest time
    /// it restores to.
    pub consistent_at: DateTime<Utc>,
    /// The compressed tar in the repository, its size and sha256.
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// The tar's own size.
    pub tar_size: u64,
}

fn record_key(id: &str) -> Path {
    Path::from(format!("{BASE}/{id}.json"))
}

fn body_key(id: &str) -> Path {
    Path::from(format!("{BASE}/{id}/base.tar.zst"))
}

/// Every committed base backup, oldest first.
pub async fn list_base_backups(repo: &Repository) -> Result<Vec<BaseBackup>> {
    let prefix = Path::from(BASE);
    let metas: Vec<_> = repo
        .store()
        .list(Some(&prefix))
        .try_collect()
        .await
        .with_context(|| format!("list {prefix}/ in {}", repo.label()))?;
    let mut out = Vec::new();
    for meta in metas {
        // Records sit directly under base/; the bodies one level down.
        if meta.location.extension() != Some("json") || meta.location.parts().count() != 2 {
            continue;
        }
        let bytes = repo.get_bytes(&meta.location, "base backup record").await?;
        let record: BaseBackup = serde_json::from_slice(&bytes).map_err(|e| {
            repo.damaged(
                "base backup record",
                &meta.location,
                format!("does not read: {e}"),
            )
        })?;
        out.push(record);
    }
    out.sort_by(|a, b| a.consistent_at.cmp(&b.consistent_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// The times the repository can restore Postgres to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryWindow {
    /// The oldest base backup's `consistent_at`.
    pub earliest: DateTime<Utc>,
    /// When the newest WAL segment reachable without a gap from the newest base backup was
    /// archived: WAL written before then is restorable.
    pub latest: DateTime<Utc>,
    /// The newest segment of that run, and the first one missing after it if the archive has
    /// a gap before its newest segment.
    pub newest_segment: String,
    pub gap_at: Option<String>,
    pub base_backups: usize,
}

/// The window `bases` (one environment's, or all) and the archived WAL cover, `None`
/// without a base backup.
pub async fn recovery_window(
    repo: &Repository,
    bases: &[BaseBackup],
) -> Result<Option<RecoveryWindow>> {
    let (Some(oldest), Some(newest)) = (bases.first(), bases.last()) else {
        return Ok(None);
    };
    let wal = crate::wal::wal_listing(repo).await?;
    let oldest_timeline = bases
        .iter()
        .map(|b| b.timeline)
        .min()
        .unwrap_or(newest.timeline);
    let histories = read_histories(repo, &wal, oldest_timeline).await?;
    // The newest base backup's reach, or an older one's that goes further (after a restore to
    // a time, a base backup taken on the old timeline after the branch cannot follow the new).
    let mut reach = reach_for(&histories, newest, &wal, None)?.0;
    for base in bases.iter().rev().skip(1) {
        if let Ok((further, _)) = reach_for(&histories, base, &wal, None)
            && further.archived_at > reach.archived_at
        {
            reach = further;
        }
    }
    Ok(Some(RecoveryWindow {
        earliest: oldest.consistent_at,
        latest: reach.archived_at.max(newest.consistent_at),
        newest_segment: reach.segment,
        gap_at: reach.gap_at,
        base_backups: bases.len(),
    }))
}

pub(super) struct Reach {
    segment: String,
    archived_at: DateTime<Utc>,
    gap_at: Option<String>,
}

/// The archived timeline histories newer than some timeline: each timeline's ancestry (from
/// its history file) and when that file was archived (about when the timeline began: a
/// server promoted on it archives it first).
pub(super) struct Histories(std::collections::BTreeMap<u32, (Ancestry, DateTime<Utc>)>);

/// A history file's lines: each parent timeline and the position the next one branched at.
type Ancestry = Vec<(u32, u64)>;

/// Reads the archived history files of timelines newer than `newer_than`.
pub(super) async fn read_histories(
    repo: &Repository,
    wal: &[ListedWal],
    newer_than: u32,
) -> Result<Histories> {
    let mut map = std::collections::BTreeMap::new();
    for listed in wal {
        let Some(timeline) = listed
            .name
            .strip_suffix(".history")
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .filter(|t| *t > newer_than)
        else {
            continue;
        };
        let (_, bytes) = crate::wal::wal_bytes(repo, &listed.name)
            .await
            .with_context(|| format!("read the archived timeline history {}", listed.name))?;
        let ancestry = parse_history(&String::from_utf8_lossy(&bytes));
        map.insert(timeline, (ancestry, listed.archived_at));
    }
    Ok(Histories(map))
}

/// The timelines recovery from `base` follows to `at` (to the end of the archive when
/// `None`), oldest first, each with the position where the next one branched off (none for
/// the last): the newest timeline that descends from `base`'s after the backup's end and began
/// at or before `at` (at `at` the live server was still on its parent). The restore names the
/// last one as `recovery_target_timeline`, so the window and the recovery agree.
fn timeline_chain(
    histories: &Histories,
    base: &BaseBackup,
    at: Option<DateTime<Utc>>,
) -> Result<Vec<(u32, Option<u64>)>> {
    let end = parse_lsn(&base.end_lsn).context("the base backup's end LSN")?;
    for (timeline, (ancestry, began)) in histories.0.iter().rev() {
        if *timeline <= base.timeline || at.is_some_and(|t| *began > t) {
            continue;
        }
        if let Some(chain) = chain_from(base.timeline, end, ancestry, *timeline) {
            return Ok(chain);
        }
    }
    Ok(vec![(base.timeline, None)])
}

/// A history file's lines: each parent timeline and where the next one branched from it.
fn parse_history(text: &str) -> Vec<(u32, u64)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let parent = fields.next()?.parse().ok()?;
            let lsn = parse_lsn(fields.next()?)?;
            Some((parent, lsn))
        })
        .collect()
}

/// The chain from `base_timeline` to `timeline` per its `ancestry`, if `timeline` descends
/// from `base_timeline` at or after `end` (else recovery from the backup cannot follow it).
fn chain_from(
    base_timeline: u32,
    end: u64,
    ancestry: &[(u32, u64)],
    timeline: u32,
) -> Option<Vec<(u32, Option<u64>)>> {
    let from = ancestry
        .iter()
        .position(|(parent, switch)| *parent == base_timeline && *switch >= end)?;
    let mut chain: Vec<(u32, Option<u64>)> = ancestry[from..]
        .iter()
        .map(|(parent, switch)| (*parent, Some(*switch)))
        .collect();
    chain.push((timeline, None));
    Some(chain)
}

/// How far recovery from `base` reaches toward `at` (see [`timeline_chain`]), and the
/// timeline it ends on.
pub(super) fn reach_for(
    histories: &Histories,
    base: &BaseBackup,
    wal: &[ListedWal],
    at: Option<DateTime<Utc>>,
) -> Result<(Reach, u32)> {
    let chain = timeline_chain(histories, base, at)?;
    let timeline = chain.last().map_or(base.timeline, |(t, _)| *t);
    Ok((wal_reach(base, wal, &chain)?, timeline))
}

/// The base backup a restore to `at` starts from, among `bases` (in commit order): the newest
/// consistent at or before `at` whose WAL reaches `at` along the timelines recovery follows
/// (after a restore to a time, a base backup taken on the old timeline after the branch cannot
/// follow the new one, and an older one can); else the newest consistent at or before `at`,
/// with how far it reaches. `None` when no base backup is consistent by `at`.
pub(super) fn base_for_time<'a>(
    histories: &Histories,
    bases: &'a [BaseBackup],
    wal: &[ListedWal],
    at: DateTime<Utc>,
) -> Result<Option<(&'a BaseBackup, Reach, u32)>> {
    let mut newest = None;
    for base in bases.iter().rev().filter(|b| b.consistent_at <= at) {
        let reached = reach_for(histories, base, wal, Some(at));
        if let Ok((reach, _)) = &reached
            && reach.archived_at >= at
        {
            let (reach, timeline) = reached?;
            return Ok(Some((base, reach, timeline)));
        }
        if newest.is_none() {
            newest = Some((base, reached));
        }
    }
    match newest {
        None => Ok(None),
        Some((base, reached)) => {
            let (reach, timeline) = reached?;
            Ok(Some((base, reach, timeline)))
        }
    }
}

/// [`base_for_time`] for a caller outside: the base backup of `bases` a restore to `at`
/// starts from, and the window it gives (`latest`: how far its WAL reaches toward `at`).
pub async fn base_backup_for_time(
    repo: &Repository,
    bases: &[BaseBackup],
    at: DateTime<Utc>,
) -> Result<Option<(BaseBackup, RecoveryWindow)>> {
    let Some(oldest) = bases.iter().map(|b| b.timeline).min() else {
        return Ok(None);
    };
    let wal = crate::wal::wal_listing(repo).await?;
    let histories = read_histories(repo, &wal, oldest).await?;
    Ok(
        base_for_time(&histories, bases, &wal, at)?.map(|(base, reach, _)| {
            (
                base.clone(),
                RecoveryWindow {
                    earliest: base.consistent_at,
                    latest: reach.archived_at.max(base.consistent_at),
                    newest_segment: reach.segment,
                    gap_at: reach.gap_at,
                    base_backups: 1,
                },
            )
        }),
    )
}

/// How far the archive runs without a gap from `base`'s first segment, along `chain` (see
/// [`timeline_chain`]): each timeline's segments up to the one its successor branched in,
/// which the successor's copy replaces.
fn wal_reach(base: &BaseBackup, wal: &[ListedWal], chain: &[(u32, Option<u64>)]) -> Result<Reach> {
    let per_log = segments_per_log(base.wal_segment_size);
    let segment_size = base.wal_segment_size.max(1);
    let on = |timeline: &str| -> std::collections::BTreeMap<u64, &ListedWal> {
        wal.iter()
            .filter_map(|w| {
                segment_number_in(&w.name, per_log)
                    .filter(|(t, _)| t == timeline)
                    .map(|(_, n)| (n, w))
            })
            .collect()
    };
    let first = segment_number_in(&base.start_wal, per_log)
        .map(|(_, n)| n)
        .context("the base backup's first segment name")?;
    let mut n = first;
    let mut last = None;
    let mut gap_at = None;
    for (timeline, switch) in chain {
        let timeline = format!("{timeline:08X}");
        let segments = on(&timeline);
        let stop = switch.map(|lsn| lsn / segment_size);
        while stop.is_none_or(|s| n < s) {
            match segments.get(&n) {
                Some(wal) => {
                    last = Some(*wal);
                    n += 1;
                }
                None => break,
            }
        }
        if stop.is_none_or(|s| n < s) {
            // Stopped on a missing segment: a gap if anything later was archived on it.
            if segments.range(n..).next().is_some() || stop.is_some() {
                gap_at = Some(segment_name_in(&timeline, n, per_log));
            }
            break;
        }
    }
    let Some(last) = last else {
        bail!(
            "the archive does not hold {}, the first WAL segment base backup {} needs",
            base.start_wal,
            base.id
        );
    };
    Ok(Reach {
        segment: last.name.clone(),
        archived_at: last.archived_at,
        gap_at,
    })
}

/// `0/2000028` → its position.
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The segment holding `lsn` on `timeline`.
fn segment_name(timeline: u32, lsn: u64, segment_size: u64) -> String {
    segment_name_in(
        &format!("{timeline:08X}"),
        lsn / segment_size.max(1),
        segments_per_log(segment_size),
    )
}

/// Checks every base backup's body: present with its recorded size, and (`full`) its sha256.
/// Returns each backup with the problem found, if any.
pub async fn verify_base_backups(
    repo: &Repository,
    full: bool,
) -> Result<Vec<(BaseBackup, Option<String>)>> {
    let mut out = Vec::new();
    for base in list_base_backups(repo).await? {
        let key = Path::from(base.key.as_str());
        let problem = match repo.store().head(&key).await {
            Err(object_store::Error::NotFound { .. }) => Some(format!("its body {key} is missing")),
            Err(e) => Some(format!("its body {key} is unreadable: {e}")),
            Ok(meta) if meta.size != base.size => Some(format!(
                "its body {key} has {} bytes, the record says {}",
                meta.size, base.size
            )),
            Ok(_) if full => {
                let hashed = async {
                    let got = repo.store().get(&key).await?;
                    crate::verify::hash_body(got, None).await
                }
                .await;
                match hashed {
                    Err(e) => Some(format!("its body {key} is unreadable: {e:#}")),
                    Ok((_, actual)) if actual != base.sha256 => Some(format!(
                        "its body {key} hashes to {actual}, the record says {}",
                        base.sha256
                    )),
                    Ok(_) => None,
                }
            }
            Ok(_) => None,
        };
        out.push((base, problem));
    }
    Ok(out)
}

/// What retention removed of the physical backups.
#[derive(Debug, Clone, Default)]
pub(crate) struct PhysicalPrune {
    pub(crate) deleted_base_backups: Vec<String>,
    pub(crate) deleted_wal_files: u64,
}

/// Retention for base backups and WAL, one window with the points: `env`'s base backups
/// consistent before `cutoff` go, except the newest of them (a restore to the window's first
/// moment starts from it); then every archived WAL file older than the first segment the
/// oldest remaining base backup (of any environment) needs. With no base backup left, no WAL
/// is deleted. Records go before bodies, so an interrupted prune leaves orphans, never a
/// record without its body.
pub(crate) async fn prune_physical(
    repo: &Repository,
    env: &str,
    cutoff: DateTime<Utc>,
    dry_run: bool,
) -> Result<PhysicalPrune> {
    let bases = list_base_backups(repo).await?;
    let anchor = bases
        .iter()
        .rev()
        .find(|b| b.env.as_deref() == Some(env) && b.consistent_at <= cutoff)
        .map(|b| b.id.clone());
    let (doomed, remaining): (Vec<&BaseBackup>, Vec<&BaseBackup>) = bases.iter().partition(|b| {
        b.env.as_deref() == Some(env) && b.consistent_at < cutoff && Some(&b.id) != anchor.as_ref()
    });
    let mut report = PhysicalPrune {
        deleted_base_backups: doomed.iter().map(|b| b.id.clone()).collect(),
        deleted_wal_files: 0,
    };
    // Records before bodies: an interrupted prune leaves orphan bodies, never a record
    // without its body.
    let records = doomed.iter().map(|b| record_key(&b.id)).collect();
    let bodies = doomed.iter().map(|b| Path::from(b.key.as_str())).collect();
    repo.delete_all(records, dry_run).await?;
    repo.delete_all(bodies, dry_run).await?;
    // A segment's place regardless of timeline: its log and segment numbers, fixed-width hex.
    let Some(oldest_needed) = remaining.iter().map(|b| b.start_wal[8..].to_owned()).min() else {
        return Ok(report);
    };
    let old: Vec<ListedWal> = crate::wal::wal_listing(repo)
        .await?
        .into_iter()
        // History files have no place, and what a remaining base backup needs stays.
        .filter(|w| w.name.len() >= 24 && w.name[8..24] < *oldest_needed)
        .collect();
    report.deleted_wal_files = old.len() as u64;
    repo.delete_all(old.iter().map(|w| w.record.clone()).collect(), dry_run)
        .await?;
    repo.delete_all(old.into_iter().flat_map(|w| w.bodies).collect(), dry_run)
        .await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use object_store::PutPayload;

    use super::*;

    #[test]
    fn lsns_and_segment_names() {
        assert_eq!(parse_lsn("0/2000028"), Some(0x200_0028));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(format_lsn(0x1_0200_0028), "1/2000028");
        let mb16 = 16 << 20;
        assert_eq!(
            segment_name(1, 0x200_0028, mb16),
            "000000010000000000000002"
        );
        assert_eq!(
            segment_name(2, (1 << 32) + 0xFF00_0000, mb16),
            "0000000200000001000000FF"
        );
        assert_eq!(
            segment_name(1, 0x300_0000 - 1, mb16),
            "000000010000000000000002"
        );
    }

    fn base(id: &str, env: &str, consistent: &str, start_wal: &str) -> BaseBackup {
        BaseBackup {
            id: id.into(),
            env: Some(env.into()),
            system_identifier: "1".into(),
            server_version_num: 150000,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: "0/0".into(),
            end_lsn: "0/0".into(),
            start_wal: start_wal.into(),
            end_wal: start_wal.into(),
            started_at: consistent.parse().unwrap(),
            consistent_at: consistent.parse().unwrap(),
            key: format!("{BASE}/{id}/base.tar.zst"),
            size: 1,
            sha256: String::new(),
            tar_size: 1,
        }
    }

    fn listed(names: &[&str]) -> Vec<ListedWal> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| ListedWal {
                name: (*name).to_owned(),
                archived_at: DateTime::<Utc>::from_timestamp(1_000 + i as i64, 0).unwrap(),
                record: Path::from(format!("wal/x/{name}.json")),
                bodies: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn after_a_restore_to_a_time_the_window_follows_the_new_timeline() {
        // 00000002.history: timeline 2 branched from 1 at 0/5000100 (segment 5).
        let ancestry = parse_history("# comment\n1\t0/5000100\tbefore 2026-12-06 10:00:00+00\n");
        assert_eq!(ancestry, [(1, 0x500_0100)]);
        let mut b = base(
            "b1",
            "test",
            "2026-12-06T09:00:00Z",
            "000000010000000000000002",
        );
        b.end_lsn = "0/2000100".into();
        let chain = chain_from(1, 0x200_0100, &ancestry, 2).unwrap();
        assert_eq!(chain, [(1, Some(0x500_0100)), (2, None)]);
        // A timeline that branched before the backup ended cannot be followed from it.
        assert_eq!(chain_from(1, 0x600_0000, &ancestry, 2), None);
        assert_eq!(chain_from(3, 0, &ancestry, 2), None);

        // Timeline 1 runs on past the branch (the old server until it stopped); recovery takes
        // 1's segments 2..4 and 2's from 5.
        let wal = listed(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000006",
            "000000020000000000000005",
            "000000020000000000000006",
            "00000002.history",
        ]);
        let reach = wal_reach(&b, &wal, &chain).unwrap();
        assert_eq!(reach.segment, "000000020000000000000006");
        assert_eq!(reach.gap_at, None);
        // Only the first timeline: its own newest segment, as before.
        let own = wal_reach(&b, &wal, &[(1, None)]).unwrap();
        assert_eq!(own.segment, "000000010000000000000006");
        // The new timeline has archived nothing yet: the window ends before the branch.
        let early = wal_reach(&b, &wal[..5], &chain).unwrap();
        assert_eq!(early.segment, "000000010000000000000004");
        assert_eq!(early.gap_at, None);
        // A segment missing before the branch is a gap, whatever follows on the new timeline.
        let mut holed = wal.clone();
        holed.remove(1);
        let reach = wal_reach(&b, &holed, &chain).unwrap();
        assert_eq!(reach.segment, "000000010000000000000002");
        assert_eq!(reach.gap_at.as_deref(), Some("000000010000000000000003"));
    }

    #[test]
    fn a_time_before_a_timeline_began_is_restored_on_its_parent_from_a_base_that_reaches_it() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        // Timeline 2 branched from 1 at 0/5000100 and began (its history archived) at 10:30.
        let histories = Histories(
            [(2, (vec![(1, 0x500_0100)], at("2026-12-06T10:30:00Z")))]
                .into_iter()
                .collect(),
        );
        let mut b1 = base(
            "b1",
            "test",
            "2026-12-06T09:00:00Z",
            "000000010000000000000002",
        );
        b1.end_lsn = "0/2000100".into();
        // b2 was taken on timeline 1 after the branch point (the old server ran on until the
        // swap): it cannot follow timeline 2.
        let mut b2 = base(
            "b2",
            "test",
            "2026-12-06T10:00:00Z",
            "000000010000000000000006",
        );
        b2.end_lsn = "0/6000100".into();
        assert_eq!(
            timeline_chain(&histories, &b1, None).unwrap(),
            [(1, Some(0x500_0100)), (2, None)]
        );
        // At 10:15 the live server was still on timeline 1: its state then is timeline 1's.
        assert_eq!(
            timeline_chain(&histories, &b1, Some(at("2026-12-06T10:15:00Z"))).unwrap(),
            [(1, None)]
        );
        assert_eq!(timeline_chain(&histories, &b2, None).unwrap(), [(1, None)]);

        // Archived (times 1000 + i s): timeline 1's segments 2..7, then timeline 2's 5..8.
        let mut wal = listed(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000006",
            "000000010000000000000007",
            "000000020000000000000005",
            "000000020000000000000006",
            "000000020000000000000007",
            "000000020000000000000008",
        ]);
        let late = at("2026-12-06T11:00:00Z");
        for w in wal.iter_mut().skip(6) {
            w.archived_at = late;
        }
        let bases = [b1, b2];
        // After the new timeline began, only b1 reaches it.
        let (chosen, reach, timeline) = base_for_time(&histories, &bases, &wal, late)
            .unwrap()
            .unwrap();
        assert_eq!((chosen.id.as_str(), timeline), ("b1", 2));
        assert_eq!(reach.segment, "000000020000000000000008");
        // Before it began: the newest base backup by then, on timeline 1.
        let (chosen, _, timeline) =
            base_for_time(&histories, &bases, &wal, at("2026-12-06T10:00:00Z"))
                .unwrap()
                .unwrap();
        assert_eq!((chosen.id.as_str(), timeline), ("b2", 1));
    }

    /// Lays out `segments` archived segments (a record and a body each, as `wal_push` names
    /// them) of timeline 1 from segment 1 in a file:// repository, without a push each.
    fn lay_out_wal(root: &std::path::Path, segments: u64, skip: Option<u64>) {
        let dir = root.join(crate::wal::WAL).join("00000001");
        std::fs::create_dir_all(&dir).unwrap();
        for n in (1..=segments).filter(|n| Some(*n) != skip) {
            let name = crate::wal::segment_name_in("00000001", n, 0x100);
            std::fs::write(dir.join(format!("{name}.json")), b"{}").unwrap();
            std::fs::write(dir.join(format!("{name}-{:064x}.zst", n)), b"x").unwrap();
        }
    }

    #[tokio::test]
    async fn the_window_stops_at_a_missing_segment_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        lay_out_wal(dir.path(), 300, Some(0x120));
        let url = format!("file://{}", dir.path().display());
        let repo = Repository::open(&url, crate::RepositoryOptions::default())
            .await
            .unwrap();
        let bases = [base(
            "b1",
            "prod",
            "2026-12-01T00:00:00Z",
            "000000010000000000000002",
        )];
        let window = recovery_window(&repo, &bases).await.unwrap().unwrap();
        assert_eq!(window.newest_segment, "00000001000000010000001F");
        assert_eq!(window.gap_at.as_deref(), Some("000000010000000100000020"));
    }

    #[tokio::test]
    async fn retention_keeps_the_base_backup_the_window_starts_from_and_the_wal_it_needs() {
        let repo = Repository::from_store(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            "memory",
            crate::RepositoryOptions::default(),
        );
        let bases = [
            base(
                "b1",
                "prod",
                "2026-12-01T00:00:00Z",
                "000000010000000000000002",
            ),
            base(
                "b2",
                "prod",
                "2026-12-02T00:00:00Z",
                "000000010000000000000005",
            ),
            base(
                "b3",
                "prod",
                "2026-12-04T00:00:00Z",
                "000000020000000000000009",
            ),
            base(
                "other",
                "dev",
                "2026-11-01T00:00:00Z",
                "000000010000000000000004",
            ),
        ];
        for b in &bases {
            let body = serde_json::to_vec(b).unwrap();
            repo.store()
                .put(&record_key(&b.id), PutPayload::from(body))
                .await
                .unwrap();
            repo.store()
                .put(&Path::from(b.key.as_str()), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000005.00000028.backup",
            "000000020000000000000009",
            "00000002.history",
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, name.as_bytes()).unwrap();
            crate::wal::wal_push(&repo, &path).await.unwrap();
        }
        let cutoff: DateTime<Utc> = "2026-12-03T00:00:00Z".parse().unwrap();

        let dry = prune_physical(&repo, "prod", cutoff, true).await.unwrap();
        assert_eq!(dry.deleted_base_backups, ["b1"]);
        assert_eq!(list_base_backups(&repo).await.unwrap().len(), 4, "dry run");

        // b2 is the newest before the cutoff: it stays; dev's base keeps segment 4 and on.
        let done = prune_physical(&repo, "prod", cutoff, false).await.unwrap();
        assert_eq!(done.deleted_base_backups, ["b1"]);
        assert_eq!(done.deleted_wal_files, 3);
        let ids: Vec<String> = list_base_backups(&repo)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(ids, ["other", "b2", "b3"]);
        assert!(
            repo.store()
                .head(&Path::from(format!("{BASE}/b1/base.tar.zst")))
                .await
                .is_err()
        );
        let names: Vec<String> = crate::wal::wal_list(&repo)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(
            names,
            [
                "000000010000000000000004",
                "000000010000000000000005",
                "000000010000000000000005.00000028.backup",
                "00000002.history",
                "000000020000000000000009",
            ]
        );
        assert!(
            crate::wal::wal_verify(&repo, true)
                .await
                .unwrap()
                .damaged
                .is_empty()
        );
    }
}
