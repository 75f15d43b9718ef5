//! Which operator role each operator call needs: the one table (DESIGN.md, "Security").
//!
//! Authentication (`layers::OperatorAuthLayer`) establishes who called and with which role;
//! each handler of the operator API then describes its call as a [`Call`] (for a run: its
//! kind and whether its environment is `protected`) and asks [`authorize`]. A refusal is
//! `PermissionDenied` naming the role the call needs.

use api::identity::OperatorRole;
use tonic::Status;

use crate::grpc::Operator;
use crate::store::RunKind;

/// An operator call, described by what decides the role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call<'a> {
    /// Reads: agents, runs and their detail, watch, reports, points and their verification,
    /// kept copies, plans and dry runs.
    Read,
    /// Starting a run of `kind` in an environment (`rollcall drill`, `backup`), or changing an
    /// unfinished one (`run resume|retry|abort`), or deciding on one waiting for approval
    /// (`run approve|reject`).
    Run {
        verb: &'a str,
        kind: RunKind,
        environment: &'a str,
        protected: bool,
        /// The run follows a plan the caller sent (`--plan FILE`): a plan can do anything, so
        /// a backup with its own plan needs what a drill needs.
        own_plan: bool,
    },
    /// Deleting recovery points past retention (`points prune`); a dry run only reads.
    PrunePoints { dry_run: bool },
    /// Deleting kept copies (`kept prune`); a dry run only reads.
    PruneKept { dry_run: bool },
}

/// The role a call needs.
pub fn needed(call: &Call<'_>) -> OperatorRole {
    match *call {
        Call::Read | Call::PrunePoints { dry_run: true } | Call::PruneKept { dry_run: true } => {
            OperatorRole::Viewer
        }
        Call::Run {
            kind: RunKind::Backup,
            own_plan: false,
            ..
        } => OperatorRole::Operator,
        Call::Run {
            protected: false, ..
        } => OperatorRole::Operator,
        Call::Run {
            protected: true, ..
        } => OperatorRole::Admin,
        Call::PrunePoints { dry_run: false } | Call::PruneKept { dry_run: false } => {
            OperatorRole::Admin
        }
    }
}

/// Admits `operator` to `call`, or refuses naming the role it needs and why.
pub fn authorize(operator: &Operator, call: &Call<'_>) -> Result<(), Status> {
    let need = needed(call);
    if operator.role >= need {
        return Ok(());
    }
    let what = match *call {
        Call::Read => "read the fleet".to_owned(),
        Call::Run {
            verb,
            kind,
            environment,
            protected,
            own_plan,
        } => {
            let backup = kind == RunKind::Backup && !own_plan;
            let protected = if protected && !backup {
                " (a protected environment)"
            } else {
                ""
            };
            let article = if kind == RunKind::Undo { "an" } else { "a" };
            let plan = if own_plan { " with its own plan" } else { "" };
            format!("{verb} {article} {kind} run{plan} of environment {environment}{protected}")
        }
        Call::PrunePoints { .. } => "prune recovery points".to_owned(),
        Call::PruneKept { .. } => "prune kept copies".to_owned(),
    };
    Err(Status::permission_denied(format!(
        "operator {} has the {} role and may not {what}: that needs the {need} role; ask an \
         operator who has it, or get a certificate or token with it",
        operator.name, operator.role
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::Via;

    fn run(kind: RunKind, protected: bool) -> Call<'static> {
        Call::Run {
            verb: "start",
            kind,
            environment: "prod",
            protected,
            own_plan: false,
        }
    }

    #[test]
    fn the_table() {
        use OperatorRole::{Admin, Operator, Viewer};
        let rows = [
            (Call::Read, Viewer),
            (run(RunKind::Backup, false), Operator),
            (run(RunKind::Backup, true), Operator),
            (run(RunKind::Drill, false), Operator),
            (run(RunKind::Recovery, false), Operator),
            (run(RunKind::Undo, false), Operator),
            (run(RunKind::Drill, true), Admin),
            (run(RunKind::Recovery, true), Admin),
            (run(RunKind::Undo, true), Admin),
            // A backup run with a plan of the caller's could restore: a drill's role.
            (
                Call::Run {
                    verb: "start",
                    kind: RunKind::Backup,
                    environment: "prod",
                    protected: true,
                    own_plan: true,
                },
                Admin,
            ),
            (
                Call::Run {
                    verb: "start",
                    kind: RunKind::Backup,
                    environment: "prod",
                    protected: false,
                    own_plan: true,
                },
                Operator,
            ),
            (Call::PrunePoints { dry_run: true }, Viewer),
            (Call::PrunePoints { dry_run: false }, Admin),
            (Call::PruneKept { dry_run: true }, Viewer),
            (Call::PruneKept { dry_run: false }, Admin),
        ];
        for (call, role) in rows {
            assert_eq!(needed(&call), role, "{call:?}");
        }
    }

    fn caller(role: OperatorRole) -> Operator {
        Operator {
            name: "bob".into(),
            role,
            via: Via::Certificate,
        }
    }

    #[test]
    fn viewer_operator_admin_on_a_drill() {
        let open = run(RunKind::Drill, false);
        let protected = run(RunKind::Drill, true);
        let e = authorize(&caller(OperatorRole::Viewer), &open).expect_err("viewer");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "operator bob has the viewer role and may not start a drill run of environment \
             prod: that needs the operator role; ask an operator who has it, or get a \
             certificate or token with it"
        );
        assert!(authorize(&caller(OperatorRole::Operator), &open).is_ok());
        let e = authorize(&caller(OperatorRole::Operator), &protected).expect_err("operator");
        assert!(
            e.message().contains(
                "drill run of environment prod (a protected environment): that needs the admin role"
            ),
            "{}",
            e.message()
        );
        assert!(authorize(&caller(OperatorRole::Admin), &protected).is_ok());
        assert!(authorize(&caller(OperatorRole::Viewer), &Call::Read).is_ok());
        let e = authorize(
            &caller(OperatorRole::Operator),
            &Call::Run {
                verb: "start",
                kind: RunKind::Undo,
                environment: "prod",
                protected: true,
                own_plan: false,
            },
        )
        .expect_err("operator undo of a protected environment");
        assert!(
            e.message()
                .contains("may not start an undo run of environment prod"),
            "{}",
            e.message()
        );
    }
}
