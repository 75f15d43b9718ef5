//! Scheduled backups: each environment's `backup_schedule` (a 5-field cron expression: minute
//! hour day-of-month month day-of-week, UTC; or 6 fields with seconds first) starts a backup
//! run when it comes due, unless a backup of that environment is still running.

use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::cron::BackupSchedule;
use crate::engine::{Engine, RunConflict, StartRun};
use crate::link::AgentLink;
use crate::store::RunKind;

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
            excluded: Vec::new(),
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
