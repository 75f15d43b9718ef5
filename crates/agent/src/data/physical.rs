//! The database agent's restores to a time (`[postgres.physical]`): the live server's data
//! directory recovered beside it while it serves (prepare), then swapped in and started on
//! the same port and settings, the previous directory kept (commit). See
//! `repository::swap_data_dir` for the swap and what it guarantees.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::model::RepositoryRef;
use api::model::output::{
    Counts, PhysicalRestore, PreflightOutput, PreparePostgresOutput, RestorePostgresOutput,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{DataPlane, run_tag};
use crate::progress::Reporter;

/// `[postgres.physical]` in agent.toml: the live server's data directory, which a run to a
/// time (`rollcall drill --to-time T`) replaces with one recovered to T.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhysicalConfig {
    /// The live server's data directory (it must run from there, started by pg_ctl or a
    /// service manager that tolerates the agent stopping and starting it).
    pub data_dir: PathBuf,
    /// The user the server runs as (when the agent runs as root; default `postgres`).
    pub run_as: Option<String>,
    /// The rollcall binary the recovering server runs as its restore_command
    /// (`rollcall repo wal-fetch`); default: this agent's own binary. The server's user must
    /// be able to run it, and needs the repository's credentials in its environment.
    pub rollcall: Option<PathBuf>,
    /// How long the recovery may take, in seconds (default 7200).
    #[serde(default = "default_recovery_timeout")]
    pub recovery_timeout_s: u64,
    /// How long stopping or starting a server may take, in seconds (default 300).
    #[serde(default = "default_server_timeout")]
    pub server_timeout_s: u64,
    /// How long a base backup waits, once streamed, for the server to archive the WAL it
    /// needs, in seconds (default 600): an archive that lags more fails the base backup.
    #[serde(default = "default_wal_timeout")]
    pub base_backup_wal_timeout_s: u64,
}

fn default_wal_timeout() -> u64 {
    600
}

fn default_recovery_timeout() -> u64 {
    7200
}

fn default_server_timeout() -> u64 {
    300
}

/// Beside the recovered directory: what prepare made, so a re-sent prepare and the commit know
/// it (`DIR.restore_<tag>.rollcall.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Prepared {
    to_time: DateTime<Utc>,
    restore: PhysicalRestore,
    archive_bytes: u64,
}

fn prepared_path(restored: &Path) -> PathBuf {
    let mut name = restored.as_os_str().to_owned();
    name.push(".rollcall.json");
    PathBuf::from(name)
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn shown(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

impl DataPlane {
    fn physical(&self) -> Result<(&super::Postgres, &PhysicalConfig)> {
        let pg = self.postgres()?;
        let physical = pg.config.physical.as_ref().context(
            "this database agent has no [postgres.physical]: a restore to a time replaces the \
             server's data directory, so name it there (data_dir, and run_as when the agent \
             runs as root)",
        )?;
        Ok((pg, physical))
    }

    fn server_tools(&self) -> Result<repository::ServerTools> {
        let (pg, physical) = self.physical()?;
        Ok(repository::ServerTools {
            bin_dir: pg.config.bin_dir.clone(),
            run_as: physical.run_as.clone(),
            timeout: Duration::from_secs(physical.server_timeout_s),
        })
    }

    /// The base backup a restore of this environment to `at` starts from, and how far its WAL
    /// reaches: among those taken with `--env` of this agent's environment, the newest
    /// consistent at or before `at` whose WAL reaches `at` along the timelines recovery follows
    /// (`repository::base_backup_for_time`).
    async fn base_for(
        &self,
        repo: &repository::Repository,
        at: DateTime<Utc>,
    ) -> Result<(repository::BaseBackup, repository::RecoveryWindow)> {
        let mut bases = repository::list_base_backups(repo).await?;
        bases.retain(|b| b.env.as_deref() == Some(self.environment.as_str()));
        repository::base_backup_for_time(repo, &bases, at)
            .await?
            .with_context(|| {
                format!(
                    "no base backup of environment {} in {} is consistent at or before {}: \
                     take one with `rollcall repo base-backup --env {}`, or pick a later time",
                    self.environment,
                    repo.label(),
                    shown(at),
                    self.environment
                )
            })
    }

    /// Preflight of a run to a time: the base backup to start from exists and the archived
    /// WAL reaches the time, the data directory is configured and is the live server's; the
    /// live counts are recorded for the report's "before".
    pub(super) async fn preflight_physical(
        &self,
        repo: &RepositoryRef,
        at: DateTime<Utc>,
    ) -> Result<PreflightOutput> {
        let (pg, physical) = self.physical()?;
        let repo = repo.open().await?;
        let (base, window) = self.base_for(&repo, at).await?;
        if at > window.latest {
            bail!(
                "{} is later than the archived WAL reaches from base backup {} ({}, segment \
                 {}): pick an earlier time",
                shown(at),
                base.id,
                window.latest.to_rfc3339(),
                window.newest_segment
            );
        }
        check_room(&physical.data_dir, &base, 0)?;
        same_filesystem_as_parent(&physical.data_dir)?;
        repository::start_options(&physical.data_dir).with_context(|| {
            format!(
                "[postgres.physical] data_dir {}",
                physical.data_dir.display()
            )
        })?;
        // The directory the swap would replace is the cluster the base backup was taken of:
        // a data_dir naming another cluster on the host is refused before anything stops.
        let cluster = self
            .server_tools()?
            .system_identifier(&physical.data_dir)
            .await
            .with_context(|| {
                format!(
                    "read the cluster of [postgres.physical] data_dir {}",
                    physical.data_dir.display()
                )
            })?;
        if cluster != base.system_identifier {
            bail!(
                "[postgres.physical] data_dir {} is the data directory of cluster {cluster}, and \
                 base backup {} was taken of cluster {}: it names another server's directory \
                 (fix data_dir), or the server was re-created since (take a new base backup); \
                 nothing was changed",
                physical.data_dir.display(),
                base.id,
                base.system_identifier
            );
        }
        let (counts, checks) = super::postgres::live_state(&pg.url()?, &pg.counts, None).await?;
        Ok(PreflightOutput {
            verify: None,
            live_counts: Some(counts),
            checks,
        })
    }

    /// Recovers the live server's data directory to `at` beside it
    /// (`DIR.restore_<tag>`), while the live server serves: a missing WAL segment or a damaged
    /// base backup fails here with nothing live changed. A directory an earlier prepare of the
    /// same run and time finished is kept.
    pub async fn prepare_to_time(
        &self,
        repo_ref: &RepositoryRef,
        at: DateTime<Utc>,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<PreparePostgresOutput> {
        let started = Instant::now();
        let (_, physical) = self.physical()?;
        let tag = run_tag(run_id);
        let dirs = repository::DataDirSwap::new(&physical.data_dir, &tag);
        let record = prepared_path(&dirs.restored);
        if let Ok(bytes) = std::fs::read(&record)
            && let Ok(done) = serde_json::from_slice::<Prepared>(&bytes)
            && done.to_time == at
            && dirs.restored.join("PG_VERSION").exists()
        {
            return Ok(prepare_output(
                &dirs,
                done,
                started,
                "kept the directory an earlier prepare recovered",
            ));
        }
        // Ours by name, never finished (or for another time): recovered again from scratch.
        if dirs.restored.exists() {
            std::fs::remove_dir_all(&dirs.restored)
                .with_context(|| format!("remove the unfinished {}", dirs.restored.display()))?;
        }
        let _ = std::fs::remove_file(&record);
        let repo = repo_ref.open().await?;
        let (base, _) = self.base_for(&repo, at).await?;
        progress.report(api::model::Progress {
            stage: "recovering".into(),
            unit: "bytes".into(),
            bytes_total: base.size,
            ..api::model::Progress::default()
        });
        let (pg, physical) = self.physical()?;
        // What an earlier, killed prepare of this run left is rebuilt: its room counts as free.
        let reclaimable: u64 = repository::list_kept_data_dirs(&physical.data_dir)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|k| k.tag == tag && k.kind == repository::KeptKind::DataDirPrepared)
            .map(|k| k.bytes)
            .sum();
        check_room(&physical.data_dir, &base, reclaimable)?;
        let options = repository::PitrOptions {
            to_time: at,
            data_dir: dirs.restored.clone(),
            base: Some(base.id.clone()),
            restore_command: wal_fetch_command(physical.rollcall.as_deref(), repo_ref)?,
            recover: true,
            run_as: nix::unistd::geteuid()
                .is_root()
                .then(|| physical.run_as.clone().unwrap_or_else(|| "postgres".into())),
            bin_dir: pg.config.bin_dir.clone(),
            timeout: Duration::from_secs(physical.recovery_timeout_s),
        };
        let report = repository::restore_to_time(&repo, &options).await?;
        let done = Prepared {
            to_time: at,
            archive_bytes: base.size,
            restore: PhysicalRestore {
                to_time: shown(at),
                base_backup: report.base_backup.clone(),
                data_dir: physical.data_dir.display().to_string(),
                restored_dir: dirs.restored.display().to_string(),
                kept_dir: String::new(),
                stopped: report.stopped.clone(),
                last_transaction_at: report.last_transaction_at.clone(),
                timeline: report.timeline,
                detail: report.verified.clone(),
            },
        };
        std::fs::write(
            &record,
            serde_json::to_vec(&done).context("encode the preparation's record")?,
        )
        .with_context(|| format!("write {}", record.display()))?;
        Ok(prepare_output(&dirs, done, started, ""))
    }

    /// Swaps the recovered directory in for the live one and starts it on the same port and
    /// settings; the previous directory is kept as `DIR.pre_<tag>`. Any failure after the
    /// live server stopped puts the previous directory back and starts it.
    pub async fn commit_to_time(
        &self,
        at: DateTime<Utc>,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        let started = Instant::now();
        let (pg, physical) = self.physical()?;
        let tag = run_tag(run_id);
        let dirs = repository::DataDirSwap::new(&physical.data_dir, &tag);
        let record = prepared_path(&dirs.restored);
        let prepared: Option<Prepared> = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(p) = &prepared
            && p.to_time != at
        {
            bail!(
                "{} was recovered to {}, not {}: retry the run so that prepare recovers it \
                 again; nothing was changed",
                dirs.restored.display(),
                shown(p.to_time),
                shown(at)
            );
        }
        let swapped_before = dirs.kept.exists() && !dirs.restored.exists();
        if prepared.is_none() && !swapped_before {
            bail!(
                "{} has no record of a finished recovery to {}: the run's prepare-postgres did \
                 not finish (retry the run); nothing was changed",
                dirs.restored.display(),
                shown(at)
            );
        }
        progress.report(api::model::Progress {
            stage: "swapping".into(),
            unit: "directories".into(),
            ..api::model::Progress::default()
        });
        // On a task of its own: the command's time limit drops this future, and a swap
        // dropped between stopping the live server and starting one would leave none running.
        // The task finishes (or puts the previous server back) whatever happens to the command.
        let tools = self.server_tools()?;
        let swapped = {
            let (dirs, tag) = (dirs.clone(), tag.clone());
            tokio::spawn(async move { repository::swap_data_dir(&dirs, &tag, &tools).await })
                .await
                .context("the data directory swap's task")??
        };
        // The server accepts connections (pg_ctl waited for it); this agent's own URL must
        // reach it too before the run goes on.
        let url = pg.url()?;
        wait_for_connection(&url, Duration::from_secs(physical.server_timeout_s))
            .await
            .context("connect to the restored server")?;
        // Writes frozen at the database stay frozen on the restored server until the unfreeze:
        // the directory recovered to before the freeze holds none of it.
        let mut refrozen = String::new();
        if self.freezes() && self.frozen.as_ref().is_some_and(|m| m.frozen()) {
            let out = self
                .freeze_database()
                .await
                .context("freeze writes on the restored server as they were on the previous one")?;
            refrozen = format!("; writes frozen again on it: {}", out.detail);
        }
        let mut restore = prepared
            .map(|p| p.restore)
            .unwrap_or_else(|| PhysicalRestore {
                to_time: shown(at),
                base_backup: String::new(),
                data_dir: physical.data_dir.display().to_string(),
                restored_dir: String::new(),
                kept_dir: String::new(),
                stopped: None,
                last_transaction_at: None,
                timeline: None,
                detail: String::new(),
            });
        restore.restored_dir = physical.data_dir.display().to_string();
        restore.kept_dir = dirs.kept.display().to_string();
        let resumed = match swapped {
            repository::Swapped::Now => String::new(),
            repository::Swapped::Already => "already swapped".to_owned(),
        };
        restore.detail = format!(
            "restored to time {}; the previous data directory is kept as {}{refrozen}",
            restore.to_time,
            dirs.kept.display()
        );
        Ok(RestorePostgresOutput {
            database: physical.data_dir.display().to_string(),
            pre_restore_database: dirs.kept.display().to_string(),
            point: String::new(),
            archive_bytes: 0,
            resumed,
            elapsed_ms: millis(started),
            physical: Some(restore),
        })
    }

    /// At agent start: a swap killed after it stopped the live server is finished or taken
    /// back, so a server runs from the live directory (see `repository::finish_interrupted_swap`).
    pub async fn finish_interrupted_data_dir_swap(&self) -> Result<repository::Interrupted> {
        let Some(physical) = self
            .postgres
            .as_ref()
            .and_then(|p| p.config.physical.as_ref())
        else {
            return Ok(repository::Interrupted::Nothing);
        };
        repository::finish_interrupted_swap(&physical.data_dir, &self.server_tools()?).await
    }

    /// `base-backup`: a physical base backup of this agent's server (its own database URL,
    /// whose role needs REPLICATION) into the repository, recorded under this agent's
    /// environment, so restores of the environment to a time can start from it. Only with
    /// `[postgres.physical]`: a server restored to a time is one whose data directory the
    /// agent manages.
    pub async fn base_backup(&self, repo: &RepositoryRef) -> Result<repository::BaseBackup> {
        let (pg, physical) = self.physical().context(
            "base-backup needs [postgres.physical] in this database agent's agent.toml (the \
             data_dir of the server it backs up, which a restore to a time replaces)",
        )?;
        let repo = repo.open().await?;
        let mut options = repository::BaseBackupOptions::new(pg.url()?);
        options.env = Some(self.environment.clone());
        options.bin_dir = pg.config.bin_dir.clone();
        options.wal_timeout = Duration::from_secs(physical.base_backup_wal_timeout_s);
        repository::base_backup(&repo, &options).await
    }
}

fn prepare_output(
    dirs: &repository::DataDirSwap,
    done: Prepared,
    started: Instant,
    resumed: &str,
) -> PreparePostgresOutput {
    let mut restore = done.restore;
    if !resumed.is_empty() {
        restore.detail = format!("{resumed}; {}", restore.detail);
    }
    PreparePostgresOutput {
        database: dirs.live.display().to_string(),
        restore_database: dirs.restored.display().to_string(),
        point: String::new(),
        archive_bytes: done.archive_bytes,
        counts: Counts::new(),
        elapsed_ms: millis(started),
        physical: Some(restore),
    }
}

/// The bytes a recovery of `base` beside the live server needs on its filesystem: the
/// unpacked tar, a tenth more for what replay adds to the tables, and 64 segments (1 GiB at
/// 16 MiB, Postgres' default max_wal_size) of WAL fetched for replay, which stay in pg_wal
/// until a restartpoint recycles them.
fn room_needed(base: &repository::BaseBackup) -> u64 {
    base.tar_size
        .saturating_add(base.tar_size / 10)
        .saturating_add(base.wal_segment_size.saturating_mul(64))
}

/// Refuses a recovery of `base` beside `data_dir` that its filesystem has no room for: the
/// live server shares that filesystem, and filling it would stop the live server's writes.
fn check_room(data_dir: &Path, base: &repository::BaseBackup, reclaimable: u64) -> Result<()> {
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    let stat = nix::sys::statvfs::statvfs(parent).with_context(|| {
        format!(
            "read the free space of {} (beside [postgres.physical] data_dir)",
            parent.display()
        )
    })?;
    let free = stat
        .blocks_available()
        .saturating_mul(stat.fragment_size())
        .saturating_add(reclaimable);
    enough_room(free, parent, base)
}

/// Refuses a data directory that is a mount point: the swap renames it, which the kernel
/// refuses for a mount point (EBUSY) only once the live server has stopped.
fn same_filesystem_as_parent(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    let (dir, up) = (
        std::fs::metadata(data_dir)
            .with_context(|| format!("read [postgres.physical] data_dir {}", data_dir.display()))?,
        std::fs::metadata(parent).with_context(|| format!("read {}", parent.display()))?,
    );
    if dir.dev() != up.dev() {
        bail!(
            "[postgres.physical] data_dir {} is a mount point (another filesystem than {}): a \
             restore to a time renames it, which a mount point refuses; mount the filesystem \
             one level up and keep the data directory inside it; nothing was changed",
            data_dir.display(),
            parent.display()
        );
    }
    Ok(())
}

fn enough_room(free: u64, parent: &Path, base: &repository::BaseBackup) -> Result<()> {
    let needed = room_needed(base);
    if free < needed {
        bail!(
            "{} has {} free, and recovering base backup {} beside the live server needs about \
             {} (its {} tar unpacked, and room for the WAL it replays): free space on that \
             filesystem (`rollcall kept prune` drops the data directories earlier drills to a \
             time kept); nothing was changed",
            parent.display(),
            mib(free),
            base.id,
            mib(needed),
            mib(base.tar_size)
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// Waits until `url` takes a connection (the server accepts them once pg_ctl says started,
/// but a service's address may take a moment longer).
async fn wait_for_connection(url: &str, within: Duration) -> Result<()> {
    use sqlx::Connection as _;
    let deadline = Instant::now() + within;
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("the server does not take connections");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The recovering server's restore_command: `rollcall repo wal-fetch` on the run's repository,
/// with its S3 connection flags (credentials come from the server's environment).
fn wal_fetch_command(rollcall: Option<&Path>, repo: &RepositoryRef) -> Result<String> {
    let exe = match rollcall {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe().context("find the rollcall binary for restore_command")?,
    };
    let quote = |word: &str| format!("'{}'", word.replace('\'', "'\\''"));
    let mut words = vec![
        quote(&exe.to_string_lossy()),
        "repo".to_owned(),
        "wal-fetch".to_owned(),
        "--repo".to_owned(),
        quote(&repo.url),
    ];
    if let Some(endpoint) = &repo.s3_endpoint {
        words.extend(["--s3-endpoint".to_owned(), quote(endpoint)]);
    }
    if let Some(region) = &repo.s3_region {
        words.extend(["--s3-region".to_owned(), quote(region)]);
    }
    if repo.s3_path_style {
        words.push("--s3-path-style".to_owned());
    }
    words.extend(["%f".to_owned(), "%p".to_owned()]);
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_recovery_the_filesystem_has_no_room_for_is_refused_naming_the_figures() {
        let base = repository::BaseBackup {
            id: "b1".into(),
            env: None,
            system_identifier: "1".into(),
            server_version_num: 150_000,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: "0/2000028".into(),
            end_lsn: "0/2000100".into(),
            start_wal: "000000010000000000000002".into(),
            end_wal: "000000010000000000000002".into(),
            started_at: Utc::now(),
            consistent_at: Utc::now(),
            key: "base/b1/base.tar.zst".into(),
            size: 10 << 20,
            sha256: String::new(),
            tar_size: 1000 << 20,
        };
        // 1000 MiB + 100 MiB + 64 segments of 16 MiB.
        assert_eq!(room_needed(&base), 2124 << 20);
        let parent = Path::new("/srv/pg");
        enough_room(2124 << 20, parent, &base).unwrap();
        let err = enough_room(2123 << 20, parent, &base)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/srv/pg has 2123 MiB free")
                && err.contains("needs about 2124 MiB")
                && err.contains("1000 MiB tar")
                && err.contains("nothing was changed"),
            "{err}"
        );
    }

    #[test]
    fn restore_command_quotes_the_binary_and_the_repository() {
        let repo = RepositoryRef {
            url: "s3://b/it's".into(),
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
            s3_region: None,
            s3_path_style: true,
        };
        assert_eq!(
            wal_fetch_command(Some(Path::new("/opt/rollcall")), &repo).unwrap(),
            "'/opt/rollcall' repo wal-fetch --repo 's3://b/it'\\''s' --s3-endpoint \
             'http://127.0.0.1:9000' --s3-path-style %f %p"
        );
    }
}
