//! What the operator API reads through the engine: runs and their journal, a run's events as
//! they are journaled, and each environment's recovery points with their age against its RPO.
//! The gRPC adapter only converts these and maps errors; the decisions (how many runs a
//! listing holds, when a watch ends, when a point is stale) are made here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::Stream;

use super::Engine;
use crate::link::AgentLink;
use crate::store::{self, CommandRecord, EventRecord, PhaseRecord, ResultRecord, RunRecord, Store};

/// Runs a listing holds when the caller names no limit, and the most it ever holds.
const RUNS_LISTED: u32 = 50;
const MOST_RUNS_LISTED: u32 = 1000;
/// How often a watch looks for new journal events.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Events read from the journal at a time by a watch.
const WATCH_BATCH: u32 = 500;

/// A run with its phases and commands as the journal holds them.
#[derive(Debug, Clone)]
pub struct RunDetail {
    pub run: RunRecord,
    pub phases: Vec<PhaseRecord>,
    pub commands: Vec<(CommandRecord, Option<ResultRecord>)>,
}

/// The recovery points of one or every environment.
#[derive(Debug, Clone, Default)]
pub struct PointsListing {
    /// In commit order, oldest first, within each environment.
    pub points: Vec<PointStatus>,
    /// Point files that could not be read as a point: `key: reason`.
    pub damaged: Vec<String>,
    /// Environments with base backups: the times a point-in-time recovery reaches.
    pub windows: Vec<(String, repository::RecoveryWindow)>,
    /// Environments restored to a time by their managed provider (`pitr = "provider"`): the
    /// window is the provider's, reported by the database agent's adapter.
    pub provider_windows: Vec<String>,
}

/// A recovery point and how it stands against its environment's RPO.
#[derive(Debug, Clone)]
pub struct PointStatus {
    pub point: repository::Point,
    /// Whole seconds since the point was taken (zero for a point from the future).
    pub age: Duration,
    /// How far the point's stamp is ahead of this machine's clock, when that is more than
    /// [`repository::CLOCK_TOLERANCE`]: a clock ran fast when it was taken, so its age is
    /// unknown.
    pub stamped_ahead: Option<Duration>,
    pub rpo: Duration,
    /// Not shown to be within the RPO: older than it (restoring it would lose more than the
    /// environment allows), or stamped in the future, whose age cannot be told. So a fast
    /// clock never hides a missed RPO behind an age of zero.
    pub stale: bool,
}

impl PointStatus {
    pub fn at(point: repository::Point, rpo: Duration, now: DateTime<Utc>) -> PointStatus {
        let age = Duration::from_secs((now - point.created_at).num_seconds().max(0) as u64);
        let stamped_ahead = point.stamped_ahead(now);
        PointStatus {
            stale: age > rpo || stamped_ahead.is_some(),
            point,
            age,
            stamped_ahead,
            rpo,
        }
    }
}

/// Why points could not be listed; the adapter answers `NotFound` or `Unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    #[error("no environment {wanted:?} in the coordinator config (configured: {configured})")]
    UnknownEnvironment { wanted: String, configured: String },
    #[error("{0:#}")]
    Repository(anyhow::Error),
}

impl<L: AgentLink + Clone + 'static> Engine<L> {
    /// The newest runs, at most `limit` (0: the default; capped at the most a listing holds).
    pub async fn list_runs(&self, limit: u32) -> Result<Vec<RunRecord>, store::Error> {
        let limit = match limit {
            0 => RUNS_LISTED,
            n => n.min(MOST_RUNS_LISTED),
        };
        self.store().list_runs(limit).await
    }

    /// A run with its phases and commands; an unknown id is an error that names it.
    pub async fn run_detail(&self, id: &str) -> Result<RunDetail> {
        let store = self.store();
        let run = existing_run(store.as_ref(), id).await?;
        Ok(RunDetail {
            run,
            phases: store.phases(id).await?,
            commands: store.commands(id).await?,
        })
    }

    /// The run's events after `after_seq`, then each new one as it is journaled. The stream
    /// ends once the run waits for nobody but an operator (finished or blocked), and after
    /// the first error reading the journal.
    pub async fn watch_run(
        &self,
        id: &str,
        after_seq: i64,
    ) -> Result<impl Stream<Item = Result<EventRecord>> + Send + 'static> {
        let store = self.store().clone();
        existing_run(store.as_ref(), id).await?;
        let watch = Watch {
            store,
            run_id: id.to_owned(),
            after: after_seq,
            pending: VecDeque::new(),
            ended: false,
        };
        Ok(futures::stream::unfold(watch, Watch::next))
    }

    /// The recovery points of `environment` (every environment when `None`), each with its
    /// age against the environment's RPO.
    pub async fn list_points(
        &self,
        environment: Option<&str>,
    ) -> Result<PointsListing, PointsError> {
        let envs = self.environments();
        if let Some(wanted) = environment
            && !envs.contains_key(wanted)
        {
            return Err(PointsError::UnknownEnvironment {
                wanted: wanted.to_owned(),
                configured: envs.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let now = Utc::now();
        let mut out = PointsListing::default();
        for (name, env) in envs
            .iter()
            .filter(|(n, _)| environment.is_none_or(|w| w == n.as_str()))
        {
            let repo = env
                .repository_ref
                .open()
                .await
                .map_err(PointsError::Repository)?;
            let listing = repo
                .list_points(Some(name))
                .await
                .map_err(PointsError::Repository)?;
            out.points.extend(
                listing
                    .points
                    .into_iter()
                    .map(|p| PointStatus::at(p, env.rpo, now)),
            );
            out.damaged.extend(
                listing
                    .damaged
                    .into_iter()
                    .map(|d| format!("{}: {}", d.key, d.reason)),
            );
            if env.pitr == crate::config::Pitr::Provider {
                out.provider_windows.push(name.clone());
                continue;
            }
            let mut bases = repository::list_base_backups(&repo)
                .await
                .map_err(PointsError::Repository)?;
            bases.retain(|b| b.env.as_deref() == Some(name.as_str()));
            if let Some(window) = repository::recovery_window(&repo, &bases)
                .await
                .map_err(PointsError::Repository)?
            {
                out.windows.push((name.clone(), window));
            }
        }
        Ok(out)
    }
}

async fn existing_run(store: &dyn Store, id: &str) -> Result<RunRecord> {
    store
        .run(id)
        .await?
        .with_context(|| format!("no run {id}; `rollcall runs` lists them"))
}

/// Where a watch stands: events read but not yet handed out, and the last one handed out.
struct Watch {
    store: Arc<dyn Store>,
    run_id: String,
    after: i64,
    pending: VecDeque<EventRecord>,
    ended: bool,
}

impl Watch {
    async fn next(mut self) -> Option<(Result<EventRecord>, Watch)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.after = event.seq;
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            match self
                .store
                .events(&self.run_id, self.after, WATCH_BATCH)
                .await
            {
                Err(e) => {
                    self.ended = true;
                    return Some((Err(e.into()), self));
                }
                Ok(events) if !events.is_empty() => self.pending.extend(events),
                // Drained: the watch ends once the run waits for nobody but an operator.
                Ok(_) => match self.store.run(&self.run_id).await {
                    Ok(Some(run))
                        if run.state.is_final() || run.state == store::RunState::Blocked =>
                    {
                        return None;
                    }
                    Ok(_) => tokio::time::sleep(WATCH_POLL).await,
                    Err(_) => return None,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(created_at: DateTime<Utc>) -> repository::Point {
        repository::Point {
            id: repository::PointId::new("prod", created_at).expect("id"),
            environment: "prod".into(),
            created_at,
            sequence: Some(1),
            postgres: None,
            objects: None,
            secrets: Vec::new(),
            tool_versions: Default::default(),
        }
    }

    #[test]
    fn a_point_older_than_the_rpo_is_stale() {
        let now = Utc::now();
        let hour = Duration::from_secs(3600);
        let fresh = PointStatus::at(point(now - chrono::Duration::minutes(59)), hour, now);
        assert_eq!(fresh.age, Duration::from_secs(59 * 60));
        assert!(!fresh.stale);
        let exactly = PointStatus::at(point(now - chrono::Duration::hours(1)), hour, now);
        assert!(
            !exactly.stale,
            "an RPO is met up to and including its length"
        );
        let old = PointStatus::at(point(now - chrono::Duration::minutes(61)), hour, now);
        assert!(old.stale);
        let future = PointStatus::at(point(now + chrono::Duration::minutes(5)), hour, now);
        assert_eq!(
            future.age,
            Duration::ZERO,
            "clock skew never makes an age negative"
        );
    }

    #[test]
    fn a_point_stamped_in_the_future_is_flagged_and_never_counts_as_fresh() {
        let now = Utc::now();
        let hour = Duration::from_secs(3600);
        let ahead = PointStatus::at(point(now + chrono::Duration::minutes(10)), hour, now);
        assert_eq!(ahead.stamped_ahead, Some(Duration::from_secs(600)));
        assert!(ahead.stale, "a future stamp proves nothing about the RPO");
        // Within the tolerance clocks may disagree by: an ordinary fresh point.
        let near = PointStatus::at(point(now + chrono::Duration::seconds(30)), hour, now);
        assert_eq!(near.stamped_ahead, None);
        assert!(!near.stale);
    }
}
