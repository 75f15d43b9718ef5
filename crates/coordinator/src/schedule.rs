//! Scheduled backups: each environment's `backup_schedule` (a 5-field cron expression: minute
//! hour day-of-month month day-of-week, UTC; or 6 fields with seconds first) starts a backup
//! run when it comes due, unless a backup of that environment is still running.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, RunConflict, StartRun};
use crate::link::AgentLink;
use crate::store::RunKind;

/// A parsed backup schedule.
#[derive(Debug, Clone)]
pub struct BackupSchedule {
    expression: String,
    schedule: cron::Schedule,
}

impl BackupSchedule {
    /// Parses a 5-field cron expression ("0 3 * * *": daily at 03:00 UTC), or 6 fields with
    /// seconds first ("*/30 * * * * *": every 30 seconds).
    pub fn parse(expression: &str) -> Result<BackupSchedule> {
        let fields = expression.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {expression}"),
            6 => expression.to_owned(),
            _ => anyhow::bail!(
                "backup_schedule {expression:?} has {fields} fields; write 5: minute hour \
                 day-of-month month day-of-week, e.g. \"0 3 * * *\" (or 6, seconds first)"
            ),
        };
        let schedule = cron::Schedule::from_str(&full).with_context(|| {
            format!(
                "backup_schedule {expression:?} is not a cron expression (minute hour \
                 day-of-month month day-of-week, e.g. \"0 3 * * *\")"
            )
        })?;
        Ok(BackupSchedule {
            expression: expression.to_owned(),
            schedule,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The next time after now.
    pub fn next(&self) -> Option<chrono::DateTime<Utc>> {
        self.schedule.after(&Utc::now()).next()
    }
}

/// Runs every environment's schedule until `cancel`.
pub async fn run<L: AgentLink + Clone + 'static>(engine: Engine<L>, cancel: CancellationToken) {
    let mut tasks = Vec::new();
    for (name, env) in engine.environments().clone() {
        let Some(expression) = env.backup_schedule.clone() else {
            continue;
        };
        let schedule = match BackupSchedule::parse(&expression) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(environment = %name, "{e:#}");
                continue;
            }
        };
        let (engine, cancel) = (engine.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(at) = schedule.next() else { return };
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tracing::info!(environment = %name, next = %at, "next scheduled backup");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = start_backup(&engine, &name).await {
                    tracing::error!(environment = %name, "scheduled backup not started: {e:#}");
                }
            }
        }));
    }
    cancel.cancelled().await;
    for t in tasks {
        t.abort();
    }
}

/// Starts a scheduled backup, or skips this one (saying why) while another run of the
/// environment is in the way: a running backup, or a drill or recovery.
async fn start_backup<L: AgentLink + Clone + 'static>(engine: &Engine<L>, env: &str) -> Result<()> {
    let started = engine
        .start_run(StartRun {
            environment: env.to_owned(),
            kind: RunKind::Backup,
            point_id: None,
            plan: None,
        })
        .await;
    match started {
        Ok(run) => {
            tracing::info!(environment = %env, run_id = %run.id, point = ?run.point_id, "scheduled backup started");
            Ok(())
        }
        Err(e) if e.downcast_ref::<RunConflict>().is_some() => {
            tracing::warn!(environment = %env, "skipping this scheduled backup: {e:#}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn five_field_expressions_parse_and_others_say_what_to_write() {
        let s = BackupSchedule::parse("0 3 * * *").unwrap();
        let next = s.next().unwrap();
        assert_eq!(next.format("%H:%M:%S").to_string(), "03:00:00");
        let every = BackupSchedule::parse("*/20 * * * * *").unwrap();
        let next = every.next().unwrap();
        assert!(next - Utc::now() <= chrono::Duration::seconds(20), "{next}");
        assert_eq!(next.timestamp() % 20, 0);
        let err = BackupSchedule::parse("0 0 3 * * * 2030")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has 7 fields; write 5"), "{err}");
        let err = BackupSchedule::parse("61 3 * * *").unwrap_err().to_string();
        assert!(err.contains("is not a cron expression"), "{err}");
    }
}
