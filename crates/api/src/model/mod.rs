//! The domain model: what the rest of Rollcall works with instead of prost types.
//!
//! Required fields are non-optional here. Every message is validated once, on receive, by
//! `TryFrom<pb::X>`; sending converts back with `From<X> for pb::X`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

mod agent;
mod command;
mod operator;
pub mod output;
mod result;

pub use agent::{AgentMessage, CommandProgress, Heartbeat, Hello, Progress};
pub use command::{
    Action, ActionKind, Command, CoordinatorMessage, ObjectReferences, RepositoryRef, ScaleTarget,
    Welcome,
};
pub use operator::{AgentStatus, Availability};
pub use output::{ActionOutput, Check, CheckKind, Output};
pub use result::{CommandResult, Description, Outcome, ResultDetail, ScaleOutput};

/// A message failed validation; names the field and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Invalid {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

pub(crate) fn check_token(field: &'static str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Invalid::new(field, format!("longer than {max} characters")));
    }
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(Invalid::new(
            field,
            format!(
                "{value:?} must start with a lowercase letter or digit and hold only a-z, 0-9, '-', '_', '.'"
            ),
        ));
    }
    Ok(())
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, Invalid> {
                check_token($field, value, 64)?;
                Ok($name(value.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad` honours width and alignment, so names line up in tables.
                f.pad(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Invalid;
            fn try_from(value: String) -> Result<Self, Invalid> {
                $name::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

token_type!(
    /// An agent's unique name within a coordinator, e.g. `web-1`.
    AgentName,
    "agent name"
);
token_type!(
    /// A role: `web`, `worker`, `scheduler`, `gateway`, `database`, `objects`, or a custom name.
    Role,
    "role"
);
token_type!(
    /// An environment name, e.g. `private-beta`.
    Environment,
    "environment"
);

/// The coordinator's fencing token. Zero is never issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(u64);

impl Epoch {
    pub fn new(value: u64) -> Result<Epoch, Invalid> {
        if value == 0 {
            return Err(Invalid::new("epoch", "must be at least 1"));
        }
        Ok(Epoch(value))
    }
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The deterministic id of one command (run, phase, agent, attempt); agents dedupe on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommandId(String);

impl CommandId {
    pub fn parse(value: &str) -> Result<CommandId, Invalid> {
        if value.is_empty() {
            return Err(Invalid::new("command_id", "must not be empty"));
        }
        if value.len() > 256 {
            return Err(Invalid::new("command_id", "longer than 256 characters"));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(Invalid::new("command_id", "holds control characters"));
        }
        Ok(CommandId(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn to_unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

pub fn from_unix_ms(ms: i64) -> SystemTime {
    add_saturating(
        UNIX_EPOCH,
        Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
}

/// `t + d` for deadlines, never a panic: when the sum is past what the platform's `SystemTime`
/// can hold (a plan's absurd timeout, a peer's absurd Unix time), a time at least half way from
/// `t` to the latest one it can hold: a moment that never comes. `SystemTime + Duration` panics.
pub fn add_saturating(t: SystemTime, mut d: Duration) -> SystemTime {
    loop {
        if let Some(sum) = t.checked_add(d) {
            return sum;
        }
        // Ends: `d` reaches zero after at most 94 halvings, and `t + 0` is `t`.
        d /= 2;
    }
}

pub(crate) fn required_time(field: &'static str, ms: i64) -> Result<SystemTime, Invalid> {
    if ms <= 0 {
        return Err(Invalid::new(
            field,
            "must be a positive Unix time in milliseconds",
        ));
    }
    Ok(from_unix_ms(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::agent as pb;
    use std::collections::BTreeMap;

    #[test]
    fn deadlines_past_what_a_clock_holds_saturate_instead_of_panicking() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(add_saturating(now, hour), now + hour);
        let far = add_saturating(now, Duration::MAX);
        assert!(
            far > now + Duration::from_secs(1_000 * 365 * 86_400),
            "{far:?}"
        );
        assert!(add_saturating(far, Duration::MAX) >= far);
        // A peer's largest Unix time reads as a (far) time, never a panic.
        assert!(from_unix_ms(i64::MAX) > now);
        assert_eq!(from_unix_ms(-5), UNIX_EPOCH);
    }

    fn command() -> Command {
        Command {
            id: CommandId::parse("run-1/phase-0/web-1/1").expect("valid"),
            epoch: Epoch::new(7).expect("valid"),
            run_id: "run-1".into(),
            time_limit: Duration::from_secs(600),
            trace_context: BTreeMap::from([("traceparent".into(), "00-abc-def-01".into())]),
            action: Action::Ping {
                hold: Duration::from_millis(250),
            },
        }
    }

    #[test]
    fn command_round_trips_through_the_wire_type() {
        let wire: pb::Command = command().into();
        assert_eq!(Command::try_from(wire), Ok(command()));
        let check = Command {
            action: Action::CheckObjects(vec![ObjectReferences {
                name: "artifact objects".into(),
                keys: vec!["artifacts/a".into(), "artifacts/b".into()],
                total: 7,
                sampled: true,
                required: true,
            }]),
            ..command()
        };
        let wire: pb::Command = check.clone().into();
        assert_eq!(Command::try_from(wire), Ok(check));
    }

    #[test]
    fn kept_copy_commands_round_trip_and_refuse_what_is_no_database_name() {
        for action in [
            Action::ListKept,
            Action::PruneKept {
                databases: vec![
                    "cowork_pre_r1a2b3c4d".into(),
                    "cowork_undone_r1a2b3c4d".into(),
                ],
            },
        ] {
            let kept = Command {
                action,
                ..command()
            };
            let wire: pb::Command = kept.clone().into();
            assert_eq!(Command::try_from(wire), Ok(kept));
        }
        assert!(!Action::ListKept.has_side_effects());
        assert!(Action::PruneKept { databases: vec![] }.has_side_effects());
        for bad in [String::new(), "d".repeat(64), "cowork\n_pre".into()] {
            let wire: pb::Command = Command {
                action: Action::PruneKept {
                    databases: vec![bad.clone()],
                },
                ..command()
            }
            .into();
            let err = Command::try_from(wire).expect_err("not a database name");
            assert!(
                err.to_string().contains("not a database name"),
                "{bad:?}: {err}"
            );
        }
    }

    /// A command carries how long it may take, not when it must end: a receiver whose clock is
    /// off by hours reads the same limit. A command from an older coordinator (an absolute
    /// deadline only) is read by the old rule, against this machine's clock.
    #[test]
    fn a_command_carries_its_time_limit_and_reads_an_older_deadline() {
        let mut wire: pb::Command = command().into();
        assert_eq!(wire.timeout_ms, 600_000);
        // Older agents still find a deadline on the sender's clock.
        let ahead = wire.deadline_unix_ms - to_unix_ms(SystemTime::now());
        assert!((599_000..=600_000).contains(&ahead), "{ahead}");
        wire.deadline_unix_ms = 1; // 1970: whatever it says, the limit decides.
        assert_eq!(
            Command::try_from(wire.clone()).map(|c| c.time_limit),
            Ok(Duration::from_secs(600))
        );
        wire.timeout_ms = 0;
        wire.deadline_unix_ms = to_unix_ms(SystemTime::now() + Duration::from_secs(60));
        let left = Command::try_from(wire.clone()).expect("valid").time_limit;
        assert!(
            left > Duration::from_secs(55) && left <= Duration::from_secs(60),
            "{left:?}"
        );
        wire.deadline_unix_ms = to_unix_ms(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            Command::try_from(wire).map(|c| c.time_limit),
            Ok(Duration::ZERO),
            "an old deadline already past"
        );
    }

    #[test]
    fn rejects_commands_missing_required_fields() {
        type Mutation = fn(&mut pb::Command);
        let cases: [(&str, Mutation); 4] = [
            ("command_id", |c| c.command_id.clear()),
            ("epoch", |c| c.epoch = 0),
            ("deadline", |c| {
                c.timeout_ms = 0;
                c.deadline_unix_ms = 0;
            }),
            ("command action", |c| c.action = None),
        ];
        for (field, mutate) in cases {
            let mut wire: pb::Command = command().into();
            mutate(&mut wire);
            let err = Command::try_from(wire).expect_err(field);
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(
            format!("[{:<7}]", AgentName::parse("web-1").expect("valid")),
            "[web-1  ]"
        );
        assert!(AgentName::parse("web-1").is_ok());
        assert!(AgentName::parse("").is_err());
        assert!(AgentName::parse("Web").is_err());
        assert!(AgentName::parse("-web").is_err());
        assert!(AgentName::parse("web/1").is_err());
        assert!(AgentName::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn hello_requires_a_valid_role_and_version() {
        let good = pb::Hello {
            name: "db-1".into(),
            role: "database".into(),
            environment: "dev".into(),
            capabilities: vec!["postgres".into()],
            version: "0.1.0".into(),
            highest_epoch: 0,
        };
        let hello = Hello::try_from(good.clone()).expect("valid hello");
        assert_eq!(hello.highest_epoch, None);
        let mut bad = good.clone();
        bad.role = "Data Base".into();
        assert_eq!(Hello::try_from(bad).expect_err("bad role").field, "role");
        let mut bad = good;
        bad.version.clear();
        assert_eq!(
            Hello::try_from(bad).expect_err("no version").field,
            "version"
        );
    }

    #[test]
    fn result_round_trips_and_rejects_unknown_outcomes() {
        let result = CommandResult {
            command_id: CommandId::parse("c1").expect("valid"),
            epoch: Epoch::new(3).expect("valid"),
            outcome: Outcome::TimedOut,
            message: "deadline passed".into(),
            replayed: true,
            started: from_unix_ms(1_000),
            finished: from_unix_ms(2_000),
            detail: Some(ResultDetail::Ping { executions: 2 }),
        };
        let wire: pb::CommandResult = result.clone().into();
        assert_eq!(CommandResult::try_from(wire.clone()), Ok(result));
        let mut bad = wire;
        bad.outcome = 99;
        assert_eq!(
            CommandResult::try_from(bad).expect_err("unknown").field,
            "outcome"
        );
    }

    #[test]
    fn an_output_travels_with_its_version() {
        let output = ActionOutput::Smoke(output::ChecksOutput { checks: vec![] });
        let result = CommandResult {
            command_id: CommandId::parse("c1").expect("valid"),
            epoch: Epoch::new(3).expect("valid"),
            outcome: Outcome::Succeeded,
            message: String::new(),
            replayed: false,
            started: from_unix_ms(1_000),
            finished: from_unix_ms(2_000),
            detail: Some(ResultDetail::Output(Output::from(&output))),
        };
        let wire: pb::CommandResult = result.clone().into();
        assert_eq!(wire.output_version, output::OUTPUT_VERSION);
        assert_eq!(CommandResult::try_from(wire.clone()), Ok(result));
        // An agent from before versions sends no version: its output reads as version 0.
        let mut older = wire;
        older.output_version = 0;
        let Some(ResultDetail::Output(o)) = CommandResult::try_from(older).expect("valid").detail
        else {
            panic!("no output");
        };
        assert_eq!(o.version, 0);
        assert_eq!(ActionOutput::decode(ActionKind::Smoke, &o), Ok(output));
    }
}
