//! Scheduled runs: each environment's `backup_schedule` starts a backup run when it comes due,
//! and each restore-test environment's `drill_schedule` starts a restore test (a drill of the
//! environment, restoring its source's `latest` point or a random one of `random-within`).
//! Both are cron expressions (5 fields: minute hour day-of-month month day-of-week, UTC; or 6
//! fields with seconds first). A slot whose run cannot start because another run of the
//! environment is in the way is skipped and logged, never queued.

use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::PointPick;
use crate::cron::BackupSchedule;
use crate::engine::{Engine, RunConflict, StartRun};
use crate::link::AgentLink;
use crate::store::RunKind;

/// What a schedule starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheduled {
    Backup,
    RestoreTest(PointPick),
}

impl Scheduled {
    fn what(self) -> &'static str {
        match self {
            Scheduled::Backup => "backup",
            Scheduled::RestoreTest(_) => "restore test",
        }
    }
}

/// Runs every environment's schedules until `cancel`.
pub async fn run<L: AgentLink + Clone + 'static>(engine: Engine<L>, cancel: CancellationToken) {
    let mut tasks = Vec::new();
    for (name, env) in engine.environments().clone() {
        let restore_test = env
            .restore_test
            .as_ref()
            .and_then(|t| Some((t.schedule.clone()?, Scheduled::RestoreTest(t.pick))));
        let backup = env
            .backup_schedule
            .clone()
            .map(|expression| (expression, Scheduled::Backup));
        for (expression, scheduled) in backup.into_iter().chain(restore_test) {
            let schedule = match BackupSchedule::parse(&expression) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(environment = %name, "{e:#}");
                    continue;
                }
            };
            let (engine, cancel, name) = (engine.clone(), cancel.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                let what = scheduled.what();
                loop {
                    let Some(at) = schedule.next() else { return };
                    let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tracing::info!(environment = %name, next = %at, "next scheduled {what}");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    if let Err(e) = start(&engine, &name, scheduled).await {
                        tracing::error!(environment = %name, "scheduled {what} not started: {e:#}");
                    }
                }
            }));
        }
    }
    cancel.cancelled().await;
    for t in tasks {
        t.abort();
    }
}

/// Starts a scheduled run, or skips this slot (saying why) while another run of the
/// environment is in the way (the same conflict rules as a run an operator starts).
async fn start<L: AgentLink + Clone + 'static>(
    engine: &Engine<L>,
    env: &str,
    scheduled: Scheduled,
) -> Result<()> {
    let (kind, point_id) = match scheduled {
        Scheduled::Backup => (RunKind::Backup, None),
        Scheduled::RestoreTest(PointPick::Latest) => (RunKind::Drill, Some("latest".to_owned())),
        Scheduled::RestoreTest(PointPick::RandomWithin(window)) => {
            let point = engine
                .random_point(env, window, Utc::now(), |n| rand::random_range(0..n))
                .await?;
            (RunKind::Drill, Some(point))
        }
    };
    let what = scheduled.what();
    let started = engine
        .start_run(StartRun {
            environment: env.to_owned(),
            kind,
            point_id,
            plan: None,
            excluded: Vec::new(),
            to_time: None,
        })
        .await;
    match started {
        Ok(run) => {
            tracing::info!(environment = %env, run_id = %run.id, point = ?run.point_id, "scheduled {what} started");
            Ok(())
        }
        Err(e) if e.downcast_ref::<RunConflict>().is_some() => {
            tracing::warn!(environment = %env, "skipping this scheduled {what}: {e:#}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
