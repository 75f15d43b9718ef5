//! The `process` adapter: the agent runs the role itself. It keeps the desired number of
//! child processes running (restarting crashed ones with backoff), scales up and down (SIGTERM,
//! then SIGKILL after a grace period, to the child's whole process group), and reports
//! readiness from each replica's health URL.
//!
//! Children are recorded in `<state_dir>/children.json`. An agent that was killed leaves its
//! children running; when it starts again it stops those leftovers (checking that the pid
//! still runs the configured program) before starting the desired count afresh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::config::ConfigError;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::env::{EnvVars, read_env_file};
use super::substitute;

/// `[control.process]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// The role's program: a path (relative to agent.toml) or a name looked up on PATH.
    pub program: PathBuf,
    /// Arguments; `{replica}` (0, 1, ...) and `{port}` (base_port + replica) are substituted.
    #[serde(default)]
    pub args: Vec<String>,
    /// The children's working directory (relative to agent.toml); must exist when the agent
    /// starts. Default: the agent's own working directory.
    pub cwd: Option<PathBuf>,
    /// Extra environment (placeholders substituted), over the agent's own, which children
    /// inherit. Values are never logged, but agent.toml is rarely a secret file: keep secret
    /// values in `env_file` or the agent's environment.
    #[serde(default)]
    pub env: EnvVars,
    /// A file of `KEY=VALUE` lines (relative to agent.toml; `#` comments and blank lines
    /// ignored, one pair of surrounding quotes taken off a value), read at every start so a
    /// rotated secret is picked up; `env` wins over it. Checked when the agent starts.
    pub env_file: Option<PathBuf>,
    /// Added (over `env`) only to the processes that bring the role back after a restore: the
    /// replicas started by a scale-up of the run that last scaled the role to zero (the
    /// default plan's `start-web`, smoke replicas and `restore-replicas` after its
    /// `scale-to-zero`). Crash restarts, `restart` commands, agent restarts and other runs'
    /// scale-ups do not get them. E.g. `{ RUN_MIGRATIONS = "false" }`.
    #[serde(default)]
    pub first_start_env: EnvVars,
    /// Replicas to run when the agent first starts (later, the count it was last scaled to).
    #[serde(default = "one")]
    pub replicas: u32,
    pub base_port: Option<u16>,
    /// Polled for readiness (2xx = ready), e.g. "http://127.0.0.1:{port}/readyz".
    pub health_url: Option<String>,
    /// How long a child may take to exit after SIGTERM before it is killed.
    #[serde(with = "humantime_serde", default = "default_grace")]
    pub stop_grace: Duration,
    /// How long a scale-up waits for new replicas to become ready.
    #[serde(with = "humantime_serde", default = "default_start_timeout")]
    pub start_timeout: Duration,
    /// Where children's stdout/stderr go (`replica-N.log`); default `<state_dir>/logs`.
    pub log_dir: Option<PathBuf>,
    /// Extra arguments for processes started while the role is frozen, so they come up
    /// frozen (cowork-sim web: ["--maintenance"]). The freeze is re-applied after they start
    /// either way.
    #[serde(default)]
    pub frozen_args: Vec<String>,
}

fn one() -> u32 {
    1
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

fn default_start_timeout() -> Duration {
    Duration::from_secs(60)
}

/// How often the supervisor checks on its children.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// A child that dies sooner than this after starting is restarted with growing delays.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

pub struct Supervisor {
    shared: Arc<Shared>,
}

struct Shared {
    config: ProcessConfig,
    program: PathBuf,
    /// `cwd`, resolved and checked to be a directory.
    cwd: Option<PathBuf>,
    /// `env_file`, resolved; read at every start.
    env_file: Option<PathBuf>,
    log_dir: PathBuf,
    pid_file: PathBuf,
    client: reqwest::Client,
    inner: Mutex<Inner>,
    frozen: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Inner {
    desired: u32,
    children: BTreeMap<u32, Running>,
    /// Per replica: consecutive quick deaths and when it may start again.
    backoff: BTreeMap<u32, (u32, Instant)>,
    restarts: u64,
    started: bool,
}

struct Running {
    child: tokio::process::Child,
    pid: u32,
    since: Instant,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PidFile {
    program: String,
    pids: Vec<u32>,
}

impl Supervisor {
    pub fn new(file: &Path, config: &ProcessConfig, state_dir: &Path) -> Result<Supervisor> {
        let program = if config.program.components().count() > 1 {
            super::resolve_path(file, &config.program)
        } else {
            config.program.clone()
        };
        if program.as_os_str().is_empty() {
            bail!(ConfigError::new(
                file,
                "control.process.program is empty",
                "name the role's program, e.g. program = \"/usr/local/bin/cowork-sim\""
            ));
        }
        let needs_port = config
            .args
            .iter()
            .chain(config.env.values())
            .chain(config.first_start_env.values())
            .any(|a| a.contains("{port}"))
            || config
                .health_url
                .as_deref()
                .is_some_and(|u| u.contains("{port}"));
        if needs_port && config.base_port.is_none() {
            bail!(ConfigError::new(
                file,
                "control.process uses {port} but sets no base_port",
                "set base_port = 8080 (replica N listens on base_port + N)"
            ));
        }
        for (key, vars) in [
            ("env", &config.env),
            ("first_start_env", &config.first_start_env),
        ] {
            if let Some(problem) = vars.problem() {
                bail!(ConfigError::new(
                    file,
                    format!("control.process.{key}: {problem}"),
                    format!("fix that entry of control.process.{key}")
                ));
            }
        }
        let cwd = match &config.cwd {
            None => None,
            Some(dir) => {
                let resolved = super::resolve_path(file, dir);
                if !resolved.is_dir() {
                    bail!(ConfigError::new(
                        file,
                        format!(
                            "control.process.cwd = {}: {} is not a directory",
                            dir.display(),
                            resolved.display()
                        ),
                        "create the directory or fix the path (a relative cwd is resolved \
                         against this file's directory)"
                    ));
                }
                Some(resolved)
            }
        };
        let env_file = match &config.env_file {
            None => None,
            Some(path) => {
                let resolved = super::resolve_path(file, path);
                // Checked now so a typo stops the agent, not the role's first start; read
                // again at every start.
                if let Err(e) = read_env_file(&resolved) {
                    bail!(ConfigError::new(
                        file,
                        format!("control.process.env_file = {}: {e:#}", path.display()),
                        "write one KEY=VALUE per line (# comments and blank lines are \
                         ignored), or fix the path (relative to this file's directory)"
                    ));
                }
                Some(resolved)
            }
        };
        let log_dir = match &config.log_dir {
            Some(d) => super::resolve_path(file, d),
            None => state_dir.join("logs"),
        };
        let client = super::http_client(Duration::from_secs(2))?;
        Ok(Supervisor {
            shared: Arc::new(Shared {
                config: config.clone(),
                program,
                cwd,
                env_file,
                log_dir,
                pid_file: state_dir.join("children.json"),
                client,
                inner: Mutex::new(Inner::default()),
                frozen: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// Whether processes started from now on get `frozen_args`.
    pub fn set_frozen(&self, frozen: bool) {
        self.shared
            .frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn configured_replicas(&self) -> u32 {
        self.shared.config.replicas
    }

    pub async fn desired(&self) -> u32 {
        self.shared.inner.lock().await.desired
    }

    /// Stops leftovers of an earlier agent, starts `desired` replicas, and supervises them
    /// until `cancel`.
    pub async fn start(&self, desired: u32, cancel: CancellationToken) -> Result<()> {
        std::fs::create_dir_all(&self.shared.log_dir)
            .with_context(|| format!("create log directory {}", self.shared.log_dir.display()))?;
        self.shared.stop_leftovers().await;
        {
            let mut inner = self.shared.inner.lock().await;
            inner.desired = desired;
            inner.started = true;
            for replica in 0..desired {
                self.shared.spawn(&mut inner, replica, false)?;
            }
            self.shared.save_pids(&inner);
        }
        tracing::info!(replicas = desired, program = %self.shared.program.display(), "role started");
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => shared.watch().await,
                }
            }
        });
        Ok(())
    }

    /// Runs `n` replicas. `after_restore`: the replicas this starts bring the role back after
    /// a restore, and get `first_start_env`.
    pub async fn scale(&self, n: u32, after_restore: bool) -> Result<()> {
        {
            let mut inner = self.shared.inner.lock().await;
            inner.desired = n;
            let extra: Vec<u32> = inner.children.range(n..).map(|(&r, _)| r).collect();
            for replica in extra {
                if let Some(running) = inner.children.remove(&replica) {
                    self.shared.stop(replica, running).await;
                }
            }
            for replica in 0..n {
                if !inner.children.contains_key(&replica) {
                    inner.backoff.remove(&replica);
                    self.shared.spawn(&mut inner, replica, after_restore)?;
                }
            }
            self.shared.save_pids(&inner);
        }
        self.wait_ready(n).await
    }

    pub async fn restart(&self) -> Result<String> {
        let n = {
            let mut inner = self.shared.inner.lock().await;
            let replicas: Vec<u32> = inner.children.keys().copied().collect();
            for replica in replicas {
                if let Some(running) = inner.children.remove(&replica) {
                    self.shared.stop(replica, running).await;
                }
                self.shared.spawn(&mut inner, replica, false)?;
            }
            self.shared.save_pids(&inner);
            inner.desired
        };
        self.wait_ready(n).await?;
        Ok(format!("restarted {n} replicas"))
    }

    async fn wait_ready(&self, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // None: a timeout past what the clock holds, which never ends (`Instant + Duration`
        // would panic on it).
        let until = Instant::now().checked_add(self.shared.config.start_timeout);
        loop {
            let (ready, detail) = self.readiness().await;
            if ready {
                return Ok(());
            }
            if until.is_some_and(|until| Instant::now() >= until) {
                bail!(
                    "{n} replicas of {} did not become ready within {}: {detail} (see the logs in {})",
                    self.shared.program.display(),
                    humantime::format_duration(self.shared.config.start_timeout),
                    self.shared.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn readiness(&self) -> (bool, String) {
        let (desired, running) = {
            let inner = self.shared.inner.lock().await;
            (
                inner.desired,
                inner.children.keys().copied().collect::<Vec<_>>(),
            )
        };
        if desired == 0 {
            return (false, "scaled to 0".into());
        }
        if (running.len() as u32) < desired {
            return (
                false,
                format!("{}/{desired} replicas running", running.len()),
            );
        }
        if let Some(template) = &self.shared.config.health_url {
            for replica in running.iter().copied().filter(|&r| r < desired) {
                let url = substitute(template, &self.shared.vars(replica));
                match self.shared.client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        return (
                            false,
                            format!("replica {replica}: {url} answered {}", r.status()),
                        );
                    }
                    Err(_) => return (false, format!("replica {replica}: {url} does not answer")),
                }
            }
        }
        (true, format!("{desired} replicas ready"))
    }

    pub async fn shutdown(&self) {
        let mut inner = self.shared.inner.lock().await;
        let replicas: Vec<u32> = inner.children.keys().copied().collect();
        for replica in replicas {
            if let Some(running) = inner.children.remove(&replica) {
                self.shared.stop(replica, running).await;
            }
        }
        self.shared.save_pids(&inner);
    }
}

impl Shared {
    fn vars(&self, replica: u32) -> Vec<(&'static str, String)> {
        let mut vars = vec![("replica", replica.to_string())];
        if let Some(base) = self.config.base_port {
            vars.push(("port", (u32::from(base) + replica).to_string()));
        }
        vars
    }

    /// Starts `replica`; with `after_restore`, with `first_start_env` too.
    fn spawn(&self, inner: &mut Inner, replica: u32, after_restore: bool) -> Result<()> {
        let vars = self.vars(replica);
        let from_file = match &self.env_file {
            Some(path) => read_env_file(path)
                .context("read control.process.env_file (fix the file: KEY=VALUE lines)")?,
            None => EnvVars::default(),
        };
        let first_start = if after_restore {
            &self.config.first_start_env
        } else {
            &EnvVars::default()
        };
        let log_path = self.log_dir.join(format!("replica-{replica}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut command = tokio::process::Command::new(&self.program);
        let frozen = self.frozen.load(std::sync::atomic::Ordering::SeqCst);
        let extra = if frozen {
            &self.config.frozen_args[..]
        } else {
            &[][..]
        };
        command
            .args(self.config.args.iter().map(|a| substitute(a, &vars)))
            .args(extra.iter().map(|a| substitute(a, &vars)))
            // The agent's environment, then the file, then `env`, then the first start's.
            .envs(from_file.iter())
            .envs(
                self.config
                    .env
                    .iter()
                    .chain(first_start.iter())
                    .map(|(k, v)| (k.clone(), substitute(v, &vars))),
            )
            .env("ROLLCALL_REPLICA", replica.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group, so stopping it reaches its children too.
            .process_group(0);
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        let child = command.spawn().with_context(|| {
            format!(
                "start {} (control.process.program); check the path and that it is executable",
                self.program.display()
            )
        })?;
        let pid = child.id().unwrap_or(0);
        if after_restore && !first_start.is_empty() {
            // Names only: values may be secrets.
            tracing::info!(
                replica,
                pid,
                first_start_env = %first_start.names(),
                "started replica after the restore, with first_start_env"
            );
        } else {
            tracing::info!(replica, pid, "started replica");
        }
        inner.children.insert(
            replica,
            Running {
                child,
                pid,
                since: Instant::now(),
            },
        );
        Ok(())
    }

    async fn stop(&self, replica: u32, mut running: Running) {
        let group = Pid::from_raw(running.pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        match tokio::time::timeout(self.config.stop_grace, running.child.wait()).await {
            Ok(_) => tracing::info!(replica, pid = running.pid, "replica stopped"),
            Err(_) => {
                tracing::warn!(
                    replica,
                    pid = running.pid,
                    "replica ignored SIGTERM for {}; killing it",
                    humantime::format_duration(self.config.stop_grace)
                );
                let _ = killpg(group, Signal::SIGKILL);
                let _ = running.child.wait().await;
            }
        }
        // Stragglers in the group (a child's own children) go too.
        let _ = killpg(group, Signal::SIGKILL);
    }

    /// Restarts replicas that died, with backoff for ones that keep dying.
    async fn watch(&self) {
        let mut inner = self.inner.lock().await;
        let desired = inner.desired;
        let mut changed = false;
        for replica in 0..desired {
            let exited = match inner.children.get_mut(&replica) {
                Some(running) => match running.child.try_wait() {
                    Ok(Some(status)) => Some((status.to_string(), running.since.elapsed())),
                    Ok(None) => None,
                    Err(e) => Some((format!("unknown status ({e})"), running.since.elapsed())),
                },
                None => Some(("not running".into(), HEALTHY_RUN)),
            };
            let Some((status, ran)) = exited else {
                continue;
            };
            if inner.children.remove(&replica).is_some() {
                changed = true;
                let (quick, _) = inner
                    .backoff
                    .get(&replica)
                    .copied()
                    .unwrap_or((0, Instant::now()));
                let quick = if ran < HEALTHY_RUN { quick + 1 } else { 0 };
                let delay = if quick == 0 {
                    Duration::ZERO
                } else {
                    (Duration::from_millis(500) * 2u32.saturating_pow(quick.min(10) - 1))
                        .min(MAX_RESTART_DELAY)
                };
                tracing::warn!(
                    replica,
                    %status,
                    "replica exited; restarting in {}",
                    humantime::format_duration(delay)
                );
                inner
                    .backoff
                    .insert(replica, (quick, Instant::now() + delay));
            }
            let due = inner
                .backoff
                .get(&replica)
                .is_none_or(|(_, at)| Instant::now() >= *at);
            if due && inner.started {
                inner.restarts += 1;
                if let Err(e) = self.spawn(&mut inner, replica, false) {
                    tracing::error!("cannot restart replica {replica}: {e:#}");
                    let quick = inner.backoff.get(&replica).map_or(1, |(q, _)| q + 1);
                    inner
                        .backoff
                        .insert(replica, (quick, Instant::now() + MAX_RESTART_DELAY));
                } else {
                    changed = true;
                }
            }
        }
        if changed {
            self.save_pids(&inner);
        }
    }

    fn save_pids(&self, inner: &Inner) {
        let file = PidFile {
            program: self.program.display().to_string(),
            pids: inner.children.values().map(|r| r.pid).collect(),
        };
        let result = serde_json::to_vec(&file)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| {
                crate::state::write_atomic(&self.pid_file, &bytes, false).map_err(Into::into)
            });
        if let Err(e) = result {
            tracing::warn!(
                "cannot record children in {}: {e:#}",
                self.pid_file.display()
            );
        }
    }

    /// Stops children an earlier agent left behind, if those pids still run our program.
    async fn stop_leftovers(&self) {
        let Ok(bytes) = std::fs::read(&self.pid_file) else {
            return;
        };
        let Ok(file) = serde_json::from_slice::<PidFile>(&bytes) else {
            tracing::warn!("ignoring unreadable {}", self.pid_file.display());
            return;
        };
        let name = Path::new(&file.program).file_name().map(|n| n.to_owned());
        for pid in file.pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let arg0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let arg0 = Path::new(std::str::from_utf8(arg0).unwrap_or_default());
            if name.is_none() || arg0.file_name() != name.as_deref() {
                continue;
            }
            tracing::warn!(pid, "stopping a replica left over from an earlier agent");
            let group = Pid::from_raw(pid as i32);
            let _ = killpg(group, Signal::SIGTERM);
            let until = Instant::now().checked_add(self.config.stop_grace);
            while Path::new(&format!("/proc/{pid}")).exists()
                && until.is_none_or(|until| Instant::now() < until)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(script: &str) -> ProcessConfig {
        ProcessConfig {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: None,
            env: EnvVars::default(),
            env_file: None,
            first_start_env: EnvVars::default(),
            replicas: 2,
            base_port: None,
            health_url: None,
            stop_grace: Duration::from_millis(300),
            start_timeout: Duration::from_secs(5),
            log_dir: None,
            frozen_args: Vec::new(),
        }
    }

    fn alive(pid: u32) -> bool {
        // A zombie still has a /proc entry; check its state.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scales_restarts_crashed_children_and_stops_stubborn_ones() {
        let dir = tempfile::tempdir().unwrap();
        // Ignores SIGTERM: stopping it needs the SIGKILL after the grace period.
        let sup = Supervisor::new(
            Path::new("agent.toml"),
            &config("trap '' TERM; while true; do sleep 0.05; done"),
            dir.path(),
        )
        .unwrap();
        let cancel = CancellationToken::new();
        sup.start(2, cancel.clone()).await.unwrap();
        assert_eq!(sup.readiness().await, (true, "2 replicas ready".into()));
        let pids: Vec<u32> = sup
            .shared
            .inner
            .lock()
            .await
            .children
            .values()
            .map(|r| r.pid)
            .collect();
        assert_eq!(pids.len(), 2);

        // A crashed replica comes back.
        nix::sys::signal::kill(Pid::from_raw(pids[1] as i32), Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let inner = sup.shared.inner.lock().await;
            if inner.restarts >= 1 && inner.children.len() == 2 {
                break;
            }
            drop(inner);
            assert!(Instant::now() < deadline, "replica was not restarted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        sup.scale(0, false).await.unwrap();
        assert_eq!(sup.readiness().await, (false, "scaled to 0".into()));
        assert!(!alive(pids[0]), "SIGKILL after the grace period stopped it");
        cancel.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_agent_stops_the_children_it_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("while true; do sleep 0.05; done");
        let first = Supervisor::new(Path::new("agent.toml"), &cfg, dir.path()).unwrap();
        let cancel = CancellationToken::new();
        first.start(1, cancel.clone()).await.unwrap();
        let old: Vec<u32> = first
            .shared
            .inner
            .lock()
            .await
            .children
            .values()
            .map(|r| r.pid)
            .collect();
        // The agent "dies" without stopping its children.
        cancel.cancel();
        std::mem::forget(first);

        let second = Supervisor::new(Path::new("agent.toml"), &cfg, dir.path()).unwrap();
        let cancel = CancellationToken::new();
        second.start(1, cancel.clone()).await.unwrap();
        assert!(!alive(old[0]), "the leftover child was stopped");
        let new: Vec<u32> = second
            .shared
            .inner
            .lock()
            .await
            .children
            .values()
            .map(|r| r.pid)
            .collect();
        assert_ne!(new, old);
        second.shutdown().await;
        assert!(!alive(new[0]));
        cancel.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durations_past_what_the_clock_holds_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config("while true; do sleep 0.05; done");
        cfg.start_timeout = Duration::MAX;
        cfg.stop_grace = Duration::MAX;
        let sup = Supervisor::new(Path::new("agent.toml"), &cfg, dir.path()).unwrap();
        let cancel = CancellationToken::new();
        sup.start(1, cancel.clone()).await.unwrap();
        sup.scale(2, false).await.unwrap();
        assert_eq!(sup.readiness().await, (true, "2 replicas ready".into()));
        sup.scale(0, false).await.unwrap();
        assert_eq!(sup.readiness().await, (false, "scaled to 0".into()));
        cancel.cancel();
    }

    #[test]
    fn a_missing_cwd_and_a_malformed_env_file_stop_the_agent_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        let mut cfg = config("true");
        cfg.cwd = Some("srv/web".into());
        let err = Supervisor::new(&file, &cfg, dir.path()).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: control.process.cwd = srv/web: {} is not a directory; create the directory \
                 or fix the path (a relative cwd is resolved against this file's directory)",
                file.display(),
                dir.path().join("srv/web").display()
            )
        );
        std::fs::create_dir_all(dir.path().join("srv/web")).unwrap();
        assert!(Supervisor::new(&file, &cfg, dir.path()).is_ok());

        cfg.env_file = Some("web.env".into());
        std::fs::write(
            dir.path().join("web.env"),
            "# secrets\nAPI_KEY=abc\nsk-live-0123456789\n",
        )
        .unwrap();
        let err = Supervisor::new(&file, &cfg, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{}: control.process.env_file = web.env: {}: line 3: not KEY=VALUE (no `=`); \
                 write one KEY=VALUE per line",
                file.display(),
                dir.path().join("web.env").display()
            )),
            "{err}"
        );
        assert!(!err.contains("sk-live"), "the line is not quoted: {err}");
        std::fs::remove_file(dir.path().join("web.env")).unwrap();
        let err = Supervisor::new(&file, &cfg, dir.path()).err().unwrap();
        assert!(
            err.to_string().contains("cannot read"),
            "a missing file is named too: {err}"
        );

        cfg.env_file = None;
        cfg.env = EnvVars(BTreeMap::from([("RUN-MIGRATIONS".into(), "false".into())]));
        let err = Supervisor::new(&file, &cfg, dir.path()).err().unwrap();
        assert!(
            err.to_string()
                .contains("control.process.env: \"RUN-MIGRATIONS\" is not a variable name"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config("true");
        cfg.program = "/nonexistent/cowork-sim".into();
        let sup = Supervisor::new(Path::new("agent.toml"), &cfg, dir.path()).unwrap();
        let err = sup.start(1, CancellationToken::new()).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("start /nonexistent/cowork-sim (control.process.program)"),
            "{err:#}"
        );
    }
}
