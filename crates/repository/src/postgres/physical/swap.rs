//! A self-hosted server's data directory swapped for one recovered to a time, without ever
//! destroying one.
//!
//! ```text
//! DIR                      the live data directory (the server's, as configured)
//! DIR.restore_<tag>        recovered to the time by `restore_to_time`, beside DIR, while the
//!                          live server still serves (prepare)
//! DIR.pre_<tag>            the previous live directory, kept after the swap (never removed)
//! DIR.rollcall-swap        the swap's marker, written before the live server stops and
//!                          removed once a server runs from DIR again: what a killed swap left
//! ```
//!
//! The swap (commit): write the marker with the live server's start options (its
//! `postmaster.opts`), stop the live server cleanly, rename DIR to `DIR.pre_<tag>`, give the
//! recovered directory what the operator keeps in the live one (every top-level entry that is
//! not Postgres' own: `postgresql.conf`, `pg_hba.conf`, `pg_ident.conf`,
//! `postgresql.auto.conf`, included files, TLS keys and certificates: the restored server is
//! the production server now, archiving included), mark its new timeline's history file for archiving, rename it to DIR,
//! and start it with the same options (port, settings) until it accepts connections. If any
//! step after the stop fails, the recovered directory goes back to its `restore_` name, the
//! previous one back to DIR, and the previous server is started again.
//!
//! Archiving after the swap: the recovered server runs on a new timeline, chosen by recovery
//! after asking the archive (restore_command) for every timeline's history file, so none of
//! its segment names can collide with what the repository holds; recovery itself ran with
//! `archive_mode = off` (it must not push while it replays), so the swap marks the new
//! timeline's history file `.ready` and the server's archiver pushes it first.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::recover::{as_user, server_tool};
use crate::postgres::conn::last_lines;

/// What Postgres itself keeps at the top of a data directory: never carried from the live
/// directory (the recovered one has its own). Everything else there is the operator's
/// (configuration, included files and directories, TLS keys and certificates) and is carried.
const SERVER_OWN: [&str; 14] = [
    "PG_VERSION",
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "backup_manifest",
    "tablespace_map",
    "tablespace_map.old",
    "current_logfiles",
    "recovery.signal",
    "standby.signal",
    "recovery.conf",
    "base",
    "global",
];

/// Postgres' own `pg_*` directories (PostgreSQL 10 to 17, and the older names).
const SERVER_DIRS: [&str; 17] = [
    "pg_wal",
    "pg_xact",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_logical",
    "pg_multixact",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_xlog",
    "pg_clog",
];

/// Whether the top-level entry `name` of a data directory is Postgres' own (above, its `pg_*`
/// directories, and `log`, the default log directory, which stays with its server).
/// `pg_hba.conf` and `pg_ident.conf` are the operator's, and carried.
fn server_own(name: &str) -> bool {
    SERVER_OWN.contains(&name) || SERVER_DIRS.contains(&name) || name == "log"
}

/// The directories of one swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapDirs {
    pub live: PathBuf,
    pub restored: PathBuf,
    pub kept: PathBuf,
    pub marker: PathBuf,
    /// The server's log while the swap starts it (`DIR.rollcall-server.log`).
    pub log: PathBuf,
}

impl SwapDirs {
    /// The names for run tag `tag` beside the live directory `live`.
    pub fn new(live: &FsPath, tag: &str) -> SwapDirs {
        let beside = |suffix: &str| {
            let mut name = live.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        SwapDirs {
            live: live.to_path_buf(),
            restored: beside(&format!(".restore_{tag}")),
            kept: beside(&format!(".pre_{tag}")),
            marker: beside(".rollcall-swap"),
            log: beside(".rollcall-server.log"),
        }
    }
}

/// What the marker of a swap under way holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwapMarker {
    pub tag: String,
    /// The live server's start options, from its `postmaster.opts` (without the program).
    pub options: String,
}

/// How to run the server's tools.
#[derive(Debug, Clone, Default)]
pub struct ServerTools {
    pub bin_dir: Option<PathBuf>,
    /// The user the server runs as (when this process is root).
    pub run_as: Option<String>,
    /// How long a start or stop may take.
    pub timeout: Duration,
}

/// What a swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swapped {
    /// This call swapped the directories and started the recovered server.
    Now,
    /// An earlier call (or a killed one that the agent finished) had swapped them; the
    /// server runs.
    Already,
}

impl ServerTools {
    fn user(&self) -> Result<Option<nix::unistd::User>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let name = self.run_as.as_deref().unwrap_or("postgres");
        let user = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .with_context(|| format!("run_as {name}: no such user"))?;
        if user.uid.is_root() {
            bail!("Postgres does not run as root: set run_as to another user");
        }
        Ok(Some(user))
    }

    async fn pg_ctl(&self, dir: &FsPath) -> Result<PathBuf> {
        self.tool("pg_ctl", dir).await
    }

    async fn tool(&self, name: &str, dir: &FsPath) -> Result<PathBuf> {
        let version = std::fs::read_to_string(dir.join("PG_VERSION")).with_context(|| {
            format!("read {}/PG_VERSION: is it a data directory?", dir.display())
        })?;
        let major: u32 = version
            .trim()
            .parse()
            .with_context(|| format!("{}/PG_VERSION reads {version:?}", dir.display()))?;
        server_tool(name, self.bin_dir.as_deref(), major)
            .await
            .with_context(|| format!("{name} of PostgreSQL {major} was not found: set bin_dir"))
    }

    /// The system identifier of the cluster whose data directory `dir` is (`pg_controldata`):
    /// which cluster a swap would replace, and whose base backups can replace it.
    pub async fn system_identifier(&self, dir: &FsPath) -> Result<String> {
        let controldata = self.tool("pg_controldata", dir).await?;
        let out = as_user(&controldata, self.user()?.as_ref())
            .arg(dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {}", controldata.display()))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Database system identifier:"))
            .map(|v| v.trim().to_owned())
            .with_context(|| {
                format!(
                    "{} {} printed no system identifier: {}",
                    controldata.display(),
                    dir.display(),
                    last_lines(&String::from_utf8_lossy(&out.stderr), 3)
                )
            })
    }

    /// Whether a server runs from `dir` (`pg_ctl status`).
    pub async fn running(&self, dir: &FsPath) -> Result<bool> {
        let pg_ctl = self.pg_ctl(dir).await?;
        let out = as_user(&pg_ctl, self.user()?.as_ref())
            .arg("status")
            .arg("-D")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {} status", pg_ctl.display()))?;
        Ok(out.status.success())
    }

    async fn stop(&self, dir: &FsPath, mode: &str) -> Result<()> {
        let pg_ctl = self.pg_ctl(dir).await?;
        let out = as_user(&pg_ctl, self.user()?.as_ref())
            .args(["stop", "-m", mode, "-w", "-t"])
            .arg(self.timeout.as_secs().max(1).to_string())
            .arg("-D")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {} stop", pg_ctl.display()))?;
        if !out.status.success() && self.running(dir).await? {
            bail!(
                "the server of {} did not stop: {}",
                dir.display(),
                last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            );
        }
        Ok(())
    }

    /// Starts the server of `dir` with `options` and waits until it accepts connections.
    pub async fn start(&self, dir: &FsPath, options: &str, log: &FsPath) -> Result<()> {
        let pg_ctl = self.pg_ctl(dir).await?;
        let user = self.user()?;
        if !log.exists() {
            std::fs::write(log, b"").with_context(|| format!("create {}", log.display()))?;
        }
        if let Some(user) = &user {
            nix::unistd::chown(log, Some(user.uid), Some(user.gid))
                .with_context(|| format!("give {} to {}", log.display(), user.name))?;
        }
        let mut cmd = as_user(&pg_ctl, user.as_ref());
        cmd.arg("start").arg("-D").arg(dir).arg("-l").arg(log);
        if !options.trim().is_empty() {
            cmd.args(["-o", options]);
        }
        let out = cmd
            .args(["-w", "-t"])
            .arg(self.timeout.as_secs().max(1).to_string())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {} start", pg_ctl.display()))?;
        if !out.status.success() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "the server of {} did not start: {} (its log {}: {})",
                dir.display(),
                last_lines(&String::from_utf8_lossy(&out.stderr), 3),
                log.display(),
                last_lines(&text, 3)
            );
        }
        Ok(())
    }
}

/// The options a server was started with, from its `postmaster.opts`: every word after the
/// program, as pg_ctl wrote them (quoted).
pub fn start_options(dir: &FsPath) -> Result<String> {
    let path = dir.join("postmaster.opts");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "read {}: the live server writes it when it starts; is {} the data directory of a \
             server that ran?",
            path.display(),
            dir.display()
        )
    })?;
    let text = text.trim();
    // The program is the first word, unquoted; the arguments follow, each quoted.
    Ok(match text.find(" \"") {
        Some(at) => text[at + 1..].to_owned(),
        None => String::new(),
    })
}

fn read_marker(path: &FsPath) -> Result<Option<SwapMarker>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} does not read: it is rollcall's swap marker; move it away after checking \
                 which directory the server runs from",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn write_durably(path: &FsPath, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    // Beside it under a name of its own (`with_extension` would replace the marker's
    // extension and could name an operator's file).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".rollcall-tmp");
    let tmp = PathBuf::from(tmp);
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    rename(&tmp, path)
}

/// A rename, then an fsync of the directory holding both names.
fn rename(from: &FsPath, to: &FsPath) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("rename {} to {}", from.display(), to.display()))?;
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("sync {}", parent.display()))?;
    }
    Ok(())
}

/// Copies what the operator keeps in the live data directory (every top-level entry that is
/// not Postgres' own: `postgresql.conf`, `pg_hba.conf`, `pg_ident.conf`,
/// `postgresql.auto.conf`, included files and directories, TLS keys and certificates) into
/// `into`, replacing what the backup had, owned and moded as the live ones; symbolic links
/// are carried as links.
fn carry_configuration(from: &FsPath, into: &FsPath) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry.with_context(|| format!("read {}", from.display()))?;
        let name = entry.file_name();
        if name.to_str().is_none_or(server_own) {
            continue;
        }
        carry(&entry.path(), &into.join(&name))?;
    }
    Ok(())
}

fn carry(source: &FsPath, dest: &FsPath) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::symlink_metadata(source).with_context(|| format!("read {}", source.display()))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        // Replaced whole: a file the backup's copy has and the live one no longer does (an
        // old include) must not come back.
        if dest.symlink_metadata().is_ok() {
            remove_any(dest)?;
        }
        std::fs::create_dir(dest).with_context(|| format!("create {}", dest.display()))?;
        for entry in
            std::fs::read_dir(source).with_context(|| format!("read {}", source.display()))?
        {
            let entry = entry.with_context(|| format!("read {}", source.display()))?;
            carry(&entry.path(), &dest.join(entry.file_name()))?;
        }
        std::fs::set_permissions(dest, meta.permissions())
            .with_context(|| format!("give {} the mode of {}", dest.display(), source.display()))?;
    } else if kind.is_symlink() {
        let target = std::fs::read_link(source)
            .with_context(|| format!("read the link {}", source.display()))?;
        if dest.symlink_metadata().is_ok() {
            remove_any(dest)?;
        }
        std::os::unix::fs::symlink(&target, dest)
            .with_context(|| format!("link {} to {}", dest.display(), target.display()))?;
    } else if kind.is_file() {
        // Removed first: the backup's copy may be read-only to its owner (a 0400 key).
        if dest.symlink_metadata().is_ok() {
            remove_any(dest)?;
        }
        std::fs::copy(source, dest)
            .with_context(|| format!("copy {} to {}", source.display(), dest.display()))?;
    } else {
        // Sockets, fifos, devices: nothing a server reads as configuration.
        return Ok(());
    }
    let made =
        std::fs::symlink_metadata(dest).with_context(|| format!("read {}", dest.display()))?;
    if (made.uid(), made.gid()) == (meta.uid(), meta.gid()) {
        return Ok(());
    }
    std::os::unix::fs::lchown(dest, Some(meta.uid()), Some(meta.gid()))
        .with_context(|| format!("give {} the owner of {}", dest.display(), source.display()))?;
    Ok(())
}

fn remove_any(path: &FsPath) -> Result<()> {
    let removed = if path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.with_context(|| format!("replace {}", path.display()))
}

/// Marks the history files in `dir`'s pg_wal that were never archived `.ready`: recovery
/// promoted with archiving off, and the new timeline's history must reach the archive before
/// any restore can follow that timeline.
fn mark_history_ready(dir: &FsPath) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let wal = dir.join("pg_wal");
    let status = wal.join("archive_status");
    let owner = std::fs::metadata(&wal).with_context(|| format!("read {}", wal.display()))?;
    for entry in std::fs::read_dir(&wal).with_context(|| format!("read {}", wal.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".history") {
            continue;
        }
        let done = status.join(format!("{name}.done"));
        let ready = status.join(format!("{name}.ready"));
        if done.exists() || ready.exists() {
            continue;
        }
        std::fs::write(&ready, b"").with_context(|| format!("write {}", ready.display()))?;
        nix::unistd::chown(
            &ready,
            Some(owner.uid().into()),
            Some(nix::unistd::Gid::from_raw(owner.gid())),
        )
        .with_context(|| format!("give {} to the server's user", ready.display()))?;
    }
    Ok(())
}

/// Swaps `dirs.restored` in for the live data directory and starts it (see the module doc).
/// Re-running after a failure or a kill finishes a swap that was done, or does it again after
/// [`finish_interrupted_swap`] put the previous directory back.
pub async fn swap_data_dir(dirs: &SwapDirs, tag: &str, tools: &ServerTools) -> Result<Swapped> {
    let live = &dirs.live;
    // Done already: the previous directory is kept and a directory is live.
    if dirs.kept.exists() && live.exists() && !dirs.restored.exists() {
        let options = match read_marker(&dirs.marker)? {
            Some(m) => m.options,
            None => start_options(&dirs.kept)?,
        };
        if !tools.running(live).await?
            && let Err(e) = tools.start(live, &options, &dirs.log).await
        {
            // The recovered server will not start: the previous one goes back and serves.
            return Err(match put_previous_back(dirs, tools, &options).await {
                Ok(()) => e.context(format!(
                    "the recovered server did not start; the previous server runs again from \
                     {} and the recovered directory is kept as {}",
                    live.display(),
                    dirs.restored.display()
                )),
                Err(back) => e.context(format!(
                    "the recovered server did not start, and putting the previous directory \
                     back failed too ({back:#}): the previous data directory is {}",
                    dirs.kept.display()
                )),
            });
        }
        let _ = std::fs::remove_file(&dirs.marker);
        return Ok(Swapped::Already);
    }
    if !dirs.restored.join("PG_VERSION").exists() {
        bail!(
            "{} holds no recovered data directory: the run's prepare-postgres did not finish \
             (retry the run); nothing was changed",
            dirs.restored.display()
        );
    }
    if dirs.kept.exists() {
        bail!(
            "{} exists while {} does too: a swap of this run was interrupted half-way; restart \
             the agent, which puts the previous directory back, then retry",
            dirs.kept.display(),
            dirs.restored.display()
        );
    }
    if !live.join("PG_VERSION").exists() {
        bail!(
            "{} is not a data directory (no PG_VERSION): check [postgres.physical] data_dir",
            live.display()
        );
    }
    let options = start_options(live)?;
    let marker = SwapMarker {
        tag: tag.to_owned(),
        options: options.clone(),
    };
    write_durably(
        &dirs.marker,
        &serde_json::to_vec(&marker).context("encode the swap marker")?,
    )?;
    if let Err(e) = tools.stop(live, "fast").await {
        // Nothing was renamed; but a fast shutdown that outlived pg_ctl's wait goes on, and the
        // live server must not stay down: wait for it to end, then start it again.
        return Err(match restart_after_slow_stop(dirs, tools, &options).await {
            Ok(()) => e.context(
                "stop the live server for the swap (nothing was changed; the live server runs)",
            ),
            Err(again) => e.context(format!(
                "stop the live server for the swap (nothing was renamed; {again:#}; the swap \
                 marker stays, so the agent starts the server again when it restarts)"
            )),
        });
    }
    let forward = async {
        rename(live, &dirs.kept)?;
        carry_configuration(&dirs.kept, &dirs.restored)?;
        mark_history_ready(&dirs.restored)?;
        rename(&dirs.restored, live)?;
        tools.start(live, &options, &dirs.log).await
    }
    .await;
    match forward {
        Ok(()) => {
            let _ = std::fs::remove_file(&dirs.marker);
            Ok(Swapped::Now)
        }
        Err(e) => {
            let back = put_previous_back(dirs, tools, &options).await;
            match back {
                Ok(()) => Err(e.context(format!(
                    "the swap failed; the previous server runs again from {} and the recovered \
                     directory is kept as {}",
                    live.display(),
                    dirs.restored.display()
                ))),
                Err(back) => Err(e.context(format!(
                    "the swap failed, and putting the previous directory back failed too \
                     ({back:#}): the previous data directory is {}",
                    dirs.kept.display()
                ))),
            }
        }
    }
}

/// After a stop that did not finish within pg_ctl's wait: waits as long again for the live
/// server to end its shutdown, then starts it with its options (or, still running, leaves it).
/// The marker goes once a server is known to run.
async fn restart_after_slow_stop(
    dirs: &SwapDirs,
    tools: &ServerTools,
    options: &str,
) -> Result<()> {
    let until = std::time::Instant::now() + tools.timeout.max(Duration::from_secs(1));
    loop {
        if !tools.running(&dirs.live).await? {
            tools.start(&dirs.live, options, &dirs.log).await?;
            break;
        }
        if std::time::Instant::now() >= until {
            // Still up: it never went down (a smart wait, or a stop refused); it serves.
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_file(&dirs.marker);
    Ok(())
}

/// Puts the kept directory back in the live place and starts its server: the restored one
/// (if it took the live name) goes back to its `restore_` name first.
async fn put_previous_back(dirs: &SwapDirs, tools: &ServerTools, options: &str) -> Result<()> {
    let live = &dirs.live;
    if dirs.kept.exists() {
        if live.exists() {
            if tools.running(live).await.unwrap_or(false) {
                tools.stop(live, "immediate").await?;
            }
            if dirs.restored.exists() {
                bail!(
                    "{} and {} both exist: move one away by hand",
                    live.display(),
                    dirs.restored.display()
                );
            }
            rename(live, &dirs.restored)?;
        }
        rename(&dirs.kept, live)?;
    }
    if !tools.running(live).await? {
        tools.start(live, options, &dirs.log).await?;
    }
    let _ = std::fs::remove_file(&dirs.marker);
    Ok(())
}

/// What [`finish_interrupted_swap`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupted {
    /// No swap was under way.
    Nothing,
    /// The swap had not finished: the previous directory was put back and its server started.
    PutBack { tag: String },
    /// The swap had finished its renames: the server of the live directory was started.
    Started { tag: String },
}

/// Run at agent start: a swap killed after it stopped the live server leaves the marker. If the
/// renames were not both done, the previous directory goes back and its server starts (the
/// run's commit, retried, swaps again); if they were, the live directory's server starts.
/// Either way a server runs from the live directory afterwards.
pub async fn finish_interrupted_swap(live: &FsPath, tools: &ServerTools) -> Result<Interrupted> {
    let probe = SwapDirs::new(live, "x");
    let Some(marker) = read_marker(&probe.marker)? else {
        return Ok(Interrupted::Nothing);
    };
    let dirs = SwapDirs::new(live, &marker.tag);
    let renamed = dirs.kept.exists() && live.exists() && !dirs.restored.exists();
    if renamed {
        let started = if tools.running(live).await? {
            Ok(())
        } else {
            tools.start(live, &marker.options, &dirs.log).await
        };
        match started {
            Ok(()) => {
                let _ = std::fs::remove_file(&dirs.marker);
                return Ok(Interrupted::Started { tag: marker.tag });
            }
            // The recovered server will not start: the previous one goes back and starts.
            Err(e) => {
                tracing::error!(
                    "the recovered server of {} did not start after an interrupted swap, \
                     putting the previous data directory back: {e:#}",
                    live.display()
                );
            }
        }
    }
    put_previous_back(&dirs, tools, &marker.options).await?;
    Ok(Interrupted::PutBack { tag: marker.tag })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_sit_beside_the_live_directory() {
        let dirs = SwapDirs::new(FsPath::new("/srv/pg/data"), "r0123abcd");
        assert_eq!(
            dirs.restored,
            PathBuf::from("/srv/pg/data.restore_r0123abcd")
        );
        assert_eq!(dirs.kept, PathBuf::from("/srv/pg/data.pre_r0123abcd"));
        assert_eq!(dirs.marker, PathBuf::from("/srv/pg/data.rollcall-swap"));
    }

    #[test]
    fn start_options_drop_the_program() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("postmaster.opts"),
            "/usr/lib/postgresql/15/bin/postgres \"-D\" \"/srv/pg/data\" \"-p\" \"5433\"\n",
        )
        .unwrap();
        assert_eq!(
            start_options(dir.path()).unwrap(),
            "\"-D\" \"/srv/pg/data\" \"-p\" \"5433\""
        );
        std::fs::write(
            dir.path().join("postmaster.opts"),
            "/usr/lib/postgresql/15/bin/postgres\n",
        )
        .unwrap();
        assert_eq!(start_options(dir.path()).unwrap(), "");
    }
}
