//! `rollcall drill`, `rollcall runs` and `rollcall run show|watch|resume|retry|abort|undo`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use api::human;
use api::pb::operator as op;

use crate::operator::{Connection, status_error};

pub struct Drill {
    pub env: String,
    pub point: Option<String>,
    /// `--to-time T` (RFC 3339), checked here and by the coordinator.
    pub to_time: Option<String>,
    pub plan: Option<PathBuf>,
    pub dry_run: bool,
    /// `--exclude TEXT`, for the report's "data intentionally excluded".
    pub excluded: Vec<String>,
    pub watch: bool,
    pub json: bool,
}

fn start_request(d: &Drill) -> Result<op::StartRunRequest> {
    let (plan_toml, plan_name) = match &d.plan {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| {
                format!(
                    "read plan {}; check the path (`rollcall plan check FILE` validates one)",
                    path.display()
                )
            })?,
            path.display().to_string(),
        ),
        None => (String::new(), String::new()),
    };
    let to_time = match &d.to_time {
        Some(text) => chrono::DateTime::parse_from_rfc3339(text)
            .with_context(|| {
                format!("--to-time {text}: write it as RFC 3339, e.g. 2026-12-06T08:00:00Z")
            })?
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => String::new(),
    };
    Ok(op::StartRunRequest {
        environment: d.env.clone(),
        kind: "drill".into(),
        point: d.point.clone().unwrap_or_default(),
        plan_toml,
        plan_name,
        excluded: d.excluded.clone(),
        to_time,
        base_backup: false,
    })
}

pub async fn drill(connection: &Connection, d: Drill) -> Result<()> {
    let mut client = connection.connect().await?;
    let request = start_request(&d)?;
    if d.dry_run {
        let text = client
            .dry_run(request)
            .await
            .map_err(status_error)?
            .into_inner()
            .text;
        out!("{text}");
        return Ok(());
    }
    let run = client
        .start_run(request)
        .await
        .map_err(status_error)?
        .into_inner();
    if d.json && !d.watch {
        outln!("{}", serde_json::to_string_pretty(&run_json(&run))?);
        return Ok(());
    }
    if !d.json {
        outln!(
            "run {} started ({} of {})",
            run.id,
            run.kind,
            run.environment
        );
    }
    if d.watch {
        return watch(connection, &run.id, d.json).await;
    }
    outln!("follow it with: rollcall run watch {}", run.id);
    Ok(())
}

fn run_json(r: &op::Run) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "kind": r.kind,
        "environment": r.environment,
        "point": r.point_id,
        "state": r.state,
        "reason": r.reason,
        "epoch": r.epoch,
        "plan": r.plan_name,
        "started_by": r.started_by,
        "started_by_role": r.started_by_role,
        "created_unix_ms": r.created_unix_ms,
        "updated_unix_ms": r.updated_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
    })
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn list(connection: &Connection, json: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let runs = client
        .list_runs(op::ListRunsRequest { limit: 50 })
        .await
        .map_err(status_error)?
        .into_inner()
        .runs;
    if json {
        let out: Vec<_> = runs.iter().map(run_json).collect();
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if runs.is_empty() {
        outln!("no runs yet; start one with `rollcall drill --env ENV`");
        return Ok(());
    }
    outln!(
        "{:<44} {:<10} {:<12} {:<10} CREATED",
        "RUN",
        "KIND",
        "ENVIRONMENT",
        "STATE"
    );
    for r in &runs {
        outln!(
            "{:<44} {:<10} {:<12} {:<10} {}",
            r.id,
            r.kind,
            r.environment,
            r.state,
            time(r.created_unix_ms)
        );
    }
    Ok(())
}

pub async fn show(connection: &Connection, id: &str, json: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let detail = client
        .get_run(op::GetRunRequest { id: id.to_owned() })
        .await
        .map_err(status_error)?
        .into_inner();
    let run = detail
        .run
        .context("coordinator sent a run without its record")?;
    if json {
        let phases: Vec<_> = detail
            .phases
            .iter()
            .map(|p| {
                serde_json::json!({
                    "index": p.index, "name": p.name, "state": p.state, "attempt": p.attempt,
                    "started_unix_ms": p.started_unix_ms, "finished_unix_ms": p.finished_unix_ms,
                    "detail": p.detail,
                })
            })
            .collect();
        let commands: Vec<_> = detail
            .commands
            .iter()
            .map(|c| {
                serde_json::json!({
                    "command_id": c.command_id, "phase_index": c.phase_index, "agent": c.agent,
                    "action": c.action, "attempt": c.attempt, "epoch": c.epoch,
                    "outcome": c.outcome, "message": c.message, "replayed": c.replayed,
                })
            })
            .collect();
        let out =
            serde_json::json!({ "run": run_json(&run), "phases": phases, "commands": commands });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    outln!(
        "run {} ({} of {}): {}",
        run.id,
        run.kind,
        run.environment,
        run.state
    );
    if !run.reason.is_empty() {
        outln!("  {}", run.reason);
    }
    outln!(
        "  created {}  epoch {}  plan {}",
        time(run.created_unix_ms),
        run.epoch,
        run.plan_name
    );
    if !run.started_by.is_empty() {
        outln!("  started by {} ({})", run.started_by, run.started_by_role);
    }
    for p in &detail.phases {
        let took = if p.finished_unix_ms > 0 && p.started_unix_ms > 0 {
            format!(
                "{:.1}s",
                (p.finished_unix_ms - p.started_unix_ms) as f64 / 1000.0
            )
        } else {
            String::new()
        };
        outln!(
            "  {:>2}. {:<18} {:<8} {:>7}  {}",
            p.index,
            p.name,
            p.state,
            took,
            p.detail
        );
    }
    Ok(())
}

/// Streams a run's events until it ends or blocks; fails unless it succeeded.
pub async fn watch(connection: &Connection, id: &str, json: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let mut stream = client
        .watch_run(op::WatchRunRequest {
            id: id.to_owned(),
            after_seq: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut view = (!json).then(crate::watch::View::new);
    // While nothing happens, say every few seconds what the run waits for.
    let mut quiet_since = tokio::time::Instant::now();
    let mut asker = client.clone();
    loop {
        let next = tokio::select! {
            next = stream.message() => next.map_err(status_error)?,
            () = tokio::time::sleep_until(quiet_since + WAITING_EVERY), if view.is_some() => {
                quiet_since = tokio::time::Instant::now();
                if let Some(line) = waiting(&mut asker, id).await {
                    outln!("{} {line}", time(chrono::Utc::now().timestamp_millis()));
                }
                continue;
            }
        };
        let Some(event) = next else { break };
        quiet_since = tokio::time::Instant::now();
        let payload: serde_json::Value =
            serde_json::from_str(&event.payload_json).unwrap_or(serde_json::Value::Null);
        match view.as_mut() {
            Some(view) => view.event(&time(event.at_unix_ms), &event.kind, &payload),
            None => {
                let line = serde_json::json!({
                    "seq": event.seq, "at_unix_ms": event.at_unix_ms, "kind": event.kind,
                    "payload": payload,
                });
                outln!("{line}");
            }
        }
    }
    if let Some(view) = view.as_mut() {
        view.finish();
    }
    // The stream ends when the run is final or blocked: report how it stands.
    let run = client
        .get_run(op::GetRunRequest { id: id.to_owned() })
        .await
        .map_err(status_error)?
        .into_inner()
        .run
        .context("coordinator sent a run without its record")?;
    match run.state.as_str() {
        "succeeded" => {
            if !json {
                outln!("run {} succeeded", run.id);
            }
            Ok(())
        }
        state => bail!("run {} is {state}: {}", run.id, run.reason),
    }
}

/// How long `run watch` stays silent before it says what the run waits for.
const WAITING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the run waits for now, asked of the coordinator (None when it cannot say).
async fn waiting(client: &mut crate::operator::Client, id: &str) -> Option<String> {
    let detail = client
        .get_run(op::GetRunRequest { id: id.to_owned() })
        .await
        .ok()?
        .into_inner();
    let agents = client
        .list_agents(op::ListAgentsRequest {})
        .await
        .map(|r| r.into_inner().agents)
        .unwrap_or_default();
    waiting_for(&detail, &agents, chrono::Utc::now().timestamp_millis())
}

/// One line: each running phase, how long it has run, and the agents whose answer it still
/// waits for, each unavailable (since when it was last heard) or busy.
pub(crate) fn waiting_for(
    detail: &op::RunDetail,
    agents: &[op::AgentStatus],
    now_ms: i64,
) -> Option<String> {
    let secs = |ms: i64| (now_ms - ms).max(0) / 1000;
    let mut parts = Vec::new();
    for phase in detail.phases.iter().filter(|p| p.state == "running") {
        let mut pending: Vec<String> = detail
            .commands
            .iter()
            .filter(|c| {
                c.phase_index == phase.index && c.attempt == phase.attempt && c.outcome.is_empty()
            })
            .map(|c| {
                let agent = agents.iter().find(|a| a.name == c.agent);
                match agent {
                    None => format!("{} (never connected)", c.agent),
                    Some(a) if a.availability == op::Availability::Unavailable as i32 => format!(
                        "{} (unavailable, last heard {}s ago)",
                        c.agent,
                        secs(a.last_heartbeat_unix_ms)
                    ),
                    Some(_) => format!("{} (busy)", c.agent),
                }
            })
            .collect();
        pending.sort();
        pending.dedup();
        let waited = if phase.started_unix_ms > 0 {
            format!(" for {}s", secs(phase.started_unix_ms))
        } else {
            String::new()
        };
        parts.push(if pending.is_empty() {
            format!("phase {} running{waited}, judging its gate", phase.name)
        } else {
            format!(
                "phase {} running{waited}, waiting for {}",
                phase.name,
                pending.join(", ")
            )
        });
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

pub async fn control(
    connection: &Connection,
    id: &str,
    control: op::RunControl,
    follow: bool,
) -> Result<()> {
    let mut client = connection.connect().await?;
    let run = client
        .control_run(op::ControlRunRequest {
            id: id.to_owned(),
            control: control as i32,
            force: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    outln!("run {} is {}", run.id, run.state);
    if !run.reason.is_empty() {
        outln!("  {}", run.reason);
    }
    if follow && control != op::RunControl::Abort {
        // Followed like `--watch`: exit 0 only when the run succeeds, so a run that blocks
        // again a moment later is not mistaken for a fix.
        return watch(connection, id, false).await;
    }
    Ok(())
}

/// `rollcall run approve|reject ID [--reason TEXT]`: one operator's decision on a run that
/// waits at its approve phase (the two-person rule).
pub async fn decide(connection: &Connection, id: &str, approve: bool, reason: &str) -> Result<()> {
    let mut client = connection.connect().await?;
    let answer = client
        .decide_run(op::DecideRunRequest {
            id: id.to_owned(),
            approve,
            reason: reason.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    outln!("{}", answer.message);
    Ok(())
}

/// `rollcall run undo ID [--force] [--watch]`: starts the undo run (and follows it).
pub async fn undo(connection: &Connection, id: &str, force: bool, follow: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let run = client
        .control_run(op::ControlRunRequest {
            id: id.to_owned(),
            control: op::RunControl::Undo as i32,
            force,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    outln!("undo run {} of run {id} started", run.id);
    if follow {
        return watch(connection, &run.id, false).await;
    }
    outln!("follow it with: rollcall run watch {}", run.id);
    Ok(())
}

/// `rollcall backup --env ENV [--wait]`: a backup run; prints the point id.
pub async fn backup(
    connection: &Connection,
    env: &str,
    wait: bool,
    json: bool,
    base: bool,
) -> Result<()> {
    let mut client = connection.connect().await?;
    let run = client
        .start_run(op::StartRunRequest {
            environment: env.to_owned(),
            kind: "backup".into(),
            base_backup: base,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if base {
        return base_backup(&mut client, run, wait, json).await;
    }
    if wait {
        loop {
            let detail = client
                .get_run(op::GetRunRequest { id: run.id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            let now = detail
                .run
                .context("coordinator sent a run without its record")?;
            match now.state.as_str() {
                "succeeded" => break,
                "blocked" | "failed" | "aborted" => {
                    bail!("backup run {} is {}: {}", now.id, now.state, now.reason)
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    }
    if json {
        let out = serde_json::json!({ "point": run.point_id, "run": run.id, "complete": wait });
        outln!("{out}");
    } else {
        outln!("{}", run.point_id);
        if !wait {
            eprintln!(
                "backup run {} started; the point exists once it succeeds (rollcall run watch {})",
                run.id, run.id
            );
        }
    }
    Ok(())
}

/// `rollcall backup --env ENV --base`: the run's id; with `--wait`, the base backup its
/// `base_backup.taken` event names (id, consistent_at, size, WAL range) once it succeeded.
async fn base_backup(
    client: &mut crate::operator::Client,
    run: op::Run,
    wait: bool,
    json: bool,
) -> Result<()> {
    if !wait {
        if json {
            outln!(
                "{}",
                serde_json::json!({ "run": run.id, "complete": false })
            );
        } else {
            outln!("{}", run.id);
            eprintln!(
                "base-backup run {} started; the base backup exists once it succeeds (rollcall \
                 run watch {})",
                run.id, run.id
            );
        }
        return Ok(());
    }
    let mut stream = client
        .watch_run(op::WatchRunRequest {
            id: run.id.clone(),
            after_seq: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut taken = serde_json::Value::Null;
    while let Some(event) = stream.message().await.map_err(status_error)? {
        if event.kind == "base_backup.taken" {
            taken = serde_json::from_str(&event.payload_json).unwrap_or_default();
        }
    }
    let now = client
        .get_run(op::GetRunRequest { id: run.id.clone() })
        .await
        .map_err(status_error)?
        .into_inner()
        .run
        .context("coordinator sent a run without its record")?;
    if now.state != "succeeded" {
        bail!(
            "base-backup run {} is {}: {}",
            now.id,
            now.state,
            now.reason
        );
    }
    if json {
        outln!(
            "{}",
            serde_json::json!({ "run": now.id, "complete": true, "base_backup": taken })
        );
    } else {
        outln!("{}", taken["base_backup"].as_str().unwrap_or_default());
    }
    Ok(())
}

/// `rollcall points [--env ENV] [--json]`.
pub async fn points(connection: &Connection, env: Option<&str>, json: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let listing = client
        .list_points(op::ListPointsRequest {
            environment: env.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let points: Vec<_> = listing
            .points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "environment": p.environment, "created_unix_ms": p.created_unix_ms,
                    "age_seconds": p.age_seconds, "postgres_bytes": p.postgres_bytes,
                    "objects": p.objects, "object_bytes": p.object_bytes,
                    "rpo_seconds": p.rpo_seconds, "stale": p.stale, "secret_refs": p.secret_refs,
                    "sequence": (p.sequence > 0).then_some(p.sequence),
                    "stamped_in_future": p.stamped_ahead_seconds > 0,
                    "stamped_ahead_seconds": p.stamped_ahead_seconds,
                })
            })
            .collect();
        let windows: Vec<_> = listing
            .windows
            .iter()
            .map(|w| {
                if w.provider {
                    return serde_json::json!({"environment": w.environment, "provider": true});
                }
                serde_json::json!({
                    "environment": w.environment,
                    "earliest": unix_ms_rfc3339(w.earliest_unix_ms),
                    "latest": unix_ms_rfc3339(w.latest_unix_ms),
                    "newest_segment": w.newest_segment,
                    "gap_at": (!w.gap_at.is_empty()).then_some(&w.gap_at),
                    "base_backups": w.base_backups,
                    "provider": false,
                })
            })
            .collect();
        let out = serde_json::json!({
            "points": points, "damaged": listing.damaged, "windows": windows,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for d in &listing.damaged {
        eprintln!("warning: damaged point file, not listed: {d}");
    }
    for w in &listing.windows {
        if w.provider {
            outln!(
                "{}: Postgres restorable to a time within the managed provider's own window \
                 (pitr = \"provider\"): the database agent's adapter reports it at preflight",
                w.environment
            );
            continue;
        }
        outln!(
            "{}: Postgres restorable to any time from {} to {} ({} base backup(s), newest WAL \
             segment {}){}",
            w.environment,
            unix_ms_rfc3339(w.earliest_unix_ms),
            unix_ms_rfc3339(w.latest_unix_ms),
            w.base_backups,
            w.newest_segment,
            if w.gap_at.is_empty() {
                String::new()
            } else {
                format!(
                    "; WAL gap at {}: later segments are unreachable until a new base backup",
                    w.gap_at
                )
            }
        );
    }
    if listing.points.is_empty() {
        outln!("no recovery points; take one with `rollcall backup --env ENV`");
        return Ok(());
    }
    outln!(
        "{:<40} {:<12} {:>10} {:>12} {:>9} {:>12}  RPO",
        "POINT",
        "ENVIRONMENT",
        "AGE",
        "POSTGRES",
        "OBJECTS",
        "OBJECT BYTES"
    );
    for p in &listing.points {
        let rpo = humantime::format_duration(std::time::Duration::from_secs(p.rpo_seconds));
        let ahead = std::time::Duration::from_secs(p.stamped_ahead_seconds);
        let age = if ahead.is_zero() {
            humantime::format_duration(std::time::Duration::from_secs(p.age_seconds)).to_string()
        } else {
            "unknown".to_owned()
        };
        let flag = if !ahead.is_zero() {
            format!(
                "{}: age unknown, not within RPO {rpo}",
                stamped_ahead(ahead)
            )
        } else if p.stale {
            format!("OLDER THAN RPO {rpo}")
        } else {
            format!("within {rpo}")
        };
        outln!(
            "{:<40} {:<12} {:>10} {:>12} {:>9} {:>12}  {flag}",
            p.id,
            p.environment,
            age,
            human::bytes(p.postgres_bytes),
            p.objects,
            human::bytes(p.object_bytes)
        );
    }
    Ok(())
}

fn unix_ms_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// The marker of a point stamped `ahead` of the reader's clock (`points`, `repo points`),
/// to the nearest minute past one (seconds go by between the commit and the reading).
pub fn stamped_ahead(ahead: std::time::Duration) -> String {
    let secs = ahead.as_secs();
    let secs = if secs >= 60 {
        (secs + 30) / 60 * 60
    } else {
        secs
    };
    let ahead = std::time::Duration::from_secs(secs);
    format!(
        "stamped {} in the future (a clock ran fast when it was taken)",
        humantime::format_duration(ahead)
    )
}

/// `rollcall report ID [--format md|json] [--out PATH] [--follow-up TEXT@OWNER ...]`.
pub async fn report(
    connection: &Connection,
    id: &str,
    format: &str,
    out: Option<&std::path::Path>,
    follow_ups: Vec<String>,
) -> Result<()> {
    let mut client = connection.connect().await?;
    let text = client
        .get_report(op::GetReportRequest {
            id: id.to_owned(),
            format: format.to_owned(),
            follow_ups,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .text;
    match out {
        Some(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))?;
            }
            std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
            outln!("report written to {}", path.display());
        }
        None => out!("{text}"),
    }
    Ok(())
}

/// `rollcall points prune --env ENV [--dry-run]`.
pub async fn prune(connection: &Connection, env: &str, dry_run: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let report = client
        .prune_points(op::PrunePointsRequest {
            environment: env.to_owned(),
            dry_run,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    outln!("{}", report.json);
    Ok(())
}

/// `rollcall points verify ID [--full]`: exit 1 when the point has problems.
pub async fn verify(connection: &Connection, id: &str, full: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let report = client
        .verify_point(op::VerifyPointRequest {
            id: id.to_owned(),
            full,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    outln!("{}", report.json);
    if !report.ok {
        bail!(
            "recovery point {id} failed verification (problems listed above); do not restore from it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_future_stamp_reads_to_the_nearest_minute() {
        let marker = |secs| stamped_ahead(Duration::from_secs(secs));
        assert_eq!(
            marker(599),
            "stamped 10m in the future (a clock ran fast when it was taken)"
        );
        assert_eq!(
            marker(600),
            "stamped 10m in the future (a clock ran fast when it was taken)"
        );
        assert!(marker(89).starts_with("stamped 1m in"), "{}", marker(89));
        assert!(marker(3 * 3600 + 10).starts_with("stamped 3h in"));
    }

    #[test]
    fn waiting_names_the_running_phases_agents_busy_or_unavailable() {
        let command = |phase_index, agent: &str, outcome: &str| op::CommandStatus {
            phase_index,
            agent: agent.into(),
            attempt: 1,
            outcome: outcome.into(),
            ..Default::default()
        };
        let detail = op::RunDetail {
            run: None,
            phases: vec![
                op::PhaseStatus {
                    index: 0,
                    name: "preflight".into(),
                    state: "passed".into(),
                    attempt: 1,
                    ..Default::default()
                },
                op::PhaseStatus {
                    index: 1,
                    name: "commit-postgres".into(),
                    state: "running".into(),
                    attempt: 1,
                    started_unix_ms: 10_000,
                    ..Default::default()
                },
            ],
            commands: vec![
                command(0, "db-1", "succeeded"),
                command(1, "db-1", ""),
                command(1, "db-2", ""),
                command(1, "db-3", ""),
                command(1, "db-4", "succeeded"),
            ],
        };
        let agent = |name: &str, availability: op::Availability| op::AgentStatus {
            name: name.into(),
            availability: availability as i32,
            last_heartbeat_unix_ms: 20_000,
            ..Default::default()
        };
        let agents = [
            agent("db-1", op::Availability::Unavailable),
            agent("db-2", op::Availability::Connected),
        ];
        assert_eq!(
            waiting_for(&detail, &agents, 43_500).as_deref(),
            Some(
                "phase commit-postgres running for 33s, waiting for db-1 (unavailable, last \
                 heard 23s ago), db-2 (busy), db-3 (never connected)"
            )
        );
        let mut done = detail.clone();
        done.phases[1].state = "passed".into();
        assert_eq!(waiting_for(&done, &agents, 43_500), None);
    }
}
