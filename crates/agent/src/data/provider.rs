//! The database agent's restores to a time through a managed provider (`[postgres.provider]`):
//! the provider's own point-in-time restore, called through an operator's adapter command,
//! lands in a new instance; its database is copied into `<db>_restore_<tag>` beside the live
//! one (prepare) and swapped in by the logical swap (commit), the live one kept as
//! `<db>_pre_<tag>`. The adapter's contract (README "Managed Postgres: the exec adapter"):
//!
//! * `COMMAND... window` prints `{"earliest": T, "latest": T}`: the recoverable range.
//! * `COMMAND... restore` prints `{"database_url": URL, "restored_to": T, "instance": ID}`: a
//!   new instance restored to `ROLLCALL_TO_TIME`, reachable at URL.
//! * `COMMAND... release` (with `ROLLCALL_INSTANCE`) removes that instance; exit 0 if gone.
//!
//! Inputs come in `ROLLCALL_*` environment variables, never a password or a repository key;
//! stdin is closed, stdout is one JSON object, stderr's last line explains a failure.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::config::ConfigError;
use api::model::RepositoryRef;
use api::model::output::{
    PhysicalRestore, PreflightOutput, PreparePostgresOutput, RestorePostgresOutput,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use super::{DataPlane, run_tag};
use crate::progress::Reporter;

/// `[postgres.provider]` in agent.toml: a managed Postgres restored to a time by the
/// provider's own point-in-time restore, through an adapter command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The adapter: program and arguments (no shell); the verb is added as the last argument.
    /// A relative program path with a `/` is relative to agent.toml; a bare name is looked up
    /// on PATH.
    pub command: Vec<String>,
    /// How long one call of the adapter may take, in seconds (default 3600: a provider's
    /// restore into a new instance takes minutes to hours).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_timeout() -> u64 {
    3600
}

/// How long the adapter's output pipes may stay open after it exited (held by something it
/// started and left running).
const PIPES_GRACE: Duration = Duration::from_secs(5);
/// The most of the adapter's stdout read: one small JSON object is expected.
const STDOUT_LIMIT: usize = 1 << 20;
/// How long the restored instance's URL may take to accept a connection (at most the
/// adapter's own `timeout_s`).
const CONNECT_WITHIN: Duration = Duration::from_secs(300);

impl ProviderConfig {
    /// Checks the section and resolves the program's path against agent.toml.
    pub(super) fn validated(&self, file: &Path) -> Result<ProviderConfig> {
        let Some(program) = self.command.first().filter(|p| !p.trim().is_empty()) else {
            bail!(ConfigError::new(
                file,
                "postgres.provider.command is empty",
                "give the adapter's program and arguments, e.g. command = \
                 [\"/usr/local/bin/pitr-adapter\", \"--instance\", \"prod-db\"]"
            ));
        };
        if self.timeout_s == 0 {
            bail!(ConfigError::new(
                file,
                "postgres.provider.timeout_s must be positive",
                "e.g. timeout_s = 3600, or remove it for the default (3600)"
            ));
        }
        let mut command = self.command.clone();
        if program.contains('/') {
            command[0] = api::config::resolve(file, Path::new(program))
                .display()
                .to_string();
        }
        Ok(ProviderConfig {
            command,
            timeout_s: self.timeout_s,
        })
    }

    fn shown(&self) -> String {
        api::redact::redact(&self.command.join(" ")).into_owned()
    }
}

/// `window`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub earliest: DateTime<Utc>,
    pub latest: DateTime<Utc>,
}

/// `restore`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Restored {
    pub database_url: String,
    pub restored_to: DateTime<Utc>,
    pub instance: String,
}

fn shown(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn parse_time(value: &serde_json::Value, field: &str) -> Result<DateTime<Utc>> {
    let text = value
        .get(field)
        .and_then(|v| v.as_str())
        .with_context(|| format!("its JSON has no string field {field:?}"))?;
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| anyhow::anyhow!("{field} {text:?} is not an RFC 3339 time"))
}

/// The one JSON object the adapter printed on stdout (surrounding whitespace allowed).
fn parse_object(stdout: &[u8]) -> Result<serde_json::Value> {
    let text = std::str::from_utf8(stdout).map_err(|_| anyhow::anyhow!("stdout is not UTF-8"))?;
    if text.trim().is_empty() {
        bail!("it printed nothing on stdout (expected one JSON object)");
    }
    // The text itself is not echoed: it may hold the new endpoint's password.
    let value: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|e| anyhow::anyhow!("stdout is not one JSON object ({e})"))?;
    if !value.is_object() {
        bail!("stdout is JSON but not an object");
    }
    Ok(value)
}

pub(super) fn parse_window(stdout: &[u8]) -> Result<Window> {
    let value = parse_object(stdout)?;
    let window = Window {
        earliest: parse_time(&value, "earliest")?,
        latest: parse_time(&value, "latest")?,
    };
    if window.earliest > window.latest {
        bail!(
            "earliest {} is later than latest {}",
            shown(window.earliest),
            shown(window.latest)
        );
    }
    Ok(window)
}

/// The instance a `restore` answer names, read on its own: a restore whose answer is wrong in
/// another field still has its instance released.
pub(super) fn reported_instance(stdout: &[u8]) -> Option<String> {
    let value = parse_object(stdout).ok()?;
    let id = value.get("instance")?.as_str()?.trim();
    valid_instance(id).then(|| id.to_owned())
}

/// An instance id the adapter may be handed back (and may put in a path): letters, digits,
/// `.`, `_`, `:`, `-`, at most 256, never `.` or `..`.
fn valid_instance(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
}

pub(super) fn parse_restored(stdout: &[u8]) -> Result<Restored> {
    let value = parse_object(stdout)?;
    let instance = value
        .get("instance")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|id| valid_instance(id))
        .context("its JSON has no instance id (at most 256 letters, digits, '.', '_', ':' or '-')")?
        .to_owned();
    let database_url = value
        .get("database_url")
        .and_then(|v| v.as_str())
        .context("its JSON has no string field \"database_url\"")?
        .to_owned();
    check_database_url(&database_url)?;
    Ok(Restored {
        database_url,
        restored_to: parse_time(&value, "restored_to")?,
        instance,
    })
}

/// A `postgres://USER@HOST:PORT/DATABASE` URL the driver takes; said without its password.
fn check_database_url(url: &str) -> Result<()> {
    use std::str::FromStr as _;
    let bad = || {
        anyhow::anyhow!(
            "database_url {} must be postgres://USER@HOST:PORT/DATABASE",
            repository::redact_url(url)
        )
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(bad)?;
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    let database = path.split_once('/').map(|(_, db)| db).unwrap_or_default();
    if database.is_empty() || sqlx::postgres::PgConnectOptions::from_str(url).is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Whether a provider that restored to `reported` restored to `asked`: the same instant, or
/// `asked` truncated to whole milliseconds or seconds (providers take times at that
/// precision). Never a later time, which could hold transactions committed after `asked`.
pub(super) fn restored_to_accepted(asked: DateTime<Utc>, reported: DateTime<Utc>) -> bool {
    use chrono::{DurationRound as _, TimeDelta};
    let truncated = |unit: TimeDelta| asked.duration_trunc(unit).ok();
    reported == asked
        || Some(reported) == truncated(TimeDelta::milliseconds(1))
        || Some(reported) == truncated(TimeDelta::seconds(1))
}

/// Kills the adapter's process group unless disarmed: a call dropped midway (its command's
/// time limit) leaves nothing of it running.
struct GroupGuard(Option<nix::unistd::Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn read_all(pipe: Option<impl tokio::io::AsyncRead + Unpin>, limit: usize) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > limit {
                    // Keep the end: the last lines say what went wrong.
                    buf.drain(..buf.len() - limit / 2);
                }
            }
        }
    }
    buf
}

fn last_line(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| api::redact::redact(&l.chars().take(300).collect::<String>()).into_owned())
}

/// One call of the adapter.
struct Call<'a> {
    config: &'a ProviderConfig,
    verb: &'static str,
    env: Vec<(&'static str, String)>,
    /// Environment variables the adapter must not inherit (the live database URL's).
    withheld: Vec<String>,
}

impl Call<'_> {
    /// Runs the adapter; its stdout when it exits 0. Every error is one line naming the
    /// command, the verb and the cause, with stderr's last line.
    async fn run(&self) -> Result<Vec<u8>> {
        self.run_keeping_stdout().await.map_err(|(e, _)| e)
    }

    /// [`Call::run`], with what the adapter printed on stdout when it failed.
    async fn run_keeping_stdout(&self) -> std::result::Result<Vec<u8>, (anyhow::Error, Vec<u8>)> {
        let what = format!("provider adapter `{}` {}", self.config.shown(), self.verb);
        let (stdout, stderr, status) = match self.spawn_and_wait().await {
            Ok(done) => done,
            Err(e) => return Err((e.context(what), Vec::new())),
        };
        if !status.success() {
            let said = last_line(&stderr)
                .map(|l| format!(": {l}"))
                .unwrap_or_else(|| " (nothing on stderr)".to_owned());
            return Err((anyhow::anyhow!("{what} failed ({status}){said}"), stdout));
        }
        Ok(stdout)
    }

    async fn spawn_and_wait(&self) -> Result<(Vec<u8>, Vec<u8>, std::process::ExitStatus)> {
        let argv = &self.config.command;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg(self.verb)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for var in self.withheld.iter().map(String::as_str).chain([
            "PGPASSWORD",
            "ROLLCALL_REPOSITORY_KEY",
            "ROLLCALL_REPOSITORY_KEY_FILE",
            "ROLLCALL_REPOSITORY_KEY_COMMAND",
            "ROLLCALL_INSTANCE",
        ]) {
            cmd.env_remove(var);
        }
        cmd.env("ROLLCALL_VERB", self.verb);
        cmd.envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        let mut child = cmd.spawn().context("start it")?;
        let mut group = GroupGuard(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(nix::unistd::Pid::from_raw),
        );
        let stdout = tokio::spawn(read_all(child.stdout.take(), STDOUT_LIMIT));
        let stderr = tokio::spawn(read_all(child.stderr.take(), 64 << 10));
        let limit = Duration::from_secs(self.config.timeout_s);
        let status = match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status.context("wait for it")?,
            Err(_) => {
                group.kill();
                let _ = child.wait().await;
                let said = match tokio::time::timeout(PIPES_GRACE, stderr).await {
                    Ok(Ok(err)) => last_line(&err).map(|l| format!("; stderr: {l}")),
                    _ => None,
                };
                bail!(
                    "timed out after {} s (postgres.provider.timeout_s); it and its process \
                     group were killed{}",
                    self.config.timeout_s,
                    said.unwrap_or_default()
                );
            }
        };
        // Exited: what it started may live on (a provider's CLI daemon), so its group stays.
        group.0 = None;
        let pipes = async { (stdout.await, stderr.await) };
        match tokio::time::timeout(PIPES_GRACE, pipes).await {
            Ok((Ok(out), Ok(err))) => Ok((out, err, status)),
            Ok(_) => bail!("reading its output failed"),
            Err(_) => bail!(
                "it exited ({status}) but a process it left running holds its stdout or \
                 stderr open: redirect the output of what it starts (e.g. `>/dev/null 2>&1`)"
            ),
        }
    }
}

impl DataPlane {
    fn provider(&self) -> Option<&ProviderConfig> {
        self.postgres.as_ref()?.provider.as_ref()
    }

    /// Whether this agent restores to a time through a managed provider (`[postgres.provider]`).
    pub(super) fn pitr_by_provider(&self) -> bool {
        self.provider().is_some()
    }

    fn call(&self, verb: &'static str, env: Vec<(&'static str, String)>) -> Result<Call<'_>> {
        let pg = self.postgres()?;
        let config = pg
            .provider
            .as_ref()
            .context("this database agent has no [postgres.provider]")?;
        let mut all = vec![
            ("ROLLCALL_ENVIRONMENT", self.environment.clone()),
            (
                "ROLLCALL_DATABASE",
                repository::SwapNames::new(&pg.url()?, "r00000000")?.live,
            ),
        ];
        all.extend(env);
        Ok(Call {
            config,
            verb,
            env: all,
            withheld: pg.config.url_env.iter().cloned().collect(),
        })
    }

    /// Asks the adapter for the provider's recoverable window.
    async fn provider_window(&self) -> Result<Window> {
        let call = self.call("window", Vec::new())?;
        let out = call.run().await?;
        parse_window(&out).with_context(|| {
            format!(
                "provider adapter `{}` window printed a bad answer",
                call.config.shown()
            )
        })
    }

    /// Preflight of a run to a time by the provider: the time is inside the window the adapter
    /// reports, the live database can be restored as this role; the live counts recorded.
    pub(super) async fn preflight_provider(&self, at: DateTime<Utc>) -> Result<PreflightOutput> {
        let pg = self.postgres()?;
        let window = self.provider_window().await?;
        if at < window.earliest || at > window.latest {
            bail!(
                "{} is outside the provider's recoverable window, {} .. {} (reported by its \
                 adapter's `window`): pick a time inside it; nothing was changed",
                shown(at),
                shown(window.earliest),
                shown(window.latest)
            );
        }
        super::postgres::restorable_as_this_role(&pg.url()?).await?;
        let (counts, mut checks) =
            super::postgres::live_state(&pg.url()?, &pg.counts, None).await?;
        checks.push(api::model::Check {
            name: "time inside the provider's window".into(),
            kind: api::model::CheckKind::Preflight,
            required: true,
            passed: true,
            detail: format!(
                "{} is inside {} .. {}",
                shown(at),
                shown(window.earliest),
                shown(window.latest)
            ),
        });
        Ok(PreflightOutput {
            verify: None,
            live_counts: Some(counts),
            checks,
        })
    }

    /// Prepares a run to a time: `[postgres.provider]` through the provider, else the
    /// self-hosted server's data directory (`[postgres.physical]`).
    pub async fn prepare_postgres_to_time(
        &self,
        repo: &RepositoryRef,
        at: DateTime<Utc>,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<PreparePostgresOutput> {
        if self.provider().is_some() {
            return self.prepare_by_provider(at, run_id, progress).await;
        }
        self.prepare_to_time(repo, at, run_id, progress).await
    }

    /// Commits a run to a time (see [`DataPlane::prepare_postgres_to_time`]).
    pub async fn commit_postgres_to_time(
        &self,
        at: DateTime<Utc>,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        if self.provider().is_some() {
            return self.commit_by_provider(at, run_id, progress).await;
        }
        self.commit_to_time(at, run_id, progress).await
    }

    /// The provider restores to `at` into a new instance; its database is copied into
    /// `<db>_restore_<tag>` and counted, and the instance released. Nothing live changes; any
    /// failure releases the instance the adapter reported. A copy a finished prepare of the
    /// same run and time left is kept without calling the provider again.
    async fn prepare_by_provider(
        &self,
        at: DateTime<Utc>,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<PreparePostgresOutput> {
        let started = Instant::now();
        let pg = self.postgres()?;
        let tag = run_tag(run_id);
        let mark = prepared_mark(at);
        let mut swap = self.swap(run_id).await?;
        let names = swap.names().clone();
        let copy_url = swap.restore_url()?;
        let state = swap.state().await;
        let kept = match state {
            Ok(repository::SwapState::Fresh {
                stale_restore: true,
            }) => swap.prepared_for(&mark).await,
            Ok(repository::SwapState::Fresh { .. }) => Ok(false),
            // Before the provider makes an instance nobody would use.
            Ok(repository::SwapState::Swapped | repository::SwapState::Interrupted) => {
                Err(anyhow::anyhow!(
                    "this run already swapped a restore in ({} holds the database it \
                     replaced): there is nothing left to prepare",
                    names.pre
                ))
            }
            Ok(repository::SwapState::NoLive) => Err(anyhow::anyhow!(
                "the live database {} does not exist (and no swap of this run is under \
                 way); check the database URL — refusing to guess",
                names.live
            )),
            Err(e) => Err(e),
        };
        swap.close().await;
        if kept? {
            return Ok(PreparePostgresOutput {
                database: names.live.clone(),
                restore_database: names.restore.clone(),
                point: String::new(),
                archive_bytes: 0,
                counts: super::postgres::count_tables(&copy_url, &pg.counts).await?,
                elapsed_ms: millis(started),
                physical: Some(PhysicalRestore {
                    to_time: shown(at),
                    base_backup: String::new(),
                    data_dir: names.live.clone(),
                    restored_dir: names.restore.clone(),
                    kept_dir: String::new(),
                    stopped: None,
                    last_transaction_at: None,
                    timeline: None,
                    detail: format!(
                        "kept the copy an earlier prepare made in {} (restored to {} by the \
                         provider)",
                        names.restore,
                        shown(at)
                    ),
                }),
            });
        }
        progress.report(api::model::Progress {
            stage: "provider restoring".into(),
            unit: "instances".into(),
            ..api::model::Progress::default()
        });
        let call = self.call(
            "restore",
            vec![
                ("ROLLCALL_TO_TIME", shown(at)),
                ("ROLLCALL_RUN_ID", run_id.to_owned()),
                ("ROLLCALL_RUN_TAG", tag.clone()),
            ],
        )?;
        let what = format!("provider adapter `{}` restore", call.config.shown());
        let out = match call.run_keeping_stdout().await {
            Ok(out) => out,
            Err((e, stdout)) => {
                // A restore that failed after making an instance may still have named it.
                let release = match reported_instance(&stdout) {
                    Some(id) => match self.release(&id, run_id).await {
                        Ok(()) => format!("instance {id} it named was released"),
                        Err(r) => format!(
                            "releasing instance {id} it named failed too ({}): remove it by hand",
                            api::errors::one_line(&*r)
                        ),
                    },
                    None => "the adapter named no instance to release; if the provider made \
                             one, remove it by hand (its name should carry ROLLCALL_RUN_TAG)"
                        .to_owned(),
                };
                bail!(
                    "{}; nothing live was changed; {release}",
                    api::errors::one_line(&*e)
                );
            }
        };
        let instance = reported_instance(&out);
        let mut may_release = true;
        let copied = async {
            let restored =
                parse_restored(&out).with_context(|| format!("{what} printed a bad answer"))?;
            if !restored_to_accepted(at, restored.restored_to) {
                bail!(
                    "{what} restored to {}, not the {} asked for (only the same instant, or \
                     it truncated to milliseconds or seconds, is accepted)",
                    shown(restored.restored_to),
                    shown(at)
                );
            }
            let within = CONNECT_WITHIN.min(Duration::from_secs(call.config.timeout_s));
            wait_for_connection(&restored.database_url, within)
                .await
                .with_context(|| {
                    format!(
                        "{what}: instance {}'s database_url {} does not take connections",
                        restored.instance,
                        repository::redact_url(&restored.database_url)
                    )
                })?;
            let (source_ok, releasable) = self.check_source(&restored.database_url, &what).await;
            may_release = releasable;
            source_ok?;
            progress.report(api::model::Progress {
                stage: "copying".into(),
                unit: "databases".into(),
                ..api::model::Progress::default()
            });
            let mut swap = self.swap(run_id).await?;
            let copy = repository::copy_into_swap(
                &mut swap,
                &restored.database_url,
                &mark,
                &pg.counts,
                &repository::CopyOptions {
                    bin_dir: pg.config.bin_dir.clone(),
                    connect_timeout: Duration::from_secs(15),
                },
            )
            .await;
            swap.close().await;
            let copy = copy.with_context(|| {
                format!(
                    "copy instance {}'s database into {}",
                    restored.instance, names.restore
                )
            })?;
            Ok((restored, copy))
        }
        .await;
        let released = match &instance {
            Some(id) if may_release => Some(self.release(id, run_id).await),
            _ => None,
        };
        let (restored, copy) = match copied {
            Ok(done) => done,
            Err(e) => {
                let release = match (&instance, released) {
                    (Some(id), Some(Ok(()))) => format!("; instance {id} released"),
                    (Some(id), Some(Err(r))) => format!(
                        "; releasing instance {id} failed too ({}): remove it by hand",
                        api::errors::one_line(&*r)
                    ),
                    (Some(id), None) if !e.to_string().contains("was not released") => format!(
                        "; instance {id} was not released (not shown to be another server than \
                         the live one): remove it by hand if it is this restore's"
                    ),
                    (Some(_), None) => String::new(),
                    _ => "; the adapter named no instance to release".to_owned(),
                };
                return Err(anyhow::anyhow!(
                    "{}; nothing live was changed{release}",
                    api::errors::one_line(&*e)
                ));
            }
        };
        let release = match released {
            Some(Ok(())) => format!("instance {} released", restored.instance),
            Some(Err(e)) => {
                tracing::warn!(
                    instance = %restored.instance,
                    "the provider's instance was not released: {e:#}"
                );
                format!(
                    "releasing instance {} failed ({}): remove it by hand",
                    restored.instance,
                    api::errors::one_line(&*e)
                )
            }
            None => String::new(),
        };
        Ok(PreparePostgresOutput {
            database: names.live.clone(),
            restore_database: names.restore.clone(),
            point: String::new(),
            archive_bytes: 0,
            counts: copy.counts,
            elapsed_ms: millis(started),
            physical: Some(PhysicalRestore {
                to_time: shown(at),
                base_backup: format!("provider instance {}", restored.instance),
                data_dir: names.live.clone(),
                restored_dir: names.restore.clone(),
                kept_dir: String::new(),
                stopped: Some(format!(
                    "the provider restored to {}",
                    shown(restored.restored_to)
                )),
                last_transaction_at: None,
                timeline: None,
                detail: format!(
                    "the provider restored instance {} to {} (PostgreSQL {}), copied into {}; {release}",
                    restored.instance,
                    shown(restored.restored_to),
                    copy.source_version,
                    names.restore
                ),
            }),
        })
    }

    /// Refuses a reported endpoint that cannot be the live database restored to a time: the
    /// live server itself (the same postmaster start time: the provider restored in place, or
    /// the adapter reported the live endpoint), another database name than the live one, or a
    /// database without tables where the live one has some (e.g. the maintenance database).
    /// Returns whether the instance may be released: only once the endpoint was shown to be
    /// another server than the live one.
    async fn check_source(&self, source_url: &str, what: &str) -> (Result<()>, bool) {
        use sqlx::Connection as _;
        use std::str::FromStr as _;
        let mut another_server = false;
        let checked = async {
            let pg = self.postgres()?;
            let live_url = pg.url()?;
            let probe = "SELECT pg_postmaster_start_time()::text, \
                         (SELECT count(*) FROM pg_catalog.pg_tables \
                          WHERE schemaname NOT IN ('pg_catalog', 'information_schema'))";
            let mut live = sqlx::PgConnection::connect(&live_url)
                .await
                .context("connect to the live database")?;
            let (live_start, live_tables): (String, i64) = sqlx::query_as(probe)
                .fetch_one(&mut live)
                .await
                .context("read the live server's start time")?;
            let _ = live.close().await;
            let mut source = sqlx::PgConnection::connect(source_url)
                .await
                .with_context(|| format!("connect to {}", repository::redact_url(source_url)))?;
            let (source_start, source_tables): (String, i64) = sqlx::query_as(probe)
                .fetch_one(&mut source)
                .await
                .context("read the restored server's start time")?;
            let _ = source.close().await;
            if source_start == live_start {
                bail!(
                    "{what} reported the live server itself ({}: started at {live_start}, like \
                     the live one): the provider must restore into a new instance; it was not \
                     released",
                    repository::redact_url(source_url)
                );
            }
            another_server = true;
            let name = |url: &str| {
                sqlx::postgres::PgConnectOptions::from_str(url)
                    .ok()
                    .and_then(|o| o.get_database().map(str::to_owned))
                    .unwrap_or_default()
            };
            let (live_db, source_db) = (name(&live_url), name(source_url));
            if source_db != live_db {
                bail!(
                    "{what} reported database {source_db:?}, and the live database is \
                     {live_db:?}: the restored instance's copy of the live database must be \
                     named like it"
                );
            }
            if live_tables > 0 && source_tables == 0 {
                bail!(
                    "{what} reported {}, which holds no tables, and the live database has \
                     {live_tables}: the wrong database (a maintenance database?)",
                    repository::redact_url(source_url)
                );
            }
            Ok(())
        }
        .await;
        (checked, another_server)
    }

    /// Releases the provider's instance `instance` of run `run_id`: only one whose id carries
    /// the run's tag (the contract names instances after `ROLLCALL_RUN_TAG`), so a wrong answer
    /// never has rollcall delete an instance it did not ask for, the live one above all.
    async fn release(&self, instance: &str, run_id: &str) -> Result<()> {
        let tag = run_tag(run_id);
        if !instance.contains(&tag) {
            bail!(
                "instance {instance} does not carry the run's tag {tag} (ROLLCALL_RUN_TAG), so \
                 rollcall did not release it: if it is this restore's, remove it by hand"
            );
        }
        let call = self.call(
            "release",
            vec![
                ("ROLLCALL_INSTANCE", instance.to_owned()),
                ("ROLLCALL_RUN_ID", run_id.to_owned()),
                ("ROLLCALL_RUN_TAG", run_tag(run_id)),
            ],
        )?;
        call.run().await.map(|_| ())
    }

    /// The logical swap of the copy prepare made: it takes the live name, the live database
    /// kept as `<db>_pre_<tag>` (see `repository::commit_swap`).
    async fn commit_by_provider(
        &self,
        at: DateTime<Utc>,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        let started = Instant::now();
        progress.report(api::model::Progress {
            stage: "swapping".into(),
            unit: "databases".into(),
            ..api::model::Progress::default()
        });
        let mut swap = self.swap(run_id).await?;
        let committed = repository::commit_swap_marked(
            &mut swap,
            &prepared_mark(at),
            &format!("a copy restored by the provider to {}", shown(at)),
        )
        .await;
        let names = swap.names().clone();
        swap.close().await;
        let committed = committed?;
        Ok(RestorePostgresOutput {
            database: names.live.clone(),
            pre_restore_database: names.pre.clone(),
            point: String::new(),
            archive_bytes: 0,
            resumed: committed.resumed().to_owned(),
            elapsed_ms: millis(started),
            physical: Some(PhysicalRestore {
                to_time: shown(at),
                base_backup: String::new(),
                data_dir: names.live.clone(),
                restored_dir: names.live.clone(),
                kept_dir: names.pre.clone(),
                stopped: None,
                last_transaction_at: None,
                timeline: None,
                detail: format!(
                    "restored to time {} by the provider; the previous database is kept as {}",
                    shown(at),
                    names.pre
                ),
            }),
        })
    }
}

/// What the restore copy is marked with once a prepare by the provider finished.
fn prepared_mark(at: DateTime<Utc>) -> String {
    format!("restored by the provider to {}", shown(at))
}

/// Waits until `url` takes a connection: a provider's new endpoint may answer a little after
/// the adapter returns (DNS, a load balancer).
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
                return Err(anyhow::anyhow!("{}", api::redact::redact(&e.to_string())))
                    .with_context(|| format!("no connection within {} s", within.as_secs()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::path::PathBuf;

    fn program(config: &ProviderConfig) -> PathBuf {
        PathBuf::from(&config.command[0])
    }

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_window_is_two_times_in_order() {
        let w = parse_window(
            br#" {"earliest": "2026-12-06T10:00:00Z", "latest": "2026-12-06T12:30:00.5+01:00", "x": 1}
"#,
        )
        .unwrap();
        assert_eq!(w.earliest, t("2026-12-06T10:00:00Z"));
        assert_eq!(w.latest, t("2026-12-06T11:30:00.5Z"));
        for (bad, says) in [
            (&b""[..], "printed nothing"),
            (b"not json postgres://u:secret@h/db", "not one JSON object"),
            (b"[1]", "not an object"),
            (br#"{"earliest": "2026-12-06T10:00:00Z"}"#, "\"latest\""),
            (
                br#"{"earliest": "yesterday", "latest": "2026-12-06T10:00:00Z"}"#,
                "not an RFC 3339 time",
            ),
            (
                br#"{"earliest": "2026-12-06T11:00:00Z", "latest": "2026-12-06T10:00:00Z"}"#,
                "later than latest",
            ),
            (b"{\"a\":1}\n{\"b\":2}", "not one JSON object"),
        ] {
            let err = parse_window(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn a_restore_names_a_postgres_url_a_time_and_an_instance() {
        // Instance ids go back to the adapter, which may put them in a path.
        for bad in ["..", ".", "a/b", "x y", "", "i;rm"] {
            assert!(!valid_instance(bad), "{bad:?}");
        }
        for good in ["db-pitr-1", "projects:p1:instances:x", "i_1.2"] {
            assert!(valid_instance(good), "{good:?}");
        }
        let ok = parse_restored(
            br#"{"database_url": "postgres://app:pw@10.0.0.5:5432/app", "restored_to": "2026-12-06T10:00:00.123456Z", "instance": " db-pitr-1 "}"#,
        )
        .unwrap();
        assert_eq!(ok.instance, "db-pitr-1");
        assert_eq!(ok.restored_to, t("2026-12-06T10:00:00.123456Z"));
        for (bad, says) in [
            (
                &br#"{"database_url": "mysql://h/db", "restored_to": "2026-12-06T10:00:00Z", "instance": "i"}"#[..],
                "must be postgres://",
            ),
            (
                br#"{"database_url": "postgres://h:5432", "restored_to": "2026-12-06T10:00:00Z", "instance": "i"}"#,
                "must be postgres://",
            ),
            (
                br#"{"database_url": "postgres://u:secret@h/db", "instance": "i"}"#,
                "\"restored_to\"",
            ),
            (
                br#"{"database_url": "postgres://h/db", "restored_to": "2026-12-06T10:00:00Z", "instance": ""}"#,
                "no instance id",
            ),
            (
                br#"{"database_url": 5, "restored_to": "2026-12-06T10:00:00Z", "instance": "i"}"#,
                "database_url",
            ),
        ] {
            let err = parse_restored(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        // A bad answer that names its instance still has it released.
        assert_eq!(
            reported_instance(br#"{"database_url": "mysql://h/db", "instance": "db-9"}"#),
            Some("db-9".to_owned())
        );
        assert_eq!(reported_instance(b"garbage"), None);
        assert_eq!(reported_instance(br#"{"instance": "a\nb"}"#), None);
    }

    #[test]
    fn only_the_time_asked_or_it_truncated_is_accepted() {
        let asked = t("2026-12-06T10:00:07.123456Z");
        assert!(restored_to_accepted(asked, asked));
        assert!(restored_to_accepted(asked, t("2026-12-06T10:00:07.123Z")));
        assert!(restored_to_accepted(asked, t("2026-12-06T10:00:07Z")));
        // Later (could hold later transactions), rounded up, or earlier by more: refused.
        assert!(!restored_to_accepted(asked, t("2026-12-06T10:00:08Z")));
        assert!(!restored_to_accepted(asked, t("2026-12-06T10:00:07.124Z")));
        assert!(!restored_to_accepted(asked, t("2026-12-06T10:00:06Z")));
        assert!(!restored_to_accepted(asked, t("2026-12-06T10:00:07.2Z")));
    }

    #[test]
    fn the_section_needs_a_program_and_a_positive_timeout() {
        let file = Path::new("/etc/rollcall/agent.toml");
        let parse = |text: &str| toml::from_str::<ProviderConfig>(text).unwrap();
        let ok = parse("command = [\"bin/adapter\", \"--x\"]")
            .validated(file)
            .unwrap();
        assert_eq!(ok.timeout_s, 3600);
        assert_eq!(program(&ok), PathBuf::from("/etc/rollcall/bin/adapter"));
        let on_path = parse("command = [\"adapter\"]").validated(file).unwrap();
        assert_eq!(program(&on_path), PathBuf::from("adapter"));
        for (bad, says) in [
            ("command = []", "postgres.provider.command is empty"),
            ("command = [\" \"]", "postgres.provider.command is empty"),
            (
                "command = [\"a\"]\ntimeout_s = 0",
                "postgres.provider.timeout_s must be positive",
            ),
        ] {
            let err = parse(bad).validated(file).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("agent.toml"), "{err}");
        }
        assert!(toml::from_str::<ProviderConfig>("command = [\"a\"]\nshell = true").is_err());
    }

    fn script(dir: &Path, body: &str) -> ProviderConfig {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("adapter.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        ProviderConfig {
            command: vec![path.display().to_string(), "--fixed".into()],
            timeout_s: 2,
        }
    }

    fn call<'a>(config: &'a ProviderConfig, withheld: &str) -> Call<'a> {
        Call {
            config,
            verb: "window",
            env: vec![("ROLLCALL_TO_TIME", "2026-12-06T10:00:00Z".into())],
            withheld: vec![withheld.to_owned()],
        }
    }

    #[tokio::test]
    async fn the_adapter_gets_its_verb_and_inputs_and_never_the_database_url() {
        let dir = tempfile::tempdir().unwrap();
        let config = script(
            dir.path(),
            "printf '{\"args\": \"%s %s\", \"verb\": \"%s\", \"t\": \"%s\", \"withheld\": \"%s\", \"inherited\": \"%s\"}' \
             \"$1\" \"$2\" \"$ROLLCALL_VERB\" \"$ROLLCALL_TO_TIME\" \"$CARGO_PKG_NAME\" \"$CARGO_PKG_VERSION\"; \
             read line && echo 'stdin was open' >&2 && exit 9; exit 0",
        );
        // Cargo sets both for the test process; the first stands for the live database
        // URL's variable (withheld), the second for a provider's credentials (inherited).
        assert!(std::env::var("CARGO_PKG_NAME").is_ok_and(|v| !v.is_empty()));
        let out = call(&config, "CARGO_PKG_NAME").run().await.unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["args"], "--fixed window");
        assert_eq!(value["verb"], "window");
        assert_eq!(value["t"], "2026-12-06T10:00:00Z");
        assert_eq!(value["withheld"], "");
        assert_eq!(value["inherited"], env!("CARGO_PKG_VERSION"));
    }

    #[tokio::test]
    async fn a_failing_or_hanging_adapter_is_one_line_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let failing = script(
            dir.path(),
            "echo 'first line' >&2; echo 'quota exceeded for instances' >&2; exit 3",
        );
        let err = call(&failing, "X").run().await.unwrap_err();
        let line = api::errors::one_line(&*err);
        assert!(
            line.contains("--fixed` window failed (exit status: 3): quota exceeded for instances")
                && line.contains("provider adapter `"),
            "{line}"
        );

        // A hang: killed with its process group (the child it started too) at the timeout.
        let pid_file = dir.path().join("child.pid");
        let hanging = script(
            dir.path(),
            &format!(
                "sleep 300 & echo $! > {}; echo 'waiting on the provider' >&2; wait",
                pid_file.display()
            ),
        );
        let started = Instant::now();
        let err = call(&hanging, "X").run().await.unwrap_err();
        let line = api::errors::one_line(&*err);
        assert!(
            line.contains("timed out after 2 s") && line.contains("process group were killed"),
            "{line}"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone, or a zombie left for its new parent to reap: killed either way.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "the adapter's child {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
