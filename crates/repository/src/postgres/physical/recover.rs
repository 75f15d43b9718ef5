//! Restores to a time: a data directory built beside its destination from a base backup and
//! the archived WAL, recovered on a private socket, renamed into place.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::process::Command;

use crate::postgres::Archive;
use crate::postgres::conn::{last_lines, tool_candidates, tool_version};
use crate::repo::Repository;

use super::{BaseBackup, base_for_time, list_base_backups, reach_for, read_histories};

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
    let wal = crate::wal::wal_listing(repo).await?;
    let oldest_timeline = bases.iter().map(|b| b.timeline).min().unwrap_or(1);
    let histories = read_histories(repo, &wal, oldest_timeline).await?;
    let (base, reach, timeline) = match options.base.as_deref() {
        Some(_) => {
            let base = choose_base(&bases, options.to_time, options.base.as_deref(), repo)?;
            let (reach, timeline) = reach_for(&histories, base, &wal, Some(options.to_time))?;
            (base, reach, timeline)
        }
        None => match base_for_time(&histories, &bases, &wal, options.to_time)? {
            Some(found) => found,
            // No base backup consistent by then: choose_base says why.
            None => {
                choose_base(&bases, options.to_time, None, repo)?;
                bail!(
                    "no base backup restores to {}",
                    options.to_time.to_rfc3339()
                );
            }
        },
    };
    if options.to_time > reach.archived_at {
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
            reach.archived_at.to_rfc3339(),
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
        // Streamed: fetched, checked, decompressed and unpacked in one pass through a pipe (no
        // tar written to disk first). The directory is only a partial build until the body's
        // size and sha256 (at its end) and pg_verifybackup (after) have passed.
        let (reader, writer) = std::io::pipe().context("a pipe for the base backup's tar")?;
        let into = partial.clone();
        let unpacking = tokio::task::spawn_blocking(move || unpack(reader, &into));
        let (fetched, sink) =
            crate::postgres::fetch::download_dump(repo, &archive, Box::new(writer)).await;
        // The end of the tar for the unpacker.
        drop(sink);
        let unpacked = unpacking
            .await
            .context("the base backup's unpacking task")?;
        match (fetched, unpacked) {
            (Ok(_), Ok(())) => {}
            (Err(e), Ok(())) => return Err(e.context(format!("fetch base backup {}", base.id))),
            (Ok(_), Err(e)) => return Err(e),
            // The unpacker's own failure (no room, no permission) stopped the fetch first: its
            // error is the cause, not a body that looks short.
            (Err(_), Err(u)) if unpacker_failed_on_its_own(&u) => return Err(u),
            // The body's own failure is the cause; the unpacker stopped at its end.
            (Err(e), Err(u)) => {
                return Err(e.context(format!(
                    "fetch base backup {} (unpacking stopped: {u:#})",
                    base.id
                )));
            }
        }
        let verified = verify_unpacked(&partial, options.bin_dir.as_deref(), major).await?;
        write_recovery_settings(&partial, options, timeline)?;
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

/// Whether the unpacker failed writing (a full disk, a permission), not for want of input.
fn unpacker_failed_on_its_own(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::QuotaExceeded
                    | std::io::ErrorKind::ReadOnlyFilesystem
            )
        })
    })
}

/// Unpacks the tar read from `tar` into `into` (created 0700, as Postgres requires); entries
/// leaving it are refused by the tar reader. Reads `tar` to its end (a writer into a pipe must
/// not fail on bytes after the archive's end marker).
fn unpack(tar: impl std::io::Read, into: &FsPath) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(into)
        .with_context(|| format!("create {}", into.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, tar));
    archive.set_preserve_permissions(true);
    archive
        .unpack(into)
        .with_context(|| format!("unpack the base backup into {}", into.display()))?;
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .context("read the base backup's tar to its end")?;
    Ok(())
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
pub(super) async fn server_tool(
    name: &str,
    bin_dir: Option<&FsPath>,
    major: u32,
) -> Option<PathBuf> {
    for path in tool_candidates(name, bin_dir).ok()? {
        if tool_version(&path).await.is_ok_and(|(m, _)| m == major) {
            return Some(path);
        }
    }
    None
}

/// A setting's value quoted for postgresql.conf.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn write_recovery_settings(dir: &FsPath, options: &PitrOptions, timeline: u32) -> Result<()> {
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
         recovery_target_timeline = '{timeline}'\n\
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
        // Never through a link: a link in a backup may name a file of the host.
        std::os::unix::fs::lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
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

pub(super) fn as_user(program: &FsPath, user: Option<&nix::unistd::User>) -> Command {
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
    // A modest buffer pool whatever the backed-up configuration asks: the recovery may run on
    // the production host beside the live server, whose memory it must not take.
    let server_options = format!(
        "-c listen_addresses='' -c unix_socket_directories='{}' -p {port} \
         -c shared_buffers=128MB -c huge_pages=try",
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn settings_are_quoted_for_postgresql_conf() {
        assert_eq!(conf_quote("a 'b' c"), "'a ''b'' c'");
    }
}
