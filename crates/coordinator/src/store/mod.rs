//! The coordinator's state store: the epoch counter and the run journal (runs, phases,
//! commands, results, events).
//!
//! One port, [`Store`], with two adapters over sqlx: SQLite (one file, the embedded default)
//! and Postgres (a separate instance, never the one being restored; for several coordinators).
//! Both run the same SQL (see `sql.rs`) and the same conformance suite
//! (`tests/store_conformance.rs`). Times are stored as unix milliseconds and JSON documents as
//! text, so the two schemas differ only where the dialects must.

mod sql;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use api::model::{ActionKind, ActionOutput, Epoch, Outcome};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use repository::redact_url;

pub use sql::{PostgresStore, SqliteStore};

/// Errors a caller branches on. Everything else is `Backend`, already carrying context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The write contradicts what the journal already holds (a command id reused for a different
    /// command, a run id taken, a finished run changed).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// A newer coordinator has taken an epoch: the writer's journal writes are refused from
    /// then on, as agents refuse its commands.
    #[error(
        "coordinator epoch {writer} is fenced: a newer coordinator took epoch {newest} on the \
         same state store, and this one no longer writes to the journal"
    )]
    Fenced { writer: Epoch, newest: Epoch },
    #[error(transparent)]
    Backend(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a run does: restore in a drill or for real, take a backup, or take a restore back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunKind {
    Drill,
    Recovery,
    Backup,
    /// Puts back what a drill or recovery replaced (`rollcall run undo RUN`).
    Undo,
}

/// Where a run stands. `Blocked` waits for an operator (`retry`, `resume`, `abort`); the last
/// three are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    Pending,
    Running,
    Blocked,
    Succeeded,
    Failed,
    Aborted,
}

impl RunState {
    pub const FINAL: [RunState; 3] = [RunState::Succeeded, RunState::Failed, RunState::Aborted];

    pub fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseState {
    Pending,
    Running,
    Passed,
    Failed,
    Skipped,
    Blocked,
}

/// Text forms stored in the journal; parsing rejects anything else, so a journal written by a
/// newer coordinator fails loudly instead of being misread.
macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = anyhow::Error;

            fn from_str(s: &str) -> anyhow::Result<Self> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => anyhow::bail!(
                        "unknown {} {other:?} in the state store (expected one of: {})",
                        stringify!($ty),
                        [$($text),+].join(", ")
                    ),
                }
            }
        }
    };
}

text_enum!(RunKind { Drill => "drill", Recovery => "recovery", Backup => "backup", Undo => "undo" });
text_enum!(RunState {
    Pending => "pending",
    Running => "running",
    Blocked => "blocked",
    Succeeded => "succeeded",
    Failed => "failed",
    Aborted => "aborted",
});
text_enum!(PhaseState {
    Pending => "pending",
    Running => "running",
    Passed => "passed",
    Failed => "failed",
    Skipped => "skipped",
    Blocked => "blocked",
});

/// A run as it is created.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    pub id: String,
    pub kind: RunKind,
    pub environment: String,
    pub point_id: Option<String>,
    /// The resolved plan the run executes, as the document it was loaded from: a resumed run
    /// follows the plan it started with, not whatever the file says now.
    pub plan: String,
    pub params: serde_json::Value,
    /// The epoch of the coordinator that created the run.
    pub epoch: Epoch,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub kind: RunKind,
    pub environment: String,
    pub point_id: Option<String>,
    pub plan: String,
    pub params: serde_json::Value,
    pub state: RunState,
    pub reason: Option<String>,
    pub epoch: Epoch,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The order in which the journal took runs (1, 2, ...): what "newer" means, never
    /// `created_at`, a wall clock.
    pub seq: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PhaseRecord {
    pub run_id: String,
    pub index: u32,
    pub name: String,
    pub state: PhaseState,
    pub attempt: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub detail: Option<String>,
}

/// A command as decided, journaled before it is sent. The id is deterministic (run, phase,
/// agent, attempt) so a resumed run re-sends the same id and the agent dedupes it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub command_id: String,
    pub run_id: String,
    pub phase_index: u32,
    pub agent: String,
    pub action: ActionKind,
    pub payload: serde_json::Value,
    pub attempt: u32,
    /// The newest epoch the command was sent under.
    pub epoch: Epoch,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResultRecord {
    pub command_id: String,
    pub agent: String,
    pub epoch: Epoch,
    pub outcome: Outcome,
    pub replayed: bool,
    pub detail: String,
    /// The agent's typed output, decoded by the command's action when it arrived.
    pub output: Option<ActionOutput>,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub seq: i64,
    pub run_id: String,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub payload: serde_json::Value,
}

/// The coordinator's durable state. Implementations are safe to share between tasks and between
/// coordinator processes on the same database.
#[async_trait]
pub trait Store: Send + Sync {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Takes the next epoch: strictly greater than every epoch handed out before, across
    /// restarts and concurrent callers. `holder` names the taker for the history.
    async fn next_epoch(&self, holder: &str) -> Result<Epoch>;

    /// The newest epoch handed out, if any.
    async fn latest_epoch(&self) -> Result<Option<Epoch>>;

    // Every journal write names its writer's epoch (for `create_run` and `record_command`,
    // the record's own) and applies only while that epoch is the newest: a coordinator that a
    // newer one replaced gets `Fenced` and changes nothing.

    /// Creates a run in state `pending`. `Conflict` when the id is taken.
    async fn create_run(&self, run: &NewRun) -> Result<()>;

    async fn run(&self, id: &str) -> Result<Option<RunRecord>>;

    /// Newest first.
    async fn list_runs(&self, limit: u32) -> Result<Vec<RunRecord>>;

    /// Runs not in a final state, oldest first: what a restarted coordinator resumes.
    async fn unfinished_runs(&self) -> Result<Vec<RunRecord>>;

    /// For each environment and kind, the newest run (by `seq`) that ended, blocked included,
    /// and the newest that succeeded (once when they are the same run), in no particular
    /// order: what the per-environment verdict metrics start from after a restart.
    async fn newest_verdicts(&self) -> Result<Vec<RunRecord>>;

    /// Moves a run to `state`. `NotFound` for an unknown run; `Conflict` when the run is
    /// already final (a finished run is never reopened).
    async fn set_run_state(
        &self,
        id: &str,
        state: RunState,
        reason: Option<&str>,
        at: DateTime<Utc>,
        writer: Epoch,
    ) -> Result<()>;

    /// Inserts or replaces the phase `(run_id, index)`. `Conflict` once the run is finished:
    /// a finished run never changes.
    async fn put_phase(&self, phase: &PhaseRecord, writer: Epoch) -> Result<()>;

    /// In phase order.
    async fn phases(&self, run_id: &str) -> Result<Vec<PhaseRecord>>;

    /// Journals a command before it is sent. Recording the same command again (a re-send after
    /// a restart) only raises its epoch; the same id with different content is a `Conflict`.
    async fn record_command(&self, command: &CommandRecord) -> Result<()>;

    /// Journals a command's result. Returns false, changing nothing, when the command already
    /// has one: the first result stands (agents replay the same result for a re-sent id).
    /// `NotFound` when the command was never journaled.
    async fn record_result(&self, result: &ResultRecord, writer: Epoch) -> Result<bool>;

    /// A run's commands in phase order, each with its result when there is one.
    async fn commands(&self, run_id: &str) -> Result<Vec<(CommandRecord, Option<ResultRecord>)>>;

    /// Appends to a run's event log; returns the event's sequence number (increasing).
    async fn append_event(
        &self,
        run_id: &str,
        at: DateTime<Utc>,
        kind: &str,
        payload: &serde_json::Value,
        writer: Epoch,
    ) -> Result<i64>;

    /// Events of a run with `seq > after`, oldest first, at most `limit`.
    async fn events(&self, run_id: &str, after: i64, limit: u32) -> Result<Vec<EventRecord>>;
}

/// Opens (creating and migrating as needed) the store a `[state] url` names:
/// `sqlite:///abs/path.db`, `sqlite:relative.db`, or `postgres://user@host/db`.
pub async fn open(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url).await?))
    } else {
        anyhow::bail!(
            "state store URL {:?} is neither sqlite: nor postgres://; set [state] url to \
             sqlite:///var/lib/rollcall/state.db or postgres://rollcall@db-host/rollcall",
            redact_url(url)
        )
    }
}

pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> anyhow::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .with_context(|| format!("timestamp {ms} ms in the state store is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unknown_text_is_refused() {
        for s in [
            RunState::Pending,
            RunState::Running,
            RunState::Blocked,
            RunState::Succeeded,
            RunState::Failed,
            RunState::Aborted,
        ] {
            assert_eq!(s.as_str().parse::<RunState>().ok(), Some(s));
        }
        let err = "paused".parse::<RunState>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "unknown RunState \"paused\" in the state store (expected one of: pending, \
                 running, blocked, succeeded, failed, aborted)"
            )
        );
        assert!(RunState::Aborted.is_final() && !RunState::Blocked.is_final());
    }
}
