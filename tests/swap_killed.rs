//! The database agent SIGKILLed at each statement of a drill's swap, with real processes, real
//! Postgres and mTLS: however it dies, the live database accepts connections once the agent is
//! back, the coordinator re-sends the same command, and the drill finishes with the point
//! swapped in exactly once and the replaced database kept.
//!
//! The agent is stopped at a statement from outside: a superuser's open transaction that has
//! updated the database's catalog row ([`HeldSession::holding_row`]) makes the agent's `ALTER DATABASE` of it
//! wait. Killed there, the agent's server-side statement either never happens (the test ends
//! the orphaned backend) or completes after the kill (the test releases the hold first).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::fleet::*;
use e2e::*;

fn databases(f: &Fleet, tag: &str) -> Vec<(String, bool)> {
    f.cluster
        .psql(
            "postgres",
            &format!(
                "SELECT datname, datallowconn FROM pg_database \
                 WHERE datname = 'cowork' OR datname LIKE 'cowork_%{tag}' ORDER BY datname"
            ),
        )
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(name, allow)| (name.to_owned(), allow == "t"))
        .collect()
}

fn terminate(f: &Fleet, pid: i32) {
    f.cluster
        .psql("postgres", &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
}

/// Runs `rollcall run watch ID` until a line contains `needle` (at most 60 s); returns what it
/// printed.
fn watch_until(f: &Fleet, id: &str, needle: &str) -> String {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(rollcall_bin())
        .args(["run", "watch", id, "--coordinator"])
        .arg(format!("https://{}", f.operator_addr))
        .arg("--certs")
        .arg(&f.certs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut out = String::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                if line.contains(needle) {
                    break Some(line);
                }
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    found.unwrap_or_else(|| panic!("run watch never printed {needle:?}; it printed:\n{out}"))
}

/// The live database takes connections again (the restarted agent reopens it when it starts).
async fn live_accepts_connections(f: &Fleet) {
    eventually(
        "the live database cowork accepts connections",
        Duration::from_secs(60),
        async || f.cluster.psql("cowork", "SELECT 1").ok(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_agent_killed_at_each_step_of_the_swap_leaves_the_database_reachable() {
    let mut f = Fleet::start().await;
    let backup = f.run(&["backup", "--env", "test", "--wait", "--json"]);
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let point: serde_json::Value = serde_json::from_slice(&backup.stdout).unwrap();
    let point = point["point"].as_str().unwrap().to_owned();
    let at_point: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.repo.join(format!("points/{point}.json"))).unwrap(),
    )
    .unwrap();
    let workflows_at_point = at_point["body"]["postgres"]["table_counts"]["workflows"]
        .as_i64()
        .unwrap();
    assert!(count(&f.cluster, "cowork", "session_projections") > 0);
    f.cluster
        .psql(
            "cowork",
            "DELETE FROM session_projections; DELETE FROM workflow_runs; DELETE FROM workflows",
        )
        .unwrap();

    // 1. Killed while blocking connections to the live database; the statement completes after
    //    the kill, so the live database is left refusing connections.
    let hold = HeldSession::holding_row(&f.cluster, "cowork").await;
    let started = f.run(&[
        "drill",
        "--env",
        "test",
        "--point",
        &point,
        "--exclude",
        "diagnostics bundles",
        "--json",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let run: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let tag = run_tag(&id);
    let (live, pre, restore) = (
        "cowork".to_owned(),
        format!("cowork_pre_{tag}"),
        format!("cowork_restore_{tag}"),
    );
    waiting_alter(&f.cluster, "ALLOW_CONNECTIONS false").await;
    f.kill_agent("db-1");
    // While the agent is down, `run watch` says what the phase waits for.
    let watched = watch_until(&f, &id, "waiting for db-1 (unavailable, last heard");
    assert!(
        watched.contains("phase commit-postgres running for"),
        "{watched}"
    );
    hold.release();
    eventually(
        "the orphaned ALTER DATABASE ... ALLOW_CONNECTIONS false to complete",
        Duration::from_secs(30),
        async || {
            (databases(&f, &tag) == [(live.clone(), false), (restore.clone(), true)]).then_some(())
        },
    )
    .await;
    assert!(f.cluster.psql("cowork", "SELECT 1").is_err());

    // 2. Restarted: the live database is reopened, and the re-sent swap renames it away, then
    //    is killed renaming the restored copy in. That rename never happens: no database has
    //    the live name.
    let hold = HeldSession::holding_row(&f.cluster, &restore).await;
    f.restart_agent("db-1");
    live_accepts_connections(&f).await;
    let pid = waiting_alter(&f.cluster, "RENAME TO").await;
    f.kill_agent("db-1");
    terminate(&f, pid);
    hold.release();
    assert_eq!(
        databases(&f, &tag),
        [(pre.clone(), false), (restore.clone(), true)],
        "the live database renamed away, nothing in its place"
    );

    // 3. Restarted: the live database gets its name back (the disaster's rows still in it), and
    //    the re-sent swap is killed at the same rename, which this time completes after the kill.
    let hold = HeldSession::holding_row(&f.cluster, &restore).await;
    f.restart_agent("db-1");
    live_accepts_connections(&f).await;
    assert_eq!(count(&f.cluster, "cowork", "session_projections"), 0);
    waiting_alter(&f.cluster, "RENAME TO").await;
    f.kill_agent("db-1");
    hold.release();
    eventually(
        "the orphaned rename to complete",
        Duration::from_secs(30),
        async || {
            (databases(&f, &tag) == [(live.clone(), true), (pre.clone(), false)]).then_some(())
        },
    )
    .await;

    // 4. Restarted: the swap is found done, the kept copy accepts connections again, and the
    //    drill finishes.
    f.restart_agent("db-1");
    let show = f.succeeded(&id, Duration::from_secs(180)).await;
    let commits: Vec<&serde_json::Value> = show["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "commit-postgres")
        .collect();
    assert_eq!(commits.len(), 1, "one swap command, re-sent: {commits:?}");
    assert_eq!(commits[0]["outcome"], "succeeded");
    assert_eq!(
        databases(&f, &tag),
        [(live.clone(), true), (pre.clone(), true)],
        "the point live, the replaced database kept and readable"
    );
    assert!(workflows_at_point > 0);
    assert_eq!(count(&f.cluster, "cowork", "workflows"), workflows_at_point);
    assert_eq!(
        count(&f.cluster, &pre, "workflows"),
        0,
        "the disaster, kept"
    );

    // The drill passed, and its report tells the agent lost and back three times, in order.
    let report = f.run(&["report", &id, "--format", "json"]);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let seen: Vec<(&str, &str)> = report["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "agent lost" || i["kind"] == "agent back")
        .map(|i| (i["kind"].as_str().unwrap(), i["agent"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [("agent lost", "db-1"), ("agent back", "db-1")].repeat(3),
        "{report}"
    );
    // What the operator excluded at the start travelled with the run (CLI → StartRun → params).
    assert_eq!(
        report["excluded"][0], "diagnostics bundles (declared by the operator)",
        "{report}"
    );
    let markdown = f.run(&["report", &id]);
    let markdown = String::from_utf8_lossy(&markdown.stdout);
    assert!(
        markdown.contains("| agent lost |  | db-1 | database agent unavailable: "),
        "{markdown}"
    );
    assert!(
        markdown.contains("| Incidents | 3 agent lost, 3 agent back"),
        "{markdown}"
    );
    f.stop();
}
