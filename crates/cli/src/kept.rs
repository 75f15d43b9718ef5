//! `rollcall kept list|prune --env ENV`: the databases and quarantines restores and undos kept,
//! listed with size, age and run, and pruned by retention (the rules are the coordinator's,
//! `engine/kept.rs`).

use std::time::Duration;

use anyhow::{Result, bail};
use api::human;
use api::pb::operator as op;

use crate::operator::{Connection, status_error};

/// `rollcall kept list --env ENV [--json]`.
pub async fn list(connection: &Connection, env: &str, json: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let listing = client
        .list_kept(op::ListKeptRequest {
            environment: env.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print(&listing, json, Mode::List)?;
    Ok(())
}

pub struct Prune {
    pub env: String,
    pub dry_run: bool,
    pub keep_last: Option<u32>,
    pub older_than: Option<String>,
    pub json: bool,
}

/// `rollcall kept prune --env ENV [--dry-run] [--keep-last N] [--older-than DURATION] [--json]`:
/// exit 1 when a chosen copy could not be deleted.
pub async fn prune(connection: &Connection, p: Prune) -> Result<()> {
    let older_than = match &p.older_than {
        None => None,
        Some(text) => Some(parse_age(text)?),
    };
    let mut client = connection.connect().await?;
    let outcome = client
        .prune_kept(op::PruneKeptRequest {
            environment: p.env.clone(),
            dry_run: p.dry_run,
            keep_last: p.keep_last,
            older_than_seconds: older_than.map_or(0, |d| d.as_secs().max(1)),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print(
        &outcome,
        p.json,
        if p.dry_run { Mode::DryRun } else { Mode::Prune },
    )?;
    let failed: Vec<&str> = outcome
        .copies
        .iter()
        .filter(|c| c.decision == "failed")
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} kept cop{} not pruned ({}): see the reasons above; fix them and prune again",
            failed.len(),
            if failed.len() == 1 {
                "y was"
            } else {
                "ies were"
            },
            failed.join(", ")
        );
    }
    Ok(())
}

/// `--older-than`: a duration such as `7d`, `36h` or `2weeks`.
fn parse_age(text: &str) -> Result<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => bail!("--older-than {text:?} is zero; give a duration such as 7d or 36h"),
        Err(e) => {
            bail!("--older-than {text:?} is not a duration ({e}); write e.g. 7d, 36h or 2weeks")
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    List,
    DryRun,
    Prune,
}

fn print(listing: &op::KeptResponse, json: bool, mode: Mode) -> Result<()> {
    let prune = mode != Mode::List;
    if json {
        let copies: Vec<_> = listing
            .copies
            .iter()
            .map(|c| {
                let mut v = serde_json::json!({
                    "kind": c.kind, "name": c.name,
                    "agent": (!c.agent.is_empty()).then_some(&c.agent),
                    "tag": c.tag, "bytes": c.bytes, "objects": c.objects, "sessions": c.sessions,
                    "run": (!c.run_id.is_empty()).then_some(&c.run_id),
                    "run_state": (!c.run_state.is_empty()).then_some(&c.run_state),
                    "undo_run": (!c.undo_run_id.is_empty()).then_some(&c.undo_run_id),
                    "made_unix_ms": (c.made_unix_ms > 0).then_some(c.made_unix_ms),
                    "age_seconds": (c.made_unix_ms > 0).then_some(c.age_seconds),
                });
                if prune {
                    v["decision"] = c.decision.clone().into();
                    v["reason"] = c.reason.clone().into();
                }
                v
            })
            .collect();
        let out = serde_json::json!({ "copies": copies, "problems": listing.problems });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for p in &listing.problems {
        eprintln!("warning: {p}");
    }
    if listing.copies.is_empty() {
        outln!("no kept copies");
        return Ok(());
    }
    outln!(
        "{:<16} {:<36} {:>10} {:>10}  RUN",
        "KIND",
        "NAME",
        "SIZE",
        "AGE"
    );
    let mut total = 0;
    for c in &listing.copies {
        total += c.bytes;
        let age = if c.made_unix_ms > 0 {
            humantime::format_duration(Duration::from_secs(c.age_seconds / 60 * 60)).to_string()
        } else {
            "unknown".to_owned()
        };
        let age = if age.is_empty() || age == "0s" {
            "<1m".to_owned()
        } else {
            age
        };
        let mut run = if c.run_id.is_empty() {
            format!("unknown (tag {})", c.tag)
        } else {
            format!("{} ({})", c.run_id, c.run_state)
        };
        if !c.undo_run_id.is_empty() {
            run.push_str(&format!(", undo {}", c.undo_run_id));
        }
        if c.sessions > 0 {
            run.push_str(&format!(", {} session(s)", c.sessions));
        }
        outln!(
            "{:<16} {:<36} {:>10} {:>10}  {run}",
            c.kind,
            c.name,
            human::bytes(c.bytes),
            age
        );
        if prune {
            let decision = match c.decision.as_str() {
                "prune" => "would prune".to_owned(),
                "pruned" => "PRUNED".to_owned(),
                "keep" => format!("kept: {}", c.reason),
                "failed" => format!("NOT PRUNED: {}", c.reason),
                other => other.to_owned(),
            };
            outln!("{:<16} └ {decision}", "");
        }
    }
    let of = |decision: &str| -> u64 {
        listing
            .copies
            .iter()
            .filter(|c| c.decision == decision)
            .map(|c| c.bytes)
            .sum()
    };
    match mode {
        Mode::List => outln!("total {}", human::bytes(total)),
        Mode::DryRun => outln!(
            "would free {} (dry run: nothing deleted)",
            human::bytes(of("prune"))
        ),
        Mode::Prune => outln!("freed {}", human::bytes(of("pruned"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_durations_and_bad_ones_say_how_to_write_them() {
        assert_eq!(
            parse_age("7d").expect("7d"),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            parse_age("36h").expect("36h"),
            Duration::from_secs(36 * 3600)
        );
        let err = parse_age("week").expect_err("not a duration").to_string();
        assert!(
            err.contains("--older-than \"week\"") && err.contains("7d"),
            "{err}"
        );
        let err = parse_age("0s").expect_err("zero").to_string();
        assert!(err.contains("zero"), "{err}");
    }
}
