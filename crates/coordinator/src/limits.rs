//! The limits of the coordinator's gRPC services (`[agents]` and `[operator]` in
//! rollcall.toml), apart from the layers that enforce them so the config can name them
//! without depending on the servers.

use std::time::Duration;

/// Limits of the gRPC services; the defaults are what `rollcall.toml` gives when it is silent.
#[derive(Debug, Clone)]
pub struct Limits {
    /// New agent attachments admitted per `attach_window` (`agents.attach_rate` a second).
    pub attaches: u64,
    pub attach_window: Duration,
    /// Operator calls served at once (`operator.max_concurrent_calls`).
    pub operator_calls: usize,
    /// How long an operator call other than the [`LONG_CALLS`] may take (`operator.call_timeout`).
    pub operator_call_timeout: Duration,
}

pub const DEFAULT_ATTACH_RATE: u64 = 500;
pub const DEFAULT_OPERATOR_CALLS: usize = 64;
pub const DEFAULT_OPERATOR_CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            attaches: DEFAULT_ATTACH_RATE,
            attach_window: Duration::from_secs(1),
            operator_calls: DEFAULT_OPERATOR_CALLS,
            operator_call_timeout: DEFAULT_OPERATOR_CALL_TIMEOUT,
        }
    }
}

impl Limits {
    /// Attachments that may wait for the rate limit: one window's worth. More are refused.
    pub fn attach_queue(&self) -> usize {
        usize::try_from(self.attaches).unwrap_or(usize::MAX).max(1)
    }
}

/// Operator calls without a deadline: `WatchRun` streams for as long as its run goes on;
/// `VerifyPoint` (`--full` reads every byte of a point) and `PrunePoints` (sweeps a repository)
/// take as long as the repository is large; `ListKept` and `PruneKept` wait for the database
/// agents (sizing and dropping databases) and walk the repository's quarantine.
pub const LONG_CALLS: [&str; 5] = [
    "WatchRun",
    "VerifyPoint",
    "PrunePoints",
    "ListKept",
    "PruneKept",
];
