//! `rollcall demo` end to end: the real binary builds a throwaway fleet, runs the default plan
//! as a drill, and must exit 0 with a report whose numbers agree — and leave no process behind.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use e2e::*;

#[test]
fn the_demo_passes_reports_its_numbers_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let out = Command::new(rollcall_bin())
        .args(["demo", "--sessions", "12", "--dir", fleet.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("succeeded"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.join("summary.json")).unwrap()).unwrap();
    assert_eq!(report["state"], "succeeded");
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        report["pre_restore_database"]
            .as_str()
            .unwrap()
            .starts_with("cowork_pre_r")
    );
    let counts = &report["counts"];
    let point = counts["point"].as_object().unwrap();
    assert!(point["sessions"].as_i64().unwrap() >= 12, "{counts}");
    // Verification counted exactly the point's rows after the restore.
    assert_eq!(counts["after"], counts["point"], "{counts}");
    // The disaster deleted the projections (a worker may have rebuilt one since).
    assert!(
        counts["before"]["session_projections"].as_i64().unwrap()
            < point["session_projections"].as_i64().unwrap(),
        "{counts}"
    );
    // The drill report, filled from the journal.
    let markdown = std::fs::read_to_string(fleet.join("report.md")).unwrap();
    assert!(
        markdown.starts_with("# Restore drill report: demo"),
        "{markdown}"
    );
    for needle in [
        "| restore-postgres | passed |",
        "cowork_pre_r",
        "quarantine/r",
        "cookie-secret",
        "platform-team",
    ] {
        assert!(
            markdown.contains(needle),
            "{needle} is missing from the report:\n{markdown}"
        );
    }
    let drill: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.join("report.json")).unwrap()).unwrap();
    assert_eq!(drill["environment"]["name"], "demo", "{drill}");

    // Nothing the demo started is still running: no process naming its directory (the
    // coordinator, agents, Postgres) and no role the agents ran (`rollcall cowork-sim ...`).
    let roles = format!("{} cowork-sim", rollcall_bin().display());
    for pattern in [fleet.to_str().unwrap(), roles.as_str()] {
        let left = Command::new("pgrep")
            .args(["-af", pattern])
            .output()
            .unwrap();
        assert!(
            left.stdout.is_empty(),
            "left running: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}
