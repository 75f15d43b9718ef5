//! The `exec` adapter: operator-supplied commands (systemd, kubectl, a cloud CLI) for freeze,
//! unfreeze, scale, restart and status. Each runs with a timeout; its output is captured and
//! its tail reported.
//!
//! A scale that brings the role back after a restore (see `control`) runs its command with
//! `ROLLCALL_AFTER_RESTORE=true` and `first_start_env` in its environment, so the operator's
//! command can start the role with, say, migrations off (`kubectl set env …` first); other
//! scales see `ROLLCALL_AFTER_RESTORE=false`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::config::ConfigError;
use serde::Deserialize;

use super::substitute;

/// `[control.exec]`: each command is an argv list; `{replicas}` is substituted in `scale`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    pub freeze: Option<Vec<String>>,
    pub unfreeze: Option<Vec<String>>,
    /// Sets the replica count; `{replicas}` is the target.
    pub scale: Option<Vec<String>>,
    /// Prints the current replica count as the last line of its output.
    pub status: Option<Vec<String>>,
    pub restart: Option<Vec<String>>,
    /// Environment of the `scale` command when it brings the role back after a restore.
    #[serde(default)]
    pub first_start_env: BTreeMap<String, String>,
    #[serde(with = "humantime_serde", default = "super::default_timeout")]
    pub timeout: Duration,
}

pub struct Exec {
    config: ExecConfig,
}

/// The most output kept from a command, from its end.
const OUTPUT_TAIL: usize = 2048;

impl Exec {
    pub fn new(file: &Path, config: &ExecConfig) -> Result<Exec> {
        for (key, argv) in [
            ("freeze", &config.freeze),
            ("unfreeze", &config.unfreeze),
            ("scale", &config.scale),
            ("status", &config.status),
            ("restart", &config.restart),
        ] {
            if argv
                .as_ref()
                .is_some_and(|a| a.is_empty() || a[0].is_empty())
            {
                bail!(ConfigError::new(
                    file,
                    format!("control.exec.{key} is an empty command"),
                    "give the program and its arguments, e.g. [\"systemctl\", \"stop\", \"web\"]"
                ));
            }
        }
        if config.scale.is_some() && config.status.is_none() {
            bail!(ConfigError::new(
                file,
                "control.exec has `scale` but no `status`",
                "add a status command that prints the current replica count (scale must know \
                 the count before it changes it, to restore it later)"
            ));
        }
        if config.timeout.is_zero() {
            bail!(ConfigError::new(
                file,
                "control.exec.timeout must be positive",
                "e.g. timeout = \"60s\""
            ));
        }
        Ok(Exec {
            config: config.clone(),
        })
    }

    pub async fn freeze(&self, on: bool) -> Result<String> {
        let (key, argv) = if on {
            ("freeze", &self.config.freeze)
        } else {
            ("unfreeze", &self.config.unfreeze)
        };
        let argv = argv
            .as_ref()
            .with_context(|| format!("control.exec.{key} is not configured"))?;
        self.run(key, argv, &[]).await
    }

    /// Sets the replica count; `after_restore`: this scale brings the role back after a
    /// restore (its command gets `first_start_env`).
    pub async fn scale(&self, replicas: u32, after_restore: bool) -> Result<()> {
        let argv = self
            .config
            .scale
            .as_ref()
            .context("control.exec.scale is not configured")?;
        let mut env: Vec<(&str, &str)> = vec![(
            "ROLLCALL_AFTER_RESTORE",
            if after_restore { "true" } else { "false" },
        )];
        if after_restore {
            env.extend(
                self.config
                    .first_start_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
        }
        self.run_with_env("scale", argv, &[("replicas", replicas.to_string())], &env)
            .await?;
        Ok(())
    }

    pub async fn restart(&self) -> Result<String> {
        let argv = self
            .config
            .restart
            .as_ref()
            .context("control.exec.restart is not configured; add a restart command")?;
        self.run("restart", argv, &[]).await
    }

    pub async fn status(&self) -> Result<u32> {
        let argv = self
            .config
            .status
            .as_ref()
            .context("control.exec.status is not configured")?;
        let out = self.run("status", argv, &[]).await?;
        let last = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        last.trim().parse().with_context(|| {
            format!(
                "control.exec.status printed {last:?} as its last line; it must print the \
                 replica count (a whole number)"
            )
        })
    }

    async fn run(&self, key: &str, argv: &[String], vars: &[(&str, String)]) -> Result<String> {
        self.run_with_env(key, argv, vars, &[]).await
    }

    async fn run_with_env(
        &self,
        key: &str,
        argv: &[String],
        vars: &[(&str, String)],
        env: &[(&str, &str)],
    ) -> Result<String> {
        let argv: Vec<String> = argv.iter().map(|a| substitute(a, vars)).collect();
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("control.exec.{key}: cannot start {:?}", argv[0]))?;
        let output = match tokio::time::timeout(self.config.timeout, child.wait_with_output()).await
        {
            Ok(output) => output.with_context(|| format!("control.exec.{key}: wait for it"))?,
            Err(_) => bail!(
                "control.exec.{key} ({}) did not finish within {}; it was killed",
                argv.join(" "),
                humantime::format_duration(self.config.timeout)
            ),
        };
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!(
                "control.exec.{key} ({}) failed with {}: {}",
                argv.join(" "),
                output.status,
                api::redact::redact(tail(stderr.trim()))
            );
        }
        if !stderr.trim().is_empty() {
            text.push_str(&stderr);
        }
        Ok(api::redact::redact(tail(&text)).into_owned())
    }
}

fn tail(s: &str) -> &str {
    if s.len() <= OUTPUT_TAIL {
        return s;
    }
    let mut start = s.len() - OUTPUT_TAIL;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn commands_run_with_placeholders_and_fail_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("replicas");
        std::fs::write(&count, "2\n").unwrap();
        let config = ExecConfig {
            freeze: Some(sh("echo frozen")),
            unfreeze: Some(sh("echo oops >&2; exit 3")),
            scale: Some(sh(&format!("echo {{replicas}} > {}", count.display()))),
            status: Some(sh(&format!("echo checking; cat {}", count.display()))),
            restart: None,
            first_start_env: BTreeMap::new(),
            timeout: Duration::from_millis(500),
        };
        let exec = Exec::new(Path::new("agent.toml"), &config).unwrap();
        assert_eq!(exec.status().await.unwrap(), 2);
        exec.scale(0, false).await.unwrap();
        assert_eq!(exec.status().await.unwrap(), 0);
        assert_eq!(exec.freeze(true).await.unwrap().trim(), "frozen");
        let err = exec.freeze(false).await.unwrap_err().to_string();
        assert!(
            err.contains("control.exec.unfreeze") && err.contains("oops"),
            "{err}"
        );
        let err = exec.restart().await.unwrap_err().to_string();
        assert!(err.contains("restart is not configured"), "{err}");

        let slow = Exec::new(
            Path::new("agent.toml"),
            &ExecConfig {
                freeze: Some(sh("sleep 5")),
                ..config
            },
        )
        .unwrap();
        let err = slow.freeze(true).await.unwrap_err().to_string();
        assert!(err.contains("did not finish within 500ms"), "{err}");
    }

    #[tokio::test]
    async fn a_scale_after_a_restore_runs_with_first_start_env() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let config = ExecConfig {
            freeze: None,
            unfreeze: None,
            scale: Some(sh(&format!(
                "echo \"{{replicas}} $ROLLCALL_AFTER_RESTORE ${{RUN_MIGRATIONS:-unset}}\" >> {}",
                seen.display()
            ))),
            status: Some(sh("echo 1")),
            restart: None,
            first_start_env: BTreeMap::from([("RUN_MIGRATIONS".into(), "false".into())]),
            timeout: Duration::from_secs(5),
        };
        let exec = Exec::new(Path::new("agent.toml"), &config).unwrap();
        exec.scale(0, false).await.unwrap();
        exec.scale(2, true).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&seen).unwrap(),
            "0 false unset\n2 true false\n"
        );
    }
}
