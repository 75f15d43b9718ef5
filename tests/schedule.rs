//! Scheduled backups end to end with real processes: a coordinator whose environment backs up
//! every few seconds (`backup_schedule`), a database agent over a throwaway Postgres cluster
//! holding cowork-sim's data and an objects agent over a file:// store. Without any operator
//! command, points appear, each complete (a verified dump and snapshot), the newest point's
//! age and the last backup's verdict are served as metrics, and a `[[notify]]` webhook hears of
//! each backup, signed.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use e2e::*;

/// The environment's drill plan (never run here): the default plan names roles this fleet
/// does not have, and a plan must hold against the declared fleet.
const PLAN: &str = include_str!("plans/data-only.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_write_points_without_an_operator() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    cluster.create_database("cowork").unwrap();
    let db_url = cluster.url("cowork");
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    let objects_url = format!("file://{}", objects.display());
    let data_env = [
        ("DATABASE_URL", db_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];
    cowork(&["migrate"], &data_env);
    cowork(&["seed", "--sessions", "3"], &data_env);

    let certs = certs_init(dir.path(), &["db-1:database", "obj-1:objects"]);
    let repo = dir.path().join("repository");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let (agents_addr, operator_addr, metrics_addr) = (free_addr(), free_addr(), free_addr());
    let env = format!(
        r#"
[environments.test]
rpo = "1h"
rto = "1h"
retention = "7days"
repository = "file://{repo}"
backup_schedule = "*/3 * * * * *"
plan = "{plan}"
fleet = {{ database = 1, objects = 1 }}
"#,
        repo = repo.display(),
        plan = plan.display(),
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[tls]",
        &format!("metrics = \"{metrics_addr}\"\n\n[tls]"),
        1,
    );
    std::fs::write(&config, text).unwrap();

    // A webhook for finished runs, its secret from the coordinator's environment. Named but
    // unset, the coordinator refuses to start, saying which table and what to do.
    let receiver = WebhookReceiver::start(0, false).await;
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[notify]]\nurl = \"{}\"\nevents = [\"run.finished\"]\n\
         secret = \"env:ROLLCALL_TEST_WEBHOOK_SECRET\"\n",
        receiver.url()
    ));
    std::fs::write(&config, text).unwrap();
    // Unset here whatever the shell running the tests has, or the coordinator would start.
    let refused = Command::new(rollcall_bin())
        .args(["coordinator", "--config", config.to_str().unwrap()])
        .env_remove("ROLLCALL_TEST_WEBHOOK_SECRET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "notify[0].secret \"env:ROLLCALL_TEST_WEBHOOK_SECRET\": \
                         ROLLCALL_TEST_WEBHOOK_SECRET is not set in the coordinator's environment"
        ) && stderr.contains("set ROLLCALL_TEST_WEBHOOK_SECRET for the coordinator"),
        "{stderr}"
    );
    let secret = "scheduled-backup-webhook-secret";

    let spawn = |name: &str, args: &[&str]| spawn_rollcall(name, dir.path(), args, &data_env);
    let _coordinator = spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &[("ROLLCALL_TEST_WEBHOOK_SECRET", secret)],
    );
    let mut agents = Vec::new();
    for (name, role, extra) in [
        (
            "db-1",
            "database",
            "[postgres]\nurl_env = \"DATABASE_URL\"\n".to_owned(),
        ),
        (
            "obj-1",
            "objects",
            format!("[objects]\nurl = \"{objects_url}\"\n"),
        ),
    ] {
        let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, &extra);
        agents.push(spawn(name, &["agent", "--config", cfg.to_str().unwrap()]));
    }

    // Two scheduled backups finish on their own; each point holds a dump and a snapshot.
    let points = eventually(
        "two scheduled backups to write their points",
        Duration::from_secs(90),
        async || {
            let listed = std::fs::read_dir(repo.join("points")).ok()?;
            let ids: Vec<String> = listed
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_owned)
                })
                .collect();
            (ids.len() >= 2).then_some(ids)
        },
    )
    .await;
    for id in &points {
        let out = rollcall(&[
            "repo",
            "verify",
            "--repo",
            &format!("file://{}", repo.display()),
            "--point",
            id,
        ]);
        assert!(
            out.status.success(),
            "point {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let point: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo.join(format!("points/{id}.json"))).unwrap())
                .unwrap();
        assert!(
            point["body"]["postgres"]["table_counts"]["sessions"]
                .as_i64()
                .is_some_and(|n| n >= 3),
            "{point}"
        );
        assert!(
            point["body"]["objects"]["snapshot_id"].is_string(),
            "{point}"
        );
    }

    // The runs were backups nobody asked for, and the newest point's age is a metric. A run is
    // marked succeeded just after its point is written, so the count is polled too.
    let list_runs = || {
        let runs = rollcall(&[
            "runs",
            "--json",
            "--coordinator",
            &format!("https://{operator_addr}"),
            "--certs",
            certs.to_str().unwrap(),
        ]);
        assert!(
            runs.status.success(),
            "{}",
            String::from_utf8_lossy(&runs.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&runs.stdout).unwrap()
    };
    eventually_explained(
        "two scheduled backup runs to succeed",
        Duration::from_secs(30),
        async || {
            let succeeded = list_runs()
                .as_array()?
                .iter()
                .filter(|r| r["kind"] == "backup" && r["state"] == "succeeded")
                .count();
            (succeeded >= 2).then_some(())
        },
        || list_runs().to_string(),
    )
    .await;
    let age = eventually(
        "the newest point's age as a metric",
        Duration::from_secs(30),
        async || {
            let text = http_get(metrics_addr, "/metrics").await.ok()?;
            text.lines()
                .find(|l| l.starts_with("rollcall_newest_point_age_seconds{environment=\"test\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        },
    )
    .await;
    assert!((0.0..60.0).contains(&age), "age {age}");
    let text = http_get(metrics_addr, "/metrics").await.unwrap();
    assert!(
        text.contains("rollcall_last_run_succeeded{environment=\"test\",kind=\"backup\"} 1\n"),
        "{text}"
    );

    // Each backup was told to the webhook: signed with the secret over timestamp.body, naming
    // the backup run and the point it wrote.
    let got = eventually(
        "two run.finished webhooks",
        Duration::from_secs(30),
        async || {
            let got = receiver.received();
            (got.len() >= 2).then_some(got)
        },
    )
    .await;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    for r in &got[..2] {
        let mut signed = format!("{}.", r.headers["x-rollcall-timestamp"]).into_bytes();
        signed.extend_from_slice(&r.body);
        let signature = r.headers["x-rollcall-signature"]
            .strip_prefix("sha256=")
            .unwrap();
        ring::hmac::verify(&key, &signed, &hex::decode(signature).unwrap())
            .expect("signed with the configured secret");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (
                &body["event"],
                &body["kind"],
                &body["state"],
                &body["environment"]
            ),
            (
                &"run.finished".into(),
                &"backup".into(),
                &"succeeded".into(),
                &"test".into()
            ),
            "{body}"
        );
        let point = body["point"].as_str().unwrap();
        assert!(
            repo.join(format!("points/{point}.json")).exists(),
            "the body names a point the backup wrote: {body}"
        );
    }

    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
}
