//! Role control: how an agent freezes, scales and restarts the role it sits beside.
//!
//! Two concerns, each with its own adapter chosen in `agent.toml`:
//! * **scale** — `process` (the agent runs the role's processes itself and supervises them) or
//!   `exec` (operator-supplied commands: systemd, kubectl, a cloud CLI);
//! * **freeze** — `http` (the role's admin endpoint, e.g. cowork-sim's maintenance mode) or
//!   `exec`.
//!
//! Scaling remembers, per run, the replica count before the run first scaled the role, so
//! `Scale(Prior)` returns to it. That memory and the desired count live in the state
//! directory: an agent restarted in the middle of a restore does not start roles that the run
//! scaled to zero.
//!
//! The same memory tells which start brings the role back after a restore: a scale-up in the
//! run that scaled the role to zero before (the plans' `scale-to-zero`, then `start-web`, the
//! smokes' replicas and `restore-replicas`). The `process` adapter gives the replicas such a
//! scale starts its `first_start_env` (say, migrations off); the `exec` adapter runs its scale
//! command with its `first_start_env` and `ROLLCALL_AFTER_RESTORE=true`; restarts never get it.

mod env;
mod exec;
mod http;
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::config::{ConfigError, resolve};
use api::model::{ScaleOutput, ScaleTarget};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use env::EnvVars;
pub use exec::ExecConfig;
pub use http::HttpFreezeConfig;
pub use process::ProcessConfig;

/// `[control]` in `agent.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// "process", "exec", or unset (this agent does not scale its role).
    pub scale: Option<String>,
    /// "http", "exec", or unset (this agent does not freeze its role).
    pub freeze: Option<String>,
    pub process: Option<ProcessConfig>,
    pub exec: Option<ExecConfig>,
    pub http: Option<HttpFreezeConfig>,
}

/// Validated role control of one agent.
pub struct RoleControl {
    scaler: Option<Scaler>,
    freezer: Option<Freezer>,
    memory: Memory,
}

enum Scaler {
    Process(process::Supervisor),
    Exec(exec::Exec),
}

enum Freezer {
    Http(http::HttpFreeze),
    Exec(exec::Exec),
}

impl RoleControl {
    /// Checks the config (naming `file` and the key in every error) and prepares the adapters;
    /// nothing starts until [`RoleControl::start`].
    pub fn from_config(file: &Path, config: &ControlConfig, state_dir: &Path) -> Result<Self> {
        let missing = |adapter: &str| {
            ConfigError::new(
                file,
                format!("control uses the {adapter} adapter but has no [control.{adapter}] table"),
                format!("add [control.{adapter}] (see deploy/agent.toml)"),
            )
        };
        let scaler = match config.scale.as_deref() {
            None => None,
            Some("process") => {
                let cfg = config.process.as_ref().ok_or_else(|| missing("process"))?;
                Some(Scaler::Process(process::Supervisor::new(
                    file, cfg, state_dir,
                )?))
            }
            Some("exec") => {
                let cfg = config.exec.as_ref().ok_or_else(|| missing("exec"))?;
                if cfg.scale.is_none() {
                    bail!(ConfigError::new(
                        file,
                        "control.scale = \"exec\" but [control.exec] has no `scale` command",
                        "add scale = [\"kubectl\", \"scale\", \"deployment/web\", \"--replicas={replicas}\"] \
                         and a `status` command that prints the replica count"
                    ));
                }
                Some(Scaler::Exec(exec::Exec::new(file, cfg)?))
            }
            Some(other) => bail!(ConfigError::new(
                file,
                format!("control.scale = {other:?} is not an adapter"),
                "use \"process\" or \"exec\", or leave it unset"
            )),
        };
        let freezer = match config.freeze.as_deref() {
            None => None,
            Some("http") => {
                let cfg = config.http.as_ref().ok_or_else(|| missing("http"))?;
                Some(Freezer::Http(http::HttpFreeze::new(file, cfg)?))
            }
            Some("exec") => {
                let cfg = config.exec.as_ref().ok_or_else(|| missing("exec"))?;
                if cfg.freeze.is_none() || cfg.unfreeze.is_none() {
                    bail!(ConfigError::new(
                        file,
                        "control.freeze = \"exec\" but [control.exec] lacks `freeze` or `unfreeze`",
                        "add both commands"
                    ));
                }
                Some(Freezer::Exec(exec::Exec::new(file, cfg)?))
            }
            Some(other) => bail!(ConfigError::new(
                file,
                format!("control.freeze = {other:?} is not an adapter"),
                "use \"http\" or \"exec\", or leave it unset"
            )),
        };
        let memory = Memory::open(state_dir)?;
        Ok(RoleControl {
            scaler,
            freezer,
            memory,
        })
    }

    /// The freeze adapter, as freeze outputs name it ("http", "exec"), if any.
    pub fn freezer_kind(&self) -> Option<&'static str> {
        match self.freezer {
            Some(Freezer::Http(_)) => Some("http"),
            Some(Freezer::Exec(_)) => Some("exec"),
            None => None,
        }
    }

    /// Capabilities to announce in the hello.
    pub fn capabilities(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.freezer.is_some() {
            out.extend(["freeze".to_owned(), "unfreeze".to_owned()]);
        }
        if self.scaler.is_some() {
            out.extend(["scale".to_owned(), "restart".to_owned()]);
        }
        out
    }

    /// Starts supervision (process adapter): the replicas the state directory remembers, or
    /// the configured count on first start.
    pub async fn start(&self, cancel: CancellationToken) -> Result<()> {
        if let Some(Scaler::Process(s)) = &self.scaler {
            s.set_frozen(self.memory.frozen());
            let desired = self.memory.desired().unwrap_or(s.configured_replicas());
            s.start(desired, cancel).await?;
        }
        Ok(())
    }

    /// After an agent restart: if the role was frozen, re-apply the freeze once its processes
    /// are up (in the background; the agent attaches meanwhile).
    pub fn refreeze_after_start(self: &std::sync::Arc<Self>, cancel: CancellationToken) {
        if !self.memory.frozen() || self.scaler.is_none() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let until = std::time::Instant::now() + Duration::from_secs(120);
            while std::time::Instant::now() < until && !cancel.is_cancelled() {
                if me.readiness().await.0 {
                    if let Err(e) = me.keep_frozen().await {
                        tracing::error!(
                            "the role restarted while frozen and could not be frozen again: {e:#}"
                        );
                    } else {
                        tracing::info!(
                            "the role was frozen before this agent restarted: freeze re-applied"
                        );
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// A role that was frozen stays frozen across anything that starts its processes anew
    /// (a restart, a scale-up, an agent restart): the freeze is re-applied once they are up.
    async fn keep_frozen(&self) -> Result<()> {
        if !self.memory.frozen() {
            return Ok(());
        }
        match &self.freezer {
            Some(Freezer::Http(h)) => h.set(true).await.map(|_| ()),
            Some(Freezer::Exec(e)) => e.freeze(true).await.map(|_| ()),
            None => Ok(()),
        }
        .map_err(|e| e.context("re-apply the freeze to the role's new processes"))
    }

    /// Stops supervised processes (agent shutdown).
    pub async fn stop(&self) {
        if let Some(Scaler::Process(s)) = &self.scaler {
            s.shutdown().await;
        }
    }

    pub async fn freeze(&self) -> Result<String> {
        if self.freezer.is_none() {
            bail!("this agent has no freeze adapter; set control.freeze in its agent.toml");
        }
        // Remembered first: processes started from now on come up frozen.
        self.memory.set_frozen(true)?;
        if let Some(Scaler::Process(s)) = &self.scaler {
            s.set_frozen(true);
        }
        match &self.freezer {
            Some(Freezer::Http(h)) => h.set(true).await,
            Some(Freezer::Exec(e)) => e.freeze(true).await,
            None => bail!("this agent has no freeze adapter"),
        }
    }

    pub async fn unfreeze(&self) -> Result<String> {
        let out = match &self.freezer {
            Some(Freezer::Http(h)) => h.set(false).await?,
            Some(Freezer::Exec(e)) => e.freeze(false).await?,
            None => bail!("this agent has no freeze adapter; set control.freeze in its agent.toml"),
        };
        self.memory.set_frozen(false)?;
        if let Some(Scaler::Process(s)) = &self.scaler {
            s.set_frozen(false);
        }
        Ok(out)
    }

    /// Scales the role; `run_id` keys the remembered prior count.
    pub async fn scale(&self, target: ScaleTarget, run_id: &str) -> Result<ScaleOutput> {
        let Some(scaler) = &self.scaler else {
            // Nothing was scaled, so there is nothing to return to: "restore prior replicas"
            // across all roles passes on agents that run no role processes (database, objects).
            if matches!(target, ScaleTarget::Prior | ScaleTarget::PriorOf(_)) {
                return Ok(ScaleOutput {
                    before: 0,
                    now: 0,
                    prior: 0,
                });
            }
            bail!("this agent has no scale adapter; set control.scale in its agent.toml");
        };
        let before = match scaler {
            Scaler::Process(s) => s.desired().await,
            Scaler::Exec(e) => e.status().await?,
        };
        let prior = self.memory.remember_prior(run_id, before)?;
        let now = match target {
            ScaleTarget::Replicas(n) => n,
            ScaleTarget::Prior => prior,
            // An undo of a blocked run returns to the count before that run scaled the role.
            ScaleTarget::PriorOf(other) => self.memory.prior_of(&other).unwrap_or(prior),
        };
        // Read before this scale records itself: scaling to zero marks the run.
        let after_restore = now > before && self.memory.zeroed_by(run_id);
        if after_restore {
            tracing::info!(
                run = run_id,
                "run {run_id} scaled the role to zero before: the replicas this scale-up starts \
                 bring it back after the restore"
            );
        }
        // Persist the intent first: a restart mid-scale converges on it.
        self.memory.set_desired(now, run_id)?;
        match scaler {
            Scaler::Process(s) => s.scale(now, after_restore).await?,
            Scaler::Exec(e) => e.scale(now, after_restore).await?,
        }
        if now > 0 {
            self.keep_frozen().await?;
        }
        Ok(ScaleOutput { before, now, prior })
    }

    pub async fn restart(&self) -> Result<String> {
        let out = match &self.scaler {
            Some(Scaler::Process(s)) => s.restart().await?,
            Some(Scaler::Exec(e)) => e.restart().await?,
            None => bail!("this agent has no scale adapter; set control.scale in its agent.toml"),
        };
        self.keep_frozen().await?;
        Ok(out)
    }

    /// Readiness for heartbeats: the role runs its desired replicas and they are healthy.
    /// An agent without a scale adapter is ready when it is up.
    pub async fn readiness(&self) -> (bool, String) {
        match &self.scaler {
            None => (true, "ready".into()),
            Some(Scaler::Process(s)) => s.readiness().await,
            Some(Scaler::Exec(e)) => match e.status().await {
                Ok(0) => (false, "scaled to 0".into()),
                Ok(n) => (true, format!("{n} replicas")),
                Err(e) => (
                    false,
                    format!("status failed: {}", api::errors::one_line(&*e)),
                ),
            },
        }
    }
}

/// Desired replicas and per-run prior counts, in `<state_dir>/control.json`.
struct Memory {
    path: PathBuf,
    inner: std::sync::Mutex<MemoryFile>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct MemoryFile {
    desired: Option<u32>,
    prior: BTreeMap<String, u32>,
    /// Frozen by a run and not unfrozen since.
    #[serde(default)]
    frozen: bool,
    /// The run that last scaled the role to zero: its scale-ups bring the role back after
    /// its restore (`first_start_env`).
    #[serde(default)]
    zeroed_by: Option<String>,
}

impl Memory {
    fn open(state_dir: &Path) -> Result<Memory> {
        let path = state_dir.join("control.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is corrupt; it remembers the replicas this agent's role should run \
                     — fix or remove it (removing it returns to the configured count)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MemoryFile::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(Memory {
            path,
            inner: std::sync::Mutex::new(file),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryFile> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn desired(&self) -> Option<u32> {
        self.lock().desired
    }

    fn save(&self, file: &MemoryFile) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(file).context("encode control state")?;
        crate::state::write_atomic(&self.path, &bytes, true)
            .with_context(|| format!("write {}", self.path.display()))
    }

    fn frozen(&self) -> bool {
        self.lock().frozen
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        let mut file = self.lock();
        let mut next = file.clone();
        next.frozen = frozen;
        self.save(&next)?;
        *file = next;
        Ok(())
    }

    /// Records the desired count `run_id` scaled the role to.
    fn set_desired(&self, n: u32, run_id: &str) -> Result<()> {
        let mut file = self.lock();
        let mut next = file.clone();
        next.desired = Some(n);
        if n == 0 {
            next.zeroed_by = Some(run_id.to_owned());
        }
        self.save(&next)?;
        *file = next;
        Ok(())
    }

    /// Whether `run_id` is the run that last scaled the role to zero.
    fn zeroed_by(&self, run_id: &str) -> bool {
        self.lock().zeroed_by.as_deref() == Some(run_id)
    }

    /// The prior count `run_id` recorded, if it scaled the role on this agent.
    fn prior_of(&self, run_id: &str) -> Option<u32> {
        self.lock().prior.get(run_id).copied()
    }

    /// The prior count of `run_id`: recorded now as `current` if this is the run's first scale.
    fn remember_prior(&self, run_id: &str, current: u32) -> Result<u32> {
        let mut file = self.lock();
        if let Some(&prior) = file.prior.get(run_id) {
            return Ok(prior);
        }
        let mut next = file.clone();
        next.prior.insert(run_id.to_owned(), current);
        // Keep the memory bounded: runs are few, but agents live long.
        while next.prior.len() > 256 {
            let Some(oldest) = next.prior.keys().next().cloned() else {
                break;
            };
            next.prior.remove(&oldest);
        }
        self.save(&next)?;
        *file = next;
        Ok(current)
    }
}

/// Replaces `{name}` placeholders; unknown ones are left as written.
pub(crate) fn substitute(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

pub(crate) fn resolve_path(file: &Path, p: &Path) -> PathBuf {
    resolve(file, p)
}

/// An HTTP client for health checks and admin endpoints. reqwest needs a process-wide rustls
/// provider; ours is ring, installed here if the binary has not already done so.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("build an HTTP client")
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn prior_is_remembered_per_run_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::open(dir.path()).unwrap();
        assert_eq!(m.remember_prior("run-1", 3).unwrap(), 3);
        // A later scale in the same run keeps the first prior.
        assert_eq!(m.remember_prior("run-1", 0).unwrap(), 3);
        m.set_desired(0, "run-1").unwrap();
        drop(m);
        let m = Memory::open(dir.path()).unwrap();
        assert_eq!(m.desired(), Some(0));
        assert_eq!(m.remember_prior("run-1", 0).unwrap(), 3);
        assert_eq!(m.remember_prior("run-2", 0).unwrap(), 0);
        assert_eq!((m.prior_of("run-1"), m.prior_of("run-3")), (Some(3), None));
    }

    /// The role's log of its own starts: one line per start, as the child saw the world.
    fn starts(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn wait_for_starts(log: &Path, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = starts(log);
            if lines.len() >= n {
                return lines;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected {n} starts, saw {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Real children: cwd, env, env_file, and `first_start_env` only on the starts that bring
    /// the role back in the run that scaled it to zero, never on restarts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_start_after_a_restore_gets_first_start_env_and_restarts_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(conf.join("app")).unwrap();
        std::fs::write(
            conf.join("role.env"),
            "# the role's secrets\nSECRET_KEY=from-file\nSHARED=file\n",
        )
        .unwrap();
        let log = dir.path().join("starts.log");
        let script = format!(
            "echo \"pid=$$ replica=$ROLLCALL_REPLICA cwd=$(pwd) secret=$SECRET_KEY shared=$SHARED \
             migrations=${{RUN_MIGRATIONS-unset}}\" >> {}; while true; do sleep 0.05; done",
            log.display()
        );
        let control: ControlConfig = toml::from_str(&format!(
            "scale = \"process\"\n[process]\nprogram = \"sh\"\nargs = [\"-c\", '{script}']\n\
             replicas = 1\ncwd = \"app\"\nenv_file = \"role.env\"\nenv = {{ SHARED = \"env\" }}\n\
             first_start_env = {{ RUN_MIGRATIONS = \"false\" }}\nstop_grace = \"300ms\"\n"
        ))
        .unwrap();
        let file = conf.join("agent.toml");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let app = std::fs::canonicalize(conf.join("app")).unwrap();
        let line = |replica: u32, migrations: &str| {
            format!(
                "replica={replica} cwd={} secret=from-file shared=env migrations={migrations}",
                app.display()
            )
        };
        // Without the pid, which differs per start.
        let seen = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .map(|l| l.split_once(' ').map(|(_, rest)| rest.to_owned()).unwrap())
                .collect()
        };

        let ctl = RoleControl::from_config(&file, &control, &state).unwrap();
        let cancel = CancellationToken::new();
        ctl.start(cancel.clone()).await.unwrap();
        // The agent's first start is no start after a restore.
        let lines = wait_for_starts(&log, 1).await;
        assert_eq!(seen(&lines), [line(0, "unset")]);

        // A drill: scale-to-zero, then start-web (`prior`) in the same run.
        ctl.scale(ScaleTarget::Replicas(0), "run-1").await.unwrap();
        ctl.scale(ScaleTarget::Prior, "run-1").await.unwrap();
        let lines = wait_for_starts(&log, 2).await;
        assert_eq!(seen(&lines)[1], line(0, "false"));

        // The role crashes: the supervisor's restart is no start after a restore.
        let pid: i32 = lines[1]
            .strip_prefix("pid=")
            .and_then(|l| l.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let lines = wait_for_starts(&log, 3).await;
        assert_eq!(seen(&lines)[2], line(0, "unset"));

        // Another run scales up without having scaled to zero: not after a restore.
        ctl.scale(ScaleTarget::Replicas(2), "run-2").await.unwrap();
        let lines = wait_for_starts(&log, 4).await;
        assert_eq!(seen(&lines)[3], line(1, "unset"));

        // The agent restarts (its state directory says run-1 zeroed the role once): the
        // desired replicas start without first_start_env.
        ctl.stop().await;
        cancel.cancel();
        drop(ctl);
        let ctl = RoleControl::from_config(&file, &control, &state).unwrap();
        let cancel = CancellationToken::new();
        ctl.start(cancel.clone()).await.unwrap();
        let mut got = seen(&wait_for_starts(&log, 6).await)[4..].to_vec();
        got.sort();
        assert_eq!(got, [line(0, "unset"), line(1, "unset")]);

        // A run that brings the role back in steps (a smoke's one replica, then the prior
        // count), across an agent restart between scale-to-zero and the first step: every
        // replica it starts gets first_start_env.
        ctl.scale(ScaleTarget::Replicas(0), "run-3").await.unwrap();
        ctl.stop().await;
        cancel.cancel();
        drop(ctl);
        let ctl = RoleControl::from_config(&file, &control, &state).unwrap();
        let cancel = CancellationToken::new();
        ctl.start(cancel.clone()).await.unwrap();
        ctl.scale(ScaleTarget::Replicas(1), "run-3").await.unwrap();
        let lines = wait_for_starts(&log, 7).await;
        assert_eq!(seen(&lines)[6], line(0, "false"));
        let out = ctl.scale(ScaleTarget::Prior, "run-3").await.unwrap();
        assert_eq!((out.before, out.now), (1, 2));
        let lines = wait_for_starts(&log, 8).await;
        assert_eq!(seen(&lines)[7], line(1, "false"));
        // A restart command in the same run restarts; it does not bring anything back.
        ctl.restart().await.unwrap();
        let mut got = seen(&wait_for_starts(&log, 10).await)[8..].to_vec();
        got.sort();
        assert_eq!(got, [line(0, "unset"), line(1, "unset")]);
        assert_eq!(starts(&log).len(), 10, "no start beyond those");
        ctl.stop().await;
        cancel.cancel();
    }

    #[test]
    fn corrupt_memory_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("control.json"), b"{not json").unwrap();
        let err = Memory::open(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
    }

    #[test]
    fn adapters_must_be_configured() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ControlConfig {
            scale: Some("process".into()),
            ..ControlConfig::default()
        };
        let err = RoleControl::from_config(Path::new("agent.toml"), &cfg, dir.path())
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "agent.toml: control uses the process adapter but has no [control.process] table; \
             add [control.process] (see deploy/agent.toml)"
        );
        let cfg = ControlConfig {
            freeze: Some("carrier-pigeon".into()),
            ..ControlConfig::default()
        };
        let err = RoleControl::from_config(Path::new("agent.toml"), &cfg, dir.path())
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("control.freeze = \"carrier-pigeon\" is not an adapter")
        );
    }
}
