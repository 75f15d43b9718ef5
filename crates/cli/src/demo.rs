//! `rollcall demo`: the whole runbook on one machine — a throwaway Postgres, a file:// object
//! store and repository, the coordinator and one agent per role (web, two workers, scheduler,
//! gateway, database, objects) as real processes over mTLS, each agent supervising its
//! cowork-sim role. Seeds data, writes through web, takes a recovery point, restores it in a
//! restore test into `demo-restore-test` (another database on the cluster, another directory),
//! verifies it and tears it down while demo keeps serving; then keeps writing, breaks things,
//! and runs the default plan as a drill in place. Exit 0 only when both passed. Every process it starts is stopped on the way out (Ctrl-C and failures included)
//! unless `--keep`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::model::{ActionOutput, AgentName, Role};
use api::pb::operator as op;

use crate::operator::{Connection, status_error};

pub struct DemoArgs {
    pub dir: Option<PathBuf>,
    pub keep: bool,
    pub sessions: u64,
}

const FLEET: [(&str, &str); 9] = [
    ("web-1", "web"),
    ("worker-1", "worker"),
    ("worker-2", "worker"),
    ("scheduler-1", "scheduler"),
    ("gateway-1", "gateway"),
    ("database-1", "database"),
    ("objects-1", "objects"),
    // demo-restore-test's: another database on the cluster, another directory.
    ("rt-database-1", "database"),
    ("rt-objects-1", "objects"),
];

/// The restore-test environment of the demo (`restore_from = "demo"`) and its targets.
const RESTORE_TEST_ENV: &str = "demo-restore-test";
const RESTORE_TEST_DB: &str = "cowork_restore_test";

/// Which environment an agent of [`FLEET`] belongs to.
fn environment_of(name: &str) -> &'static str {
    if name.starts_with("rt-") {
        RESTORE_TEST_ENV
    } else {
        "demo"
    }
}

/// Child processes, stopped (SIGTERM, then SIGKILL) when dropped unless kept.
struct Fleet {
    procs: Vec<(String, Child)>,
    keep: bool,
}

impl Fleet {
    fn spawn(&mut self, name: &str, logs: &Path, mut cmd: Command) -> Result<()> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))
            .with_context(|| format!("create the log of {name}"))?;
        let err = log.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        self.procs.push((name.to_owned(), child));
        Ok(())
    }

    fn stop(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, child) = self.procs.remove(i);
            terminate(child);
        }
    }
}

fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Agents first (they stop the roles they supervise), the coordinator last.
        while let Some((_, child)) = self.procs.pop() {
            terminate(child);
        }
    }
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("find a free loopback port")?;
    Ok(l.local_addr()?)
}

fn say(step: &str) {
    outln_lossy!("==> {step}");
}

/// Runs the embedded cowork-sim (`rollcall cowork-sim ...`) and returns its JSON output.
fn sim(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<serde_json::Value> {
    let out = Command::new(exe)
        .arg("cowork-sim")
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("run cowork-sim {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "cowork-sim {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("find the rollcall binary")?;
    let (dir, temp) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            (d.canonicalize()?, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("rollcall-demo-")
                .tempdir()
                .context("create a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut fleet = Fleet {
        procs: Vec::new(),
        keep: false,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    let outcome = tokio::select! {
        r = demo(&exe, &dir, &args, &mut fleet) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopping every process the demo started")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated; stopping every process the demo started")),
    };
    match (&outcome, args.keep) {
        (Ok(_), true) => {
            fleet.keep = true;
            outln_lossy!(
                "\nthe fleet keeps running in {} (stop it with: pkill -f {}):\n  \
                 export ROLLCALL_COORDINATOR={} ROLLCALL_CERTS={}\n  rollcall agents\n  \
                 rollcall runs\n  rollcall points --env demo",
                dir.display(),
                dir.display(),
                outcome
                    .as_ref()
                    .map(|o| o.operator_url.clone())
                    .unwrap_or_default(),
                dir.join("certs").display()
            );
            if let Some(t) = temp {
                let _ = t.keep();
            }
        }
        _ => {
            drop(fleet);
            if args.dir.is_none()
                && let Some(t) = temp
                && outcome.is_err()
            {
                // Keep the logs of a failed demo for whoever reads the error.
                let kept = t.keep();
                eprintln!("logs kept in {}", kept.join("logs").display());
            }
        }
    }
    let Outcome {
        run_id,
        state,
        reason,
        cluster,
        restore_test: (test_id, test_state, test_reason),
        ..
    } = outcome?;
    if args.keep {
        cluster.leave_running();
    } else {
        // After the fleet: the roles and agents using it are gone.
        drop(cluster);
    }
    outln_lossy!(
        "\ndemo finished in {:.1}s: drill {run_id} {state}; restore test {test_id} {test_state}",
        started.elapsed().as_secs_f64(),
    );
    if state != "succeeded" {
        bail!("the drill did not pass: {reason}");
    }
    if test_state != "succeeded" {
        bail!("the restore test did not pass: {test_reason}");
    }
    Ok(())
}

struct Outcome {
    /// The restore test's run, its state and reason.
    restore_test: (String, String, String),
    run_id: String,
    state: String,
    reason: String,
    operator_url: String,
    /// The demo's Postgres: stopped after the fleet, or left running with it (`--keep`).
    cluster: ephemeral_pg::Cluster,
}

async fn demo(exe: &Path, dir: &Path, args: &DemoArgs, fleet: &mut Fleet) -> Result<Outcome> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    say("starting a throwaway PostgreSQL cluster");
    let cluster = ephemeral_pg::Cluster::start_with(ephemeral_pg::Options {
        dir: Some(dir.join("postgres")),
        settings: Vec::new(),
    })
    .context("start PostgreSQL for the demo")?;
    cluster.create_database("cowork")?;
    // The restore test's target: an empty database the point is swapped into, then out.
    cluster.create_database(RESTORE_TEST_DB)?;
    let db_url = cluster.url("cowork");
    let rt_db_url = cluster.url(RESTORE_TEST_DB);
    let rt_objects = dir.join("objects-restore-test");
    std::fs::create_dir_all(&rt_objects)?;
    let rt_objects_url = format!("file://{}", rt_objects.display());
    let objects = dir.join("objects");
    let repository = dir.join("repository");
    std::fs::create_dir_all(&objects)?;
    std::fs::create_dir_all(&repository)?;
    let objects_url = format!("file://{}", objects.display());
    let data_env = [
        ("DATABASE_URL", db_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];

    say(&format!(
        "seeding cowork-sim with {} sessions",
        args.sessions
    ));
    sim(exe, &["migrate"], &data_env)?;
    let tokens_file = dir.join("tokens.json");
    let sessions = args.sessions.to_string();
    sim(
        exe,
        &[
            "seed",
            "--sessions",
            &sessions,
            "--tokens-out",
            tokens_file.to_str().unwrap_or_default(),
        ],
        &data_env,
    )?;
    let tokens: serde_json::Value = serde_json::from_slice(&std::fs::read(&tokens_file)?)?;
    let operator_token = tokens["operator"]["token"]
        .as_str()
        .context("the seed wrote no operator token")?
        .to_owned();
    let desktop_token = tokens["desktop"][0]["token"]
        .as_str()
        .context("the seed wrote no desktop token")?
        .to_owned();

    say("creating certificates (the same code as `rollcall certs init`)");
    let certs = dir.join("certs");
    let agents = FLEET
        .iter()
        .map(|(n, r)| Ok((AgentName::parse(n)?, Role::parse(r)?)))
        .collect::<Result<Vec<_>>>()?;
    coordinator::certs::init(&coordinator::certs::InitRequest {
        dir: certs.clone(),
        agents,
        coordinator_hosts: Vec::new(),
        operator: "demo-operator".into(),
        operators: Vec::new(),
    })?;

    let (agents_addr, operator_addr, web_addr) = (free_port()?, free_port()?, free_port()?);
    let sink = dir.join("sink.jsonl");
    let config = dir.join("rollcall.toml");
    std::fs::write(
        &config,
        format!(
            r#"[listen]
agents = "{agents_addr}"
operator = "{operator_addr}"

[tls]
ca = "certs/ca.pem"
cert = "certs/coordinator.pem"
key = "certs/coordinator-key.pem"

[state]
url = "sqlite://state.db"

[agents]
heartbeat_interval = "500ms"
timeout = "5s"

[environments.demo]
rpo = "24h"
rto = "15m"
retention = "7days"
repository = "file://{repository}"
fleet = {{ web = 1, worker = 2, scheduler = 1, gateway = 1, database = 1, objects = 1 }}

# cowork-sim's runbook rows (deploy/cowork-sim/rollcall.toml).
[environments.demo.report]
{report_rows}

[[environments.demo.secret]]
name = "cookie-secret"
manager = "vault"
reference = "kv/cowork/demo/cookie"
version = "3"

# A restore test of demo: its points restored into another database and directory, verified,
# then torn down; demo's own agents get no command.
[environments.{RESTORE_TEST_ENV}]
rpo = "24h"
rto = "15m"
retention = "7days"
restore_from = "demo"
fleet = {{ database = 1, objects = 1 }}

[environments.{RESTORE_TEST_ENV}.report]
{report_rows}
"#,
            repository = repository.display(),
            report_rows = cowork_example(
                COWORK_COORDINATOR,
                &["environments", "staging", "report", "rows"]
            )?,
        ),
    )?;

    say(
        "starting the coordinator and nine agents (mTLS on loopback; two of them serve the restore test)",
    );
    let mut cmd = Command::new(exe);
    cmd.args(["coordinator", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info");
    fleet.spawn("coordinator", &logs, cmd)?;
    let exe_s = exe.display().to_string();
    for (name, role) in FLEET {
        let environment = environment_of(name);
        let restore_test = environment == RESTORE_TEST_ENV;
        let (agent_db_url, agent_objects_url) = if restore_test {
            (rt_db_url.as_str(), rt_objects_url.as_str())
        } else {
            (db_url.as_str(), objects_url.as_str())
        };
        let mut extra = agent_extra(
            role,
            &exe_s,
            web_addr,
            &sink,
            agent_db_url,
            agent_objects_url,
        )?;
        if restore_test {
            // Only the restore test's agents obey a teardown; demo's refuse one.
            extra = extra.replace("scratch/objects", "scratch/rt-objects")
                + "\n[restore_test]\nteardown = true\n";
        }
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"name = "{name}"
role = "{role}"
environment = "{environment}"
state_dir = "state/{name}"

[coordinator]
url = "https://{agents_addr}"
server_name = "localhost"

[tls]
ca = "certs/ca.pem"
cert = "certs/agents/{name}.pem"
key = "certs/agents/{name}-key.pem"

[reconnect]
initial = "100ms"
max = "2s"
{extra}"#
            ),
        )?;
        let mut cmd = Command::new(exe);
        cmd.args(["agent", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("DATABASE_URL", agent_db_url)
            .env("OBJECT_STORE_URL", agent_objects_url)
            .env("COWORK_OPERATOR_TOKEN", &operator_token);
        fleet.spawn(name, &logs, cmd)?;
    }
    let connection = Connection {
        coordinator: format!("https://{operator_addr}"),
        certs: Some(certs.clone()),
        operator: None,
        ca: None,
        server_name: None,
    };
    wait_ready(&connection, Duration::from_secs(90)).await?;

    say("writing through web (load), then taking a recovery point");
    let mut load = Command::new(exe);
    load.args([
        "cowork-sim",
        "load",
        "--web-url",
        &format!("http://{web_addr}"),
        "--rate",
        "20",
    ])
    .env("COWORK_TOKEN", &desktop_token)
    .env("RUST_LOG", "warn");
    fleet.spawn("load", &logs, load)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = connection.connect().await?;
    let backup = client
        .start_run(op::StartRunRequest {
            environment: "demo".into(),
            kind: "backup".into(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let backup_state = wait_run(&connection, &backup.id).await?;
    if backup_state.state != "succeeded" {
        bail!("the backup did not succeed: {}", backup_state.reason);
    }
    outln_lossy!("    recovery point {}", backup.point_id);

    say(&format!(
        "restore test first: the point restored into {RESTORE_TEST_ENV} (another database and \
         directory), verified, torn down, while demo keeps serving untouched"
    ));
    let test = client
        .start_run(op::StartRunRequest {
            environment: RESTORE_TEST_ENV.into(),
            kind: "drill".into(),
            point: "latest".into(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let tested = wait_run(&connection, &test.id).await?;
    let text = client
        .get_report(op::GetReportRequest {
            id: test.id.clone(),
            format: "json".into(),
            follow_ups: Vec::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .text;
    std::fs::write(dir.join("restore-test-report.json"), &text)?;
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let rt = &report["restore_test"];
    outln_lossy!(
        "    {} of point {} ({}): restored in {:.1}s, demo untouched: {}, teardown: {}",
        test.id,
        test.point_id,
        report["outcome"].as_str().unwrap_or("no report"),
        rt["restore_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        rt["source_untouched"].as_bool().unwrap_or(false),
        rt["teardown"].as_str().unwrap_or("unknown"),
    );

    say("writing for two more seconds, then the disaster: rows and objects deleted");
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.stop("load");
    let deleted_rows = cluster
        .psql(
            "cowork",
            "WITH d AS (DELETE FROM session_projections RETURNING 1) SELECT count(*) FROM d",
        )?
        .trim()
        .to_owned();
    let mut deleted_objects = 0;
    for entry in walk(&objects).into_iter().step_by(3) {
        if std::fs::remove_file(&entry).is_ok() {
            deleted_objects += 1;
        }
    }
    outln_lossy!("    deleted {deleted_rows} projections and {deleted_objects} objects");

    say("drill: the default plan, restoring the point");
    let drill = client
        .start_run(op::StartRunRequest {
            environment: "demo".into(),
            kind: "drill".into(),
            point: backup.point_id.clone(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stream = client
        .watch_run(op::WatchRunRequest {
            id: drill.id.clone(),
            after_seq: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        let p: serde_json::Value = serde_json::from_str(&event.payload_json).unwrap_or_default();
        match event.kind.as_str() {
            "phase.started" => outln_lossy!("    {:<18} …", p["phase"].as_str().unwrap_or("")),
            "phase.finished" => outln_lossy!(
                "    {:<18} {} in {:.1}s",
                p["phase"].as_str().unwrap_or(""),
                p["state"].as_str().unwrap_or(""),
                p["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
            ),
            _ => {}
        }
    }
    let result = wait_run(&connection, &drill.id).await?;
    summarize(dir, &drill.id, &backup.point_id, &cluster).await?;
    for (format, file) in [("md", "report.md"), ("json", "report.json")] {
        let text = client
            .get_report(op::GetReportRequest {
                id: drill.id.clone(),
                format: format.into(),
                follow_ups: vec!["rehearse the drill against staging data@platform-team".into()],
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .text;
        std::fs::write(dir.join(file), text)?;
    }
    outln_lossy!("    report: {}", dir.join("report.md").display());

    Ok(Outcome {
        restore_test: (test.id, tested.state, tested.reason),
        run_id: drill.id,
        state: result.state,
        reason: result.reason,
        operator_url: connection.coordinator,
        cluster,
    })
}

fn agent_extra(
    role: &str,
    exe: &str,
    web: SocketAddr,
    sink: &Path,
    db_url: &str,
    objects_url: &str,
) -> Result<String> {
    let _ = db_url;
    let sink = sink.display();
    Ok(match role {
        "web" => format!(
            r#"
[control]
scale = "process"
freeze = "http"
[control.process]
program = "{exe}"
# Like real services, web exits when its database connection is terminated: the drill must
# never terminate it (web is stopped before the swap, the runbook's step 3).
args = ["cowork-sim", "web", "--listen", "{web}", "--exit-on-db-loss"]
frozen_args = ["--maintenance"]
health_url = "http://{web}/readyz"
stop_grace = "5s"
[control.http]
url = "http://{web}/admin/maintenance"
token_env = "COWORK_OPERATOR_TOKEN"
[[check]]
name = "healthz"
url = "http://{web}/healthz"
[[check]]
name = "readyz"
url = "http://{web}/readyz"
[[check]]
name = "writes stay frozen while verifying"
url = "http://{web}/admin/maintenance"
token_env = "COWORK_OPERATOR_TOKEN"
expect = {{ maintenance = true }}
[[check]]
name = "operator workspace"
url = "http://{web}/api/workspace"
token_env = "COWORK_OPERATOR_TOKEN"
[[check]]
name = "operator diagnostics"
url = "http://{web}/api/diagnostics"
token_env = "COWORK_OPERATOR_TOKEN"
[[check]]
name = "operator metrics"
url = "http://{web}/api/metrics"
token_env = "COWORK_OPERATOR_TOKEN"
"#
        ),
        "worker" => format!(
            r#"
[control]
scale = "process"
[control.process]
program = "{exe}"
args = ["cowork-sim", "worker"]
stop_grace = "5s"
[smoke]
command = ["{exe}", "cowork-sim", "smoke", "worker", "--web-url", "http://{web}", "--timeout", "60s"]
timeout = "90s"
"#
        ),
        "scheduler" => format!(
            r#"
[control]
scale = "process"
[control.process]
program = "{exe}"
args = ["cowork-sim", "scheduler"]
stop_grace = "5s"
[smoke]
command = ["{exe}", "cowork-sim", "smoke", "scheduler", "--timeout", "60s"]
timeout = "90s"
"#
        ),
        "gateway" => format!(
            r#"
[control]
scale = "process"
[control.process]
program = "{exe}"
args = ["cowork-sim", "gateway", "--sink-jsonl", "{sink}"]
stop_grace = "5s"
[smoke]
command = ["{exe}", "cowork-sim", "smoke", "gateway", "--sink-jsonl", "{sink}", "--timeout", "60s"]
timeout = "90s"
"#
        ),
        "database" => {
            format!(
                "\n[postgres]\nurl_env = \"DATABASE_URL\"\n# cowork-sim's counts (deploy/cowork-sim/database.toml).\n{}\n",
                cowork_example(COWORK_DATABASE, &["postgres", "counts"])?
            ) + r#"[[invariant]]
name = "no projection ahead of its events"
sql = "SELECT p.session_id FROM session_projections p WHERE p.sequence > (SELECT coalesce(max(e.sequence), 0) FROM session_events e WHERE e.session_id = p.session_id)"
[[invariant]]
name = "no delivery cursor beyond its session's events"
sql = "SELECT c.binding_id FROM channel_session_bindings c WHERE c.last_event_sequence > (SELECT coalesce(max(e.sequence), 0) FROM session_events e WHERE e.session_id = c.session_id)"
[[reference]]
name = "artifact objects"
sql = "SELECT object_key FROM artifact_index"
"#
        }
        // Preflight keeps the blobs it proved beside the demo's other files.
        "objects" => format!(
            "\n[objects]\nurl = \"{objects_url}\"\nverify_ignore = [\"_probe/\"]\nscratch_dir = \"scratch/objects\"\n"
        ),
        _ => String::new(),
    })
}

/// cowork-sim's example configs, where its table names live: the demo takes its report rows
/// and counts from them rather than naming the tables again.
const COWORK_COORDINATOR: &str = include_str!("../../../deploy/cowork-sim/rollcall.toml");
const COWORK_DATABASE: &str = include_str!("../../../deploy/cowork-sim/database.toml");

/// `key = value` for the value at `path` of an example config, as TOML.
fn cowork_example(text: &str, path: &[&str]) -> Result<String> {
    let mut value = toml::Value::Table(text.parse().context("parse a cowork-sim example config")?);
    for key in path {
        value = value
            .get(key)
            .cloned()
            .with_context(|| format!("the cowork-sim example config lacks {}", path.join(".")))?;
    }
    Ok(format!(
        "{} = {value}",
        path.last().copied().unwrap_or_default()
    ))
}

async fn wait_ready(connection: &Connection, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        if let Ok(mut client) = connection.connect().await
            && let Ok(r) = client.list_agents(op::ListAgentsRequest {}).await
        {
            let agents = r.into_inner().agents;
            let ready = FLEET
                .iter()
                .filter(|(n, _)| agents.iter().any(|a| a.name == *n && a.ready))
                .count();
            if ready == FLEET.len() {
                return Ok(());
            }
            if Instant::now() > until {
                let missing: Vec<&str> = FLEET
                    .iter()
                    .filter(|(n, _)| !agents.iter().any(|a| a.name == *n && a.ready))
                    .map(|(n, _)| *n)
                    .collect();
                bail!(
                    "agents not ready after {}s: {} (see their logs)",
                    timeout.as_secs(),
                    missing.join(", ")
                );
            }
        } else if Instant::now() > until {
            bail!(
                "the coordinator did not answer within {}s (see logs/coordinator.log)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_run(connection: &Connection, id: &str) -> Result<op::Run> {
    let mut client = connection.connect().await?;
    loop {
        let run = client
            .get_run(op::GetRunRequest { id: id.to_owned() })
            .await
            .map_err(status_error)?
            .into_inner()
            .run
            .context("the coordinator sent a run without its record")?;
        if matches!(
            run.state.as_str(),
            "succeeded" | "failed" | "aborted" | "blocked"
        ) {
            return Ok(run);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts before / at the point / after, phase durations and the measured RTO, from the
/// coordinator's journal; written to DIR/summary.json (the drill report itself is report.md).
async fn summarize(
    dir: &Path,
    run_id: &str,
    point: &str,
    cluster: &ephemeral_pg::Cluster,
) -> Result<()> {
    let store =
        coordinator::store::open(&format!("sqlite://{}", dir.join("state.db").display())).await?;
    let run = store
        .run(run_id)
        .await?
        .context("the drill is not in the journal")?;
    let phases = store.phases(run_id).await?;
    let commands = store.commands(run_id).await?;
    let outputs = || {
        commands
            .iter()
            .filter_map(|(_, r)| r.as_ref().and_then(|r| r.output.as_ref()))
    };
    let before: BTreeMap<String, i64> = outputs()
        .find_map(|o| match o {
            ActionOutput::Preflight(p) => p.live_counts.clone(),
            _ => None,
        })
        .unwrap_or_default();
    let repository = repository::Repository::open(
        &format!("file://{}", dir.join("repository").display()),
        repository::RepositoryOptions::default(),
    )
    .await?;
    let at_point: BTreeMap<String, i64> = repository
        .read_point(&repository::PointId::parse(point)?)
        .await?
        .table_counts()
        .cloned()
        .unwrap_or_default();
    let verified: BTreeMap<String, i64> = outputs()
        .find_map(|o| match o {
            ActionOutput::Verify(v) => v.counts.clone(),
            _ => None,
        })
        .unwrap_or_default();
    let pre_db = outputs()
        .find_map(|o| match o {
            ActionOutput::RestorePostgres(r) | ActionOutput::CommitPostgres(r) => {
                Some(r.pre_restore_database.clone())
            }
            _ => None,
        })
        .unwrap_or_default();
    let rto = run
        .finished_at
        .map(|f| (f - run.created_at).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0);

    outln_lossy!("\n    {:<18} {:<8} {:>7}", "PHASE", "STATE", "SECONDS");
    for p in &phases {
        let secs = match (p.started_at, p.finished_at) {
            (Some(s), Some(f)) => (f - s).num_milliseconds() as f64 / 1000.0,
            _ => 0.0,
        };
        outln_lossy!("    {:<18} {:<8} {secs:>7.1}", p.name, p.state);
    }
    outln_lossy!(
        "\n    {:<38} {:>8} {:>8} {:>8}",
        "COUNT",
        "BEFORE",
        "POINT",
        "AFTER"
    );
    let show =
        |m: &BTreeMap<String, i64>, k: &str| m.get(k).map_or("-".to_owned(), |n| n.to_string());
    for key in at_point.keys() {
        outln_lossy!(
            "    {key:<38} {:>8} {:>8} {:>8}",
            show(&before, key),
            show(&at_point, key),
            show(&verified, key)
        );
    }
    let json = serde_json::json!({
        "run": run_id, "state": run.state.as_str(), "point": point, "rto_seconds": rto,
        "counts": { "before": before, "point": at_point, "after": verified },
        "pre_restore_database": pre_db,
    });
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(&json)?)?;
    let databases = cluster.psql(
        "postgres",
        "SELECT datname FROM pg_database WHERE datname LIKE 'cowork%' ORDER BY 1",
    )?;
    outln_lossy!(
        "\n    measured RTO {rto:.1}s; pre-restore database kept as {pre_db} (databases: {})",
        databases.split_whitespace().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_demo_takes_cowork_sims_rows_and_counts_from_its_example_configs() {
        let rows = cowork_example(
            COWORK_COORDINATOR,
            &["environments", "staging", "report", "rows"],
        )
        .expect("rows");
        let rows: toml::Table = rows.parse().expect("TOML");
        assert_eq!(rows["rows"].as_array().expect("array").len(), 8);
        let web: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let db = agent_extra("database", "rollcall", web, Path::new("/sink"), "", "").expect("db");
        let db: toml::Table = db.parse().expect("TOML");
        let counts = db["postgres"]["counts"].as_array().expect("counts");
        assert!(
            counts
                .iter()
                .any(|c| c.as_str() == Some("channel_deliveries:status"))
        );
        assert_eq!(db["invariant"].as_array().expect("invariants").len(), 2);
        let missing =
            cowork_example(COWORK_DATABASE, &["postgres", "nope"]).expect_err("no such key");
        assert!(
            missing.to_string().contains("lacks postgres.nope"),
            "{missing}"
        );
    }
}
