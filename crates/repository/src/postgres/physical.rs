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

use std::io::Read;
use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::Archive;
use super::conn::{DbUrl, collect_stderr, connect, last_lines, major_of, tool_candidates};
use crate::pipe::{ChunkSink, copy_large, widen_pipe};
use crate::repo::{Repository, is_not_found};
use crate::store::retry;

pub(crate) const BASE: &str = "base";
const LEVEL: i32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
fn from_micros(us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).with_context(|| format!("server clock {us} us"))
}

/// What `rollcall repo base-backup` needs.
#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    /// A role with the REPLICATION attribute (pg_basebackup's connection).
    pub database_url: String,
    /// The environment the backup is recorded under, if any.
    pub env: Option<String>,
    /// Where the PostgreSQL tools are (default: PATH, then /usr/lib/postgresql/*/bin).
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for the server to archive the WAL the backup needs.
    pub wal_timeout: Duration,
}

impl BaseBackupOptions {
    pub fn new(database_url: impl Into<String>) -> BaseBackupOptions {
        BaseBackupOptions {
            database_url: database_url.into(),
            env: None,
            bin_dir: None,
            wal_timeout: Duration::from_secs(120),
        }
    }
}

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

/// Takes a base backup of the server `options.database_url` names into the repository and
/// commits it once the WAL from its start to its end is archived there.
pub async fn base_backup(repo: &Repository, options: &BaseBackupOptions) -> Result<BaseBackup> {
    let db = DbUrl::parse(&options.database_url)?;
    let mut conn = connect(&db, CONNECT_TIMEOUT).await?;
    let (system_identifier, version_num, segment_size, archive_mode, started_us): (
        String,
        i32,
        String,
        String,
        i64,
    ) = sqlx::query_as(
        "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
         current_setting('server_version_num')::int, \
         (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'), \
         current_setting('archive_mode'), \
         (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
    )
    .fetch_one(&mut conn)
    .await
    .with_context(|| format!("read the server settings of {}", db.display))?;
    let started_at = from_micros(started_us)?;
    if archive_mode == "off" {
        bail!(
            "{} does not archive its WAL (archive_mode = off): a base backup without archived \
             WAL restores to no point in time. Set archive_mode = on and archive_command = \
             'rollcall repo wal-push --repo {} %p', restart the server, then back up again",
            db.display,
            repo.label()
        );
    }
    let wal_segment_size: u64 = segment_size
        .parse()
        .with_context(|| format!("wal_segment_size {segment_size:?} of {}", db.display))?;
    let server_version_num = version_num.max(0) as u32;
    let candidates = tool_candidates("pg_basebackup", options.bin_dir.as_deref())?;
    let (tool, _) =
        super::conn::pick_tool(&candidates, "pg_basebackup", server_version_num / 10000).await?;

    let id = format!(
        "{}-{}",
        started_at.format("%Y%m%dT%H%M%SZ"),
        crate::layout::random_suffix()
    );
    let key = body_key(&id);
    let mut cmd = Command::new(&tool);
    cmd.arg("-d")
        .arg(&db.without_password)
        .args([
            "-D", "-", "-F", "tar", "-X", "none", "-c", "fast", "--label",
        ])
        .arg(format!("rollcall {id}"));
    db.apply_password(&mut cmd);
    let streamed = stream_into(repo, &key, cmd).await?;

    let committed = async {
        let (start_lsn, timeline) = parse_label(&streamed.label)?;
        let end_lsn = parse_manifest_end(&streamed.manifest)?;
        let start_wal = segment_name(timeline, start_lsn, wal_segment_size);
        let end_wal = segment_name(timeline, end_lsn.saturating_sub(1), wal_segment_size);
        wait_for_wal(
            repo,
            timeline,
            start_lsn,
            end_lsn,
            wal_segment_size,
            options.wal_timeout,
        )
        .await?;
        let consistent_at: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
                .fetch_one(&mut conn)
                .await
                .with_context(|| format!("read the clock of {}", db.display))?;
        let consistent_at = from_micros(consistent_at)?;
        let record = BaseBackup {
            id: id.clone(),
            env: options.env.clone(),
            system_identifier,
            server_version_num,
            wal_segment_size,
            timeline,
            start_lsn: format_lsn(start_lsn),
            end_lsn: format_lsn(end_lsn),
            start_wal,
            end_wal,
            started_at,
            consistent_at,
            key: key.to_string(),
            size: streamed.size,
            sha256: streamed.sha256.clone(),
            tar_size: streamed.tar_size,
        };
        let encoded = serde_json::to_vec_pretty(&record).context("encode the record")?;
        let record_key = record_key(&id);
        repo.store()
            .put_opts(
                &record_key,
                PutPayload::from(Bytes::from(encoded)),
                PutMode::Create.into(),
            )
            .await
            .with_context(|| format!("write {record_key} to {}", repo.label()))?;
        repo.make_durable().await?;
        Ok(record)
    }
    .await;
    if committed.is_err() {
        // Nothing references the body: leave nothing behind.
        let _ = repo.store().delete(&key).await;
    }
    committed
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

/// The window the base backups and the archived WAL cover, `None` without a base backup.
pub async fn recovery_window(repo: &Repository) -> Result<Option<RecoveryWindow>> {
    let bases = list_base_backups(repo).await?;
    let (Some(oldest), Some(newest)) = (bases.first(), bases.last()) else {
        return Ok(None);
    };
    let wal = crate::wal::wal_list(repo).await?;
    let reach = wal_reach(newest, &wal)?;
    Ok(Some(RecoveryWindow {
        earliest: oldest.consistent_at,
        latest: reach.pushed_at.max(newest.consistent_at),
        newest_segment: reach.segment,
        gap_at: reach.gap_at,
        base_backups: bases.len(),
    }))
}

struct Reach {
    segment: String,
    pushed_at: DateTime<Utc>,
    gap_at: Option<String>,
}

/// How far the archive runs without a gap from `base`'s first segment, on its timeline.
fn wal_reach(base: &BaseBackup, wal: &[crate::wal::WalRecord]) -> Result<Reach> {
    let per_log = 0x1_0000_0000u64 / base.wal_segment_size.max(1);
    let timeline = format!("{:08X}", base.timeline);
    let number = |name: &str| -> Option<u64> {
        if name.len() != 24 || !name.starts_with(&timeline) {
            return None;
        }
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        Some(log * per_log + seg)
    };
    let segments: std::collections::BTreeMap<u64, &crate::wal::WalRecord> = wal
        .iter()
        .filter_map(|r| number(&r.name).map(|n| (n, r)))
        .collect();
    let first = number(&base.start_wal).context("the base backup's first segment name")?;
    let mut n = first;
    let mut last = None;
    while let Some(record) = segments.get(&n) {
        last = Some(*record);
        n += 1;
    }
    let Some(last) = last else {
        bail!(
            "the archive does not hold {}, the first WAL segment base backup {} needs",
            base.start_wal,
            base.id
        );
    };
    let gap_at = segments
        .range(n..)
        .next()
        .map(|_| format!("{timeline}{:08X}{:08X}", n / per_log, n % per_log));
    Ok(Reach {
        segment: last.name.clone(),
        pushed_at: last.pushed_at,
        gap_at,
    })
}

/// What `rollcall repo restore-postgres --to-time` needs.
#[derive(Debug, Clone)]
pub struct PitrOptions {
    pub to_time: DateTime<Utc>,
    /// Must not exist, or be an empty directory.
    pub data_dir: PathBuf,
    /// A base backup to start from (default: the newest consistent at or before `to_time`).
    pub base: Option<String>,
    /// Postgres' restore_command for the recovery (`rollcall repo wal-fetch --repo URL %f %p`).
    pub restore_command: String,
    /// Run the recovery now (default); otherwise the directory recovers when first started.
    pub recover: bool,
    /// The user the server runs as when this process is root (default: the owner of the data
    /// directory's parent, else `postgres`).
    pub run_as: Option<String>,
    pub bin_dir: Option<PathBuf>,
    /// The longest the recovery may take.
    pub timeout: Duration,
}

/// What a restore to a time did.
#[derive(Debug, Clone, Serialize)]
pub struct PitrReport {
    pub base_backup: String,
    pub to_time: DateTime<Utc>,
    pub data_dir: PathBuf,
    /// Whether the recovery ran (else it runs at the first start).
    pub recovered: bool,
    /// The server's own words on where it stopped and its last transaction.
    pub stopped: Option<String>,
    pub last_transaction_at: Option<String>,
    pub timeline: Option<u32>,
    /// `pg_verifybackup`'s verdict on the unpacked backup.
    pub verified: String,
    /// The recovery's server log.
    pub log: Option<PathBuf>,
    pub seconds: f64,
}

/// Writes a data directory recovered to `options.to_time` from the repository's base backups
/// and archived WAL. Nothing is written to `options.data_dir` until the recovery succeeded.
pub async fn restore_to_time(repo: &Repository, options: &PitrOptions) -> Result<PitrReport> {
    let started = Instant::now();
    let dest = &options.data_dir;
    let shown = dest.display().to_string();
    if std::fs::read_dir(dest).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "{shown} is not empty: a restore writes a new data directory and never over one; \
             give a path that does not exist yet"
        );
    }
    if dest.exists() && !dest.is_dir() {
        bail!("{shown} exists and is not a directory: give a path that does not exist yet");
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(FsPath::new("."));
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{shown} has no directory name"))?;
    if !parent.is_dir() {
        bail!(
            "{} does not exist: create the parent directory of {shown} first",
            parent.display()
        );
    }

    let bases = list_base_backups(repo).await?;
    let base = choose_base(&bases, options.to_time, options.base.as_deref(), repo)?;
    let wal = crate::wal::wal_list(repo).await?;
    let reach = wal_reach(base, &wal)?;
    if options.to_time > reach.pushed_at {
        let gap = reach
            .gap_at
            .as_ref()
            .map(|g| format!(" (segment {g} is missing, the archive has a gap there)"))
            .unwrap_or_default();
        bail!(
            "{} is later than the archived WAL reaches: its newest segment usable from base \
             backup {}, {}, was archived at {}{gap}. Restore to an earlier time, or check that \
             the server's archive_command pushes to {}",
            options.to_time.to_rfc3339(),
            base.id,
            reach.segment,
            reach.pushed_at.to_rfc3339(),
            repo.label()
        );
    }
    let major = base.server_version_num / 10000;
    let run_as = run_as_user(options.run_as.as_deref(), parent)?;

    let partial = parent.join(format!(".{name}.rollcall-partial"));
    let tar = parent.join(format!(".{name}.rollcall-base.tar"));
    let log = parent.join(format!("{name}.rollcall-recovery.log"));
    // Left by an earlier restore that died: ours by name, never the operator's. Its recovery
    // server may outlive it: stop that first.
    if partial.join("postmaster.pid").exists()
        && let Some(pg_ctl) = server_tool("pg_ctl", options.bin_dir.as_deref(), major).await
    {
        let _ = as_user(&pg_ctl, run_as.as_ref())
            .args(["stop", "-m", "immediate", "-w", "-t", "60", "-D"])
            .arg(&partial)
            .stdin(Stdio::null())
            .output()
            .await;
    }
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_file(&tar);

    let result = async {
        let archive = Archive {
            key: base.key.clone(),
            size: base.size,
            sha256: base.sha256.clone(),
            compressed: true,
        };
        super::fetch::fetch_archive(repo, &archive, &tar, false)
            .await
            .with_context(|| format!("fetch base backup {}", base.id))?;
        let (from, into) = (tar.clone(), partial.clone());
        tokio::task::spawn_blocking(move || unpack(&from, &into))
            .await
            .context("unpack the base backup")??;
        let _ = std::fs::remove_file(&tar);
        let verified = verify_unpacked(&partial, options.bin_dir.as_deref(), major).await?;
        write_recovery_settings(&partial, options)?;
        if let Some(user) = &run_as {
            chown_tree(&partial, user)?;
        }
        let mut report = PitrReport {
            base_backup: base.id.clone(),
            to_time: options.to_time,
            data_dir: dest.clone(),
            recovered: false,
            stopped: None,
            last_transaction_at: None,
            timeline: None,
            verified,
            log: None,
            seconds: 0.0,
        };
        if options.recover {
            recover(&partial, &log, run_as.as_ref(), options, major, &mut report).await?;
        }
        if dest.exists() {
            std::fs::remove_dir(dest)
                .with_context(|| format!("{shown} was empty and could not be replaced"))?;
        }
        std::fs::rename(&partial, dest)
            .with_context(|| format!("move the restored data directory to {shown}"))?;
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_file(&tar);
    }
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn choose_base<'a>(
    bases: &'a [BaseBackup],
    to_time: DateTime<Utc>,
    wanted: Option<&str>,
    repo: &Repository,
) -> Result<&'a BaseBackup> {
    if let Some(id) = wanted {
        let base = bases.iter().find(|b| b.id == id).with_context(|| {
            format!(
                "base backup {id} is not in {} (`rollcall repo base-backups --repo URL` lists them)",
                repo.label()
            )
        })?;
        if base.consistent_at > to_time {
            bail!(
                "base backup {id} is consistent only from {}; {} is earlier: pick an older base \
                 backup or a later time",
                base.consistent_at.to_rfc3339(),
                to_time.to_rfc3339()
            );
        }
        return Ok(base);
    }
    let Some(first) = bases.first() else {
        bail!(
            "{} holds no base backup: take one with `rollcall repo base-backup --repo URL \
             --database-url URL` (WAL archiving must be on)",
            repo.label()
        );
    };
    bases
        .iter()
        .rev()
        .find(|b| b.consistent_at <= to_time)
        .with_context(|| {
            format!(
                "{} is before the earliest time {} restores to ({}, when base backup {} became \
                 consistent)",
                to_time.to_rfc3339(),
                repo.label(),
                first.consistent_at.to_rfc3339(),
                first.id
            )
        })
}

/// The user the server runs as: none unless this process is root, which Postgres refuses.
fn run_as_user(wanted: Option<&str>, parent: &FsPath) -> Result<Option<nix::unistd::User>> {
    if !nix::unistd::geteuid().is_root() {
        if let Some(name) = wanted {
            bail!("--run-as {name} needs root; run as the user the server should run as instead");
        }
        return Ok(None);
    }
    let user = match wanted {
        Some(name) => nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .with_context(|| format!("--run-as {name}: no such user"))?,
        None => {
            use std::os::unix::fs::MetadataExt;
            let owner = std::fs::metadata(parent)
                .with_context(|| format!("read {}", parent.display()))?
                .uid();
            let by_owner = (owner != 0)
                .then(|| nix::unistd::User::from_uid(owner.into()).ok().flatten())
                .flatten();
            match by_owner {
                Some(user) => user,
                None => nix::unistd::User::from_name("postgres")
                    .ok()
                    .flatten()
                    .context(
                        "Postgres does not run as root and there is no `postgres` user: give \
                         --run-as USER",
                    )?,
            }
        }
    };
    if user.uid.is_root() {
        bail!("Postgres does not run as root: give --run-as USER with another user");
    }
    Ok(Some(user))
}

/// Unpacks the tar into `into` (created 0700, as Postgres requires); entries leaving it are
/// refused by the tar reader.
fn unpack(tar: &FsPath, into: &FsPath) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(into)
        .with_context(|| format!("create {}", into.display()))?;
    let file = std::fs::File::open(tar).with_context(|| format!("open {}", tar.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    archive.set_preserve_permissions(true);
    archive
        .unpack(into)
        .with_context(|| format!("unpack the base backup into {}", into.display()))
}

async fn verify_unpacked(dir: &FsPath, bin_dir: Option<&FsPath>, major: u32) -> Result<String> {
    let Some(tool) = server_tool("pg_verifybackup", bin_dir, major).await else {
        return Ok(format!(
            "not verified: no pg_verifybackup {major} found (the tar's sha256 was checked)"
        ));
    };
    let out = Command::new(&tool)
        .args(["--no-parse-wal", "--exit-on-error", "--quiet"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {}", tool.display()))?;
    if !out.status.success() {
        bail!(
            "the base backup does not match its manifest (pg_verifybackup: {}): it is damaged; \
             restore from another base backup",
            last_lines(&String::from_utf8_lossy(&out.stderr), 5)
        );
    }
    Ok("pg_verifybackup: every file matches the backup manifest".to_owned())
}

/// A server tool of exactly `major` (the data directory's version).
async fn server_tool(name: &str, bin_dir: Option<&FsPath>, major: u32) -> Option<PathBuf> {
    for path in tool_candidates(name, bin_dir).ok()? {
        let out = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .ok()?;
        if out.status.success() && major_of(&String::from_utf8_lossy(&out.stdout)) == Some(major) {
            return Some(path);
        }
    }
    None
}

/// A setting's value quoted for postgresql.conf.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn write_recovery_settings(dir: &FsPath, options: &PitrOptions) -> Result<()> {
    use std::io::Write;
    let auto = dir.join("postgresql.auto.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&auto)
        .with_context(|| format!("open {}", auto.display()))?;
    // Archiving stays off: a restored copy must not push a new timeline into the repository
    // the production server archives into. Turn it on with a repository of its own.
    let settings = format!(
        "\n# Added by rollcall repo restore-postgres --to-time\n\
         restore_command = {}\n\
         recovery_target_time = {}\n\
         recovery_target_action = 'promote'\n\
         archive_mode = 'off'\n",
        conf_quote(&options.restore_command),
        conf_quote(&options.to_time.to_rfc3339()),
    );
    file.write_all(settings.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", auto.display()))?;
    std::fs::write(dir.join("recovery.signal"), b"")
        .with_context(|| format!("write {}/recovery.signal", dir.display()))?;
    Ok(())
}

fn chown_tree(root: &FsPath, user: &nix::unistd::User) -> Result<()> {
    let chown = |path: &FsPath| {
        nix::unistd::chown(path, Some(user.uid), Some(user.gid))
            .with_context(|| format!("give {} to {}", path.display(), user.name))
    };
    chown(root)?;
    if !root.is_dir() || root.is_symlink() {
        return Ok(());
    }
    for entry in std::fs::read_dir(root).with_context(|| format!("read {}", root.display()))? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            chown_tree(&path, user)?;
        } else {
            chown(&path)?;
        }
    }
    Ok(())
}

fn as_user(program: &FsPath, user: Option<&nix::unistd::User>) -> Command {
    match user {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", &user.name, "--"]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Runs the recovery: the server on a private socket directory (no TCP), until it removes
/// `recovery.signal` (it promoted at the target), then a clean stop.
async fn recover(
    dir: &FsPath,
    log: &FsPath,
    user: Option<&nix::unistd::User>,
    options: &PitrOptions,
    major: u32,
    report: &mut PitrReport,
) -> Result<()> {
    let pg_ctl = server_tool("pg_ctl", options.bin_dir.as_deref(), major)
        .await
        .with_context(|| {
            format!(
                "pg_ctl of PostgreSQL {major} (the base backup's version) was not found: install \
                 the PostgreSQL {major} server, or restore with --no-recover and start the \
                 directory where it is"
            )
        })?;
    let sockets = tempfile::Builder::new()
        .prefix("rollcall-pitr-")
        .tempdir()
        .context("create a socket directory for the recovery")?;
    if let Some(user) = user {
        chown_tree(sockets.path(), user)?;
    }
    let _ = std::fs::remove_file(log);
    std::fs::write(log, b"").with_context(|| format!("create {}", log.display()))?;
    if let Some(user) = user {
        chown_tree(log, user)?;
    }
    // Any port: the socket directory is private, nothing listens on TCP.
    let port = 20000 + (std::process::id() % 20000);
    let server_options = format!(
        "-c listen_addresses='' -c unix_socket_directories='{}' -p {port}",
        sockets.path().display()
    );
    let started = as_user(&pg_ctl, user)
        .arg("start")
        .arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(log)
        .args(["-o", &server_options, "-W"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {} start", pg_ctl.display()))?;
    let stop = || async {
        let _ = as_user(&pg_ctl, user)
            .args(["stop", "-m", "fast", "-w", "-t", "120", "-D"])
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .await;
    };
    if !started.status.success() {
        bail!(
            "the recovery server did not start: {}",
            last_lines(&String::from_utf8_lossy(&started.stderr), 5)
        );
    }
    let begun = Instant::now();
    let deadline = begun + options.timeout;
    let mut seen_running = false;
    let outcome = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // The signal file goes when the server picks its new timeline; it is open for
        // writes once its end-of-recovery checkpoint is done.
        if !dir.join("recovery.signal").exists()
            && text.contains("database system is ready to accept connections")
        {
            break Ok(text);
        }
        let running = dir.join("postmaster.pid").exists();
        seen_running |= running;
        // pg_ctl returned before the server wrote its pid file: give it a moment to appear.
        let gone = !running && (seen_running || begun.elapsed() > Duration::from_secs(30));
        if gone || text.contains("FATAL:") || text.contains("PANIC:") {
            break Err(recovery_failure(&text, options));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "the recovery did not finish within {} s; its log: {}",
                options.timeout.as_secs(),
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop().await;
    report.log = Some(log.to_path_buf());
    let text = outcome?;
    // The last start's lines only.
    for line in text.lines() {
        if let Some((_, rest)) = line.split_once("recovery stopping ") {
            report.stopped = Some(format!("recovery stopping {rest}"));
        }
        if let Some((_, rest)) = line.split_once("last completed transaction was at log time ") {
            report.last_transaction_at = Some(rest.trim().to_owned());
        }
        if let Some((_, rest)) = line.split_once("selected new timeline ID: ") {
            report.timeline = rest.trim().parse().ok();
        }
    }
    if dir.join("postmaster.pid").exists() {
        bail!(
            "the recovery server did not stop; stop it with pg_ctl stop -D {}",
            dir.display()
        );
    }
    // A directory stopped in the middle of its end of recovery would replay on its next start
    // whatever WAL it holds, past the target: only a clean shutdown on the new timeline is
    // a recovered directory.
    let controldata = server_tool("pg_controldata", options.bin_dir.as_deref(), major)
        .await
        .with_context(|| format!("pg_controldata of PostgreSQL {major} was not found"))?;
    let out = Command::new(&controldata)
        .arg(dir)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {}", controldata.display()))?;
    let control = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        control
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let state = field("Database cluster state:").unwrap_or_default();
    let timeline: Option<u32> =
        field("Latest checkpoint's TimeLineID:").and_then(|v| v.parse().ok());
    if state != "shut down" || timeline.is_none() || timeline != report.timeline {
        bail!(
            "the recovered directory was not shut down cleanly on its new timeline (state \
             {state:?}, timeline {timeline:?}, the recovery chose {:?}); its log: {}",
            report.timeline,
            log.display()
        );
    }
    report.recovered = true;
    Ok(())
}

fn recovery_failure(log: &str, options: &PitrOptions) -> anyhow::Error {
    if log.contains("recovery ended before configured recovery target was reached") {
        return anyhow::anyhow!(
            "the archived WAL ends before {}: the server recovered everything the repository \
             holds and had not reached it. Restore to an earlier time, or wait until the \
             server has archived the segment holding it",
            options.to_time.to_rfc3339()
        );
    }
    let fatal: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        .collect();
    anyhow::anyhow!(
        "the recovery failed: {}",
        if fatal.is_empty() {
            last_lines(log, 5)
        } else {
            fatal.join(" | ")
        }
    )
}

/// `0/2000028` → its position.
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn segment_name(timeline: u32, lsn: u64, segment_size: u64) -> String {
    let per_log = 0x1_0000_0000u64 / segment_size.max(1);
    let n = lsn / segment_size.max(1);
    format!("{timeline:08X}{:08X}{:08X}", n / per_log, n % per_log)
}

/// `backup_label`: START WAL LOCATION and START TIMELINE.
fn parse_label(label: &str) -> Result<(u64, u32)> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let start = field("START WAL LOCATION:")
        .and_then(|v| parse_lsn(v.split_whitespace().next().unwrap_or_default()))
        .context("the backup's backup_label has no START WAL LOCATION")?;
    let timeline = field("START TIMELINE:")
        .and_then(|v| v.parse().ok())
        .context("the backup's backup_label has no START TIMELINE")?;
    Ok((start, timeline))
}

/// The end of the last WAL range `backup_manifest` says the backup needs.
fn parse_manifest_end(manifest: &str) -> Result<u64> {
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(rename = "WAL-Ranges")]
        wal_ranges: Vec<Range>,
    }
    #[derive(Deserialize)]
    struct Range {
        #[serde(rename = "End-LSN")]
        end: String,
    }
    let manifest: Manifest =
        serde_json::from_str(manifest).context("the backup's backup_manifest does not read")?;
    manifest
        .wal_ranges
        .iter()
        .filter_map(|r| parse_lsn(&r.end))
        .max()
        .context("the backup's backup_manifest has no WAL range")
}

async fn wait_for_wal(
    repo: &Repository,
    timeline: u32,
    start: u64,
    end: u64,
    segment_size: u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let first = start / segment_size;
    let last = end.saturating_sub(1) / segment_size;
    let mut n = first;
    while n <= last {
        let name = segment_name(timeline, n * segment_size, segment_size);
        if crate::wal::read_record(repo, &name).await?.is_some() {
            n += 1;
            continue;
        }
        if Instant::now() > deadline {
            bail!(
                "the base backup needs WAL segment {name}, which did not arrive in {} within {} \
                 s: is the server's archive_command `rollcall repo wal-push --repo {} %p`? \
                 (pg_stat_archiver shows its failures). Nothing was committed",
                repo.label(),
                timeout.as_secs(),
                repo.label()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// What [`stream_into`] stored, and the two files it read on the way.
struct Streamed {
    size: u64,
    sha256: String,
    tar_size: u64,
    label: String,
    manifest: String,
}

/// A reader that copies what it reads into `out`.
struct Tee<R, W> {
    input: R,
    out: W,
    count: u64,
}

impl<R: Read, W: std::io::Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.out.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Runs pg_basebackup with its tar on stdout: compressed and uploaded while hashed, and read
/// on the way for its `backup_label` and `backup_manifest`. Completed only when pg_basebackup
/// succeeded; aborted otherwise.
async fn stream_into(repo: &Repository, key: &Path, mut cmd: Command) -> Result<Streamed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("start pg_basebackup")?;
    let stdout = std::fs::File::from(
        child
            .stdout
            .take()
            .context("capture pg_basebackup's output")?
            .into_owned_fd()
            .context("capture pg_basebackup's output")?,
    );
    widen_pipe(&stdout);
    let stderr = collect_stderr(child.stderr.take());

    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let compress = tokio::task::spawn_blocking(move || -> Result<(u64, String, String)> {
        let sink = ChunkSink::new(tx, 1 << 20);
        let mut encoder = zstd::stream::write::Encoder::new(sink, LEVEL)?;
        encoder.include_checksum(true)?;
        let mut tee = Tee {
            input: stdout,
            out: encoder,
            count: 0,
        };
        let (mut label, mut manifest) = (String::new(), String::new());
        {
            let mut archive = tar::Archive::new(&mut tee);
            for entry in archive.entries().context("read pg_basebackup's tar")? {
                let mut entry = entry.context("read pg_basebackup's tar")?;
                let path = entry
                    .path()
                    .context("read pg_basebackup's tar")?
                    .to_string_lossy()
                    .into_owned();
                let into = match path.trim_start_matches("./") {
                    "backup_label" => &mut label,
                    "backup_manifest" => &mut manifest,
                    _ => continue,
                };
                entry
                    .read_to_string(into)
                    .context("read pg_basebackup's tar")?;
            }
        }
        // The tar's closing blocks, and anything after them.
        copy_large(&mut tee.input, &mut tee.out)?;
        let mut sink = tee.out.finish()?;
        std::io::Write::flush(&mut sink)?;
        Ok((tee.count, label, manifest))
    });

    let upload = retry(&repo.options.retry, "start base backup upload", || async {
        repo.store
            .put_multipart(key)
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .with_context(|| format!("start uploading {key} to repository {}", repo.label))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut upload_error = None;
    while let Some(chunk) = rx.recv().await {
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if let Err(e) = writer.wait_for_capacity(4).await {
            upload_error = Some(e);
            break;
        }
        writer.put(chunk);
    }
    drop(rx);
    let compressed = compress.await;
    if upload_error.is_some() {
        let _ = child.start_kill();
    }
    let status = child.wait().await.context("wait for pg_basebackup")?;
    let stderr = stderr.await.unwrap_or_default();
    let outcome = if let Some(e) = upload_error {
        Err(anyhow::Error::new(e).context(format!("upload to repository {}", repo.label)))
    } else if !status.success() {
        Err(anyhow::anyhow!(
            "pg_basebackup failed ({status}): {}{}",
            last_lines(&stderr, 10),
            if stderr.contains("replication") {
                " (the role needs the REPLICATION attribute and a pg_hba.conf line for \
                 replication connections)"
            } else {
                ""
            }
        ))
    } else {
        match compressed {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(e)) => Err(e.context("compress pg_basebackup's tar")),
            Err(e) => Err(anyhow::Error::new(e).context("compress pg_basebackup's tar")),
        }
    };
    let (tar_size, label, manifest) = match outcome {
        Ok(read) => read,
        Err(e) => {
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    if label.is_empty() || manifest.is_empty() {
        let _ = writer.abort().await;
        bail!(
            "pg_basebackup's tar has no {}: is it PostgreSQL 13 or newer?",
            if label.is_empty() {
                "backup_label"
            } else {
                "backup_manifest"
            }
        );
    }
    writer
        .finish()
        .await
        .with_context(|| format!("complete the upload of {key}"))?;
    Ok(Streamed {
        size,
        sha256: hex::encode(hasher.finalize()),
        tar_size,
        label,
        manifest,
    })
}

/// Checks every base backup's body: present with its recorded size, and (`full`) its sha256.
/// Returns each backup with the problem found, if any.
pub async fn verify_base_backups(
    repo: &Repository,
    full: bool,
) -> Result<Vec<(BaseBackup, Option<String>)>> {
    use futures::StreamExt;
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
                let got = repo
                    .store()
                    .get(&key)
                    .await
                    .with_context(|| format!("read {key} from {}", repo.label()))?;
                let mut stream = crate::body::body_stream(got);
                let mut hasher = Sha256::new();
                let mut failed = None;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => hasher.update(&chunk),
                        Err(e) => {
                            failed = Some(format!("its body {key} is unreadable: {e}"));
                            break;
                        }
                    }
                }
                failed.or_else(|| {
                    let actual = hex::encode(hasher.finalize());
                    (actual != base.sha256).then(|| {
                        format!(
                            "its body {key} hashes to {actual}, the record says {}",
                            base.sha256
                        )
                    })
                })
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
    let mut report = PhysicalPrune::default();
    for base in &doomed {
        if !dry_run {
            delete(repo, &record_key(&base.id)).await?;
            delete(repo, &Path::from(base.key.as_str())).await?;
        }
        report.deleted_base_backups.push(base.id.clone());
    }
    // A segment's place regardless of timeline: its log and segment numbers, fixed-width hex.
    let Some(oldest_needed) = remaining.iter().map(|b| b.start_wal[8..].to_owned()).min() else {
        return Ok(report);
    };
    for record in crate::wal::wal_list(repo).await? {
        let place = record.name.get(8..24).filter(|_| record.name.len() >= 24);
        if place.is_none_or(|p| p >= oldest_needed.as_str()) {
            continue; // history files, and what a remaining base backup needs
        }
        if !dry_run {
            delete(repo, &crate::wal::record_key(&record.name)).await?;
            delete(repo, &Path::from(record.body.as_str())).await?;
        }
        report.deleted_wal_files += 1;
    }
    Ok(report)
}

async fn delete(repo: &Repository, key: &Path) -> Result<()> {
    match repo.store().delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e))
            .with_context(|| format!("delete {key} from {}", repo.label())),
    }
}

/// Whether `id` names a committed base backup.
pub async fn read_base_backup(repo: &Repository, id: &str) -> Result<Option<BaseBackup>> {
    let key = record_key(id);
    match repo.get_bytes(&key, "base backup record").await {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
            repo.damaged("base backup record", &key, format!("does not read: {e}"))
        })?)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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

    #[test]
    fn label_and_manifest_give_the_wal_range() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n";
        assert_eq!(parse_label(label).unwrap(), (0x200_0028, 1));
        assert!(parse_label("LABEL: x\n").is_err());
        let manifest = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]}"#;
        assert_eq!(parse_manifest_end(manifest).unwrap(), 0x200_0100);
        assert!(parse_manifest_end(r#"{"WAL-Ranges": []}"#).is_err());
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

    #[test]
    fn settings_are_quoted_for_postgresql_conf() {
        assert_eq!(conf_quote("a 'b' c"), "'a ''b'' c'");
    }
}
