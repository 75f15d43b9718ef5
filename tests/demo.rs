//! `rollcall demo` end to end: the real binary builds a throwaway fleet, runs the default plan
//! as a drill, and must exit 0 with a report whose numbers agree — and leave no process behind.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::*;

/// One demo at a time: the clean-up check looks for any role process of the binary, which a
/// kept fleet of the other test would be.
static ONE_DEMO: Mutex<()> = Mutex::new(());

/// The processes whose command line names `pattern`.
fn running(pattern: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-af", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `rollcall demo ARGS`; its standard output, once it has exited 0.
fn demo(args: &[&str]) -> String {
    let out = Command::new(rollcall_bin())
        .arg("demo")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_passes_reports_its_numbers_and_cleans_up() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let stdout = demo(&["--sessions", "12", "--dir", fleet.to_str().unwrap()]);
    assert!(stdout.contains("succeeded"), "{stdout}");
    // The restore test before the drill: the same point, into demo-restore-test, torn down.
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    assert!(
        last.contains("restore test drill-demo-restore-test-") && last.ends_with(" succeeded"),
        "{stdout}"
    );
    let tested: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.join("restore-test-report.json")).unwrap())
            .unwrap();
    let rt = &tested["restore_test"];
    assert_eq!(
        (
            &rt["source"],
            &rt["target"],
            &rt["source_untouched"],
            &rt["teardown"]
        ),
        (
            &"demo".into(),
            &"demo-restore-test".into(),
            &true.into(),
            &"done".into()
        ),
        "{tested}"
    );
    assert_eq!(
        rt["agents_commanded"],
        serde_json::json!(["rt-database-1", "rt-objects-1"]),
        "{tested}"
    );
    // Verification counted the point's rows in the target.
    let counts = tested["counts"].as_array().unwrap();
    assert!(
        !counts.is_empty() && counts.iter().all(|c| c["matches_point"] == true),
        "{tested}"
    );

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
    // Verification counted exactly the point's rows after the restore, BYOK metadata and
    // billing state among them (the runbook's step 7).
    assert_eq!(counts["after"], counts["point"], "{counts}");
    assert!(point["byok_secrets"].as_i64().unwrap() > 0, "{counts}");
    assert!(
        point.keys().any(|k| k.starts_with("subscriptions[status=")),
        "{counts}"
    );
    assert!(point.contains_key("usage_events"), "{counts}");
    // The disaster (projections deleted) and the traffic served since the point (the load
    // runs until the freeze, and Postgres is prepared before it) changed the live rows: the
    // restore had something to undo. How many projections the worker rebuilt by the count
    // before the freeze depends on timing, so only the difference is asserted.
    assert_ne!(counts["before"], counts["point"], "{counts}");
    // The drill report, filled from the journal.
    let markdown = std::fs::read_to_string(fleet.join("report.md")).unwrap();
    assert!(
        markdown.starts_with("# Restore drill report: demo"),
        "{markdown}"
    );
    for needle in [
        // Postgres is prepared while traffic is served and swapped in after the freeze.
        "| prepare-postgres | passed |",
        "| commit-postgres | passed |",
        "| Freeze window (writes off) |",
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
    // The runbook's step 6: each of its endpoints answered web-1's verification.
    let web_checks: Vec<&str> = drill["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["agent"] == "web-1" && c["kind"] == "http" && c["passed"] == true)
        .filter_map(|c| c["detail"].as_str())
        .collect();
    for endpoint in [
        "/healthz",
        "/api/workspace",
        "/api/diagnostics",
        "/api/metrics",
    ] {
        let answered = format!("GET {endpoint} answered 200");
        assert!(
            web_checks.iter().any(|d| d.starts_with(&answered)),
            "{endpoint} was not verified: {web_checks:?}"
        );
    }
    // A smoke command's JSON is one compact line in the report.
    let smoke = drill["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "smoke" && c["agent"] == "worker-1")
        .unwrap_or_else(|| panic!("no worker smoke in {drill}"));
    let detail = smoke["detail"].as_str().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(detail).unwrap();
    assert!(
        parsed["role"] == "worker" && !detail.contains(": ") && !detail.contains('\n'),
        "{smoke}"
    );

    // The demo's web role exits when its database connection is terminated (as real services
    // do): the default plan stops it before the swap, so it never did.
    fn logs(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                logs(&path, out);
            } else if path.extension().is_some_and(|e| e == "log") {
                out.push(path);
            }
        }
    }
    let mut found = Vec::new();
    logs(&fleet, &mut found);
    assert!(!found.is_empty(), "the demo keeps its logs");
    let crashed: Vec<_> = found
        .iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .is_ok_and(|text| text.contains("ended this web role's connection"))
        })
        .collect();
    assert!(crashed.is_empty(), "web lost its connection: {crashed:?}");
    let web = std::fs::read_to_string(fleet.join("web-1.toml")).unwrap();
    assert!(web.contains("\"--exit-on-db-loss\""), "{web}");

    // Nothing the demo started is still running: no process naming its directory (the
    // coordinator, agents, Postgres) and no role the agents ran (`rollcall cowork-sim ...`).
    let roles = format!("{} cowork-sim", rollcall_bin().display());
    for pattern in [fleet.to_str().unwrap(), roles.as_str()] {
        let left = running(pattern);
        assert!(left.is_empty(), "left running: {left}");
    }
}

/// Stops a kept fleet as the demo says to (`pkill -f DIR`), also when the test fails.
struct KeptFleet(String);

impl Drop for KeptFleet {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-f", &self.0]).status();
    }
}

/// `--keep` leaves the whole fleet running, Postgres included: the printed coordinator takes
/// another backup through its agents, and the printed stop command stops every process.
#[test]
fn a_kept_demo_fleet_keeps_working_until_stopped_as_printed() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("kept");
    let fleet_dir = fleet.to_str().unwrap().to_owned();
    let kept = KeptFleet(fleet_dir.clone());
    let stdout = demo(&["--sessions", "4", "--keep", "--dir", &fleet_dir]);
    assert!(
        stdout.contains(&format!("(stop it with: pkill -f {fleet_dir})")),
        "{stdout}"
    );
    let coordinator = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ROLLCALL_COORDINATOR="))
        .unwrap_or_else(|| panic!("no coordinator address printed: {stdout}"))
        .to_owned();
    let env = [
        ("ROLLCALL_COORDINATOR".to_owned(), coordinator),
        (
            "ROLLCALL_CERTS".to_owned(),
            fleet.join("certs").display().to_string(),
        ),
    ];
    assert!(
        running(&format!("postgres -D {fleet_dir}")).contains("postgres"),
        "the demo's Postgres is not running"
    );

    ok(
        &rollcall_with_env(&["backup", "--env", "demo", "--wait"], &env),
        "a backup on the kept fleet",
    );
    let points = ok(
        &rollcall_with_env(&["points", "--env", "demo", "--json"], &env),
        "points",
    );
    assert_eq!(points["points"].as_array().unwrap().len(), 2, "{points}");

    drop(kept);
    let until = Instant::now() + Duration::from_secs(60);
    let roles = format!("{} cowork-sim", rollcall_bin().display());
    loop {
        let left = running(&fleet_dir) + &running(&roles);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "still running after pkill: {left}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
