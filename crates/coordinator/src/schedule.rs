//! Scheduled runs: each environment's `backup_schedule` starts a backup run when it comes due,
//! its `base_backup_schedule` a base-backup run (a backup run of the built-in base-backup
//! plan: the database agent's physical base backup), and each restore-test environment's `drill_schedule` starts a restore test (a drill of the
//! environment, restoring its source's `latest` point or a random one of `random-within`).
//! Both are cron expressions (5 fields: minute hour day-of-month month day-of-week, UTC; or 6
//! fields with seconds first). A slot whose run cannot start because another run of the
//! environment is in the way is skipped and logged, never queued. A restore-test slot that
//! finds no point to restore (none yet, or none within `random-within`) is journaled as a
//! failed run: the backups it proves are missing, and that must show like any failure.

use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::PointPick;
use crate::cron::BackupSchedule;
use crate::engine::{Engine, NoPoint, RunConflict, StartRun};
use crate::link::AgentLink;
use crate::store::RunKind;

/// What a schedule starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheduled {
    Backup,
    BaseBackup,
    RestoreTest(PointPick),
}

impl Scheduled {
    fn what(self) -> &'static str {
        match self {
            Scheduled::Backup => "backup",
            Scheduled::BaseBackup => "base backup",
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
        let base_backup = env
            .base_backup_schedule
            .clone()
            .map(|expression| (expression, Scheduled::BaseBackup));
        for (expression, scheduled) in backup.into_iter().chain(base_backup).chain(restore_test) {
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
    let request = |kind, point_id| StartRun {
        environment: env.to_owned(),
        kind,
        point_id,
        plan: None,
        excluded: Vec::new(),
        to_time: None,
        base_backup: scheduled == Scheduled::BaseBackup,
    };
    let what = scheduled.what();
    let (kind, point_id) = match scheduled {
        Scheduled::Backup | Scheduled::BaseBackup => (RunKind::Backup, None),
        Scheduled::RestoreTest(PointPick::Latest) => (RunKind::Drill, Some("latest".to_owned())),
        Scheduled::RestoreTest(PointPick::RandomWithin(window)) => {
            match engine
                .random_point(env, window, Utc::now(), |n| rand::random_range(0..n))
                .await
            {
                Ok(point) => (RunKind::Drill, Some(point)),
                Err(e) => return no_point(engine, env, request(RunKind::Drill, None), e).await,
            }
        }
    };
    let started = engine.start_run(request(kind, point_id)).await;
    match started {
        Err(e) if e.downcast_ref::<NoPoint>().is_some() => {
            no_point(engine, env, request(kind, None), e).await
        }
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

/// A scheduled restore test with no point to restore (none at all, or none within
/// `random-within`): the backups it exists to prove are missing, so it is a failed restore
/// test — journaled as a failed run (`Engine::fail_unstarted`), which the run list, the
/// `run.failed` webhook and the last-result metrics show — not a log line. Other errors pass.
async fn no_point<L: AgentLink + Clone + 'static>(
    engine: &Engine<L>,
    env: &str,
    request: StartRun,
    e: anyhow::Error,
) -> Result<()> {
    let Some(NoPoint(why)) = e.downcast_ref::<NoPoint>() else {
        return Err(e);
    };
    let reason = format!("scheduled restore test found no point to restore: {why}");
    match engine.fail_unstarted(request, &reason).await {
        Ok(run) => {
            tracing::warn!(environment = %env, run_id = %run.id, "{reason}");
            Ok(())
        }
        Err(e) if e.downcast_ref::<RunConflict>().is_some() => {
            tracing::warn!(environment = %env, "skipping this scheduled restore test: {e:#}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
