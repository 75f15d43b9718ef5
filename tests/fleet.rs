//! The fleet the restore and undo tests share (`tests/restore.rs`, `tests/undo.rs`): a
//! throwaway Postgres cluster with cowork-sim's data, a file:// object store and repository,
//! the `rollcall` coordinator and four agents over mTLS as real processes — web and worker
//! supervising real `cowork-sim` roles, a database agent and an objects agent.
//!
//! [`Fleet::start_real`] builds the same kind of fleet around cowork-sim's real profile
//! (`tests/real_profile.rs`): `cloud_` tables, no maintenance mode (writes are frozen at the
//! database), a scheduler agent, no gateway.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::*;

pub const PLAN: &str = include_str!("plans/data-restore.toml");

pub fn count(cluster: &ephemeral_pg::Cluster, db: &str, table: &str) -> i64 {
    cluster
        .psql(db, &format!("SELECT count(*) FROM {table}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub async fn maintenance(web: SocketAddr, token: &str) -> String {
    let (status, body) = http_request(web, "GET", "/admin/maintenance", Some(token), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The check of a drill report (`rollcall report ID --format json`) whose `key` is `value`.
pub fn report_check<'a>(
    report: &'a serde_json::Value,
    key: &str,
    value: &str,
) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[key] == value)
        .unwrap_or_else(|| panic!("no check with {key} {value:?} in {report}"))
}

/// The fleet the restore tests share: Postgres with cowork-sim data, a file:// object store
/// and repository, the coordinator and four agents as real processes.
pub struct Fleet {
    pub cluster: ephemeral_pg::Cluster,
    pub repo: std::path::PathBuf,
    pub objects: std::path::PathBuf,
    pub db_url: String,
    pub objects_url: String,
    pub operator_token: String,
    pub certs: std::path::PathBuf,
    pub config: std::path::PathBuf,
    pub operator_addr: SocketAddr,
    pub web_addr: SocketAddr,
    /// While this file exists, the database agent's pg_restore fails (a full disk, say): only
    /// with `Fleet::start_opts(.., true)`.
    pub pg_restore_fails: std::path::PathBuf,
    pub coordinator: Proc,
    pub agents: Vec<Proc>,
    /// The agents' names, in the order of `agents`.
    pub agent_names: Vec<String>,
    /// Each agent's environment when it is not the one every agent of [`Fleet::start`] gets
    /// (the real profile's: per role database URLs).
    pub agent_envs: std::collections::BTreeMap<String, Vec<(String, String)>>,
    // Last: removed after every process above has stopped.
    pub dir: tempfile::TempDir,
}

impl Fleet {
    pub async fn start() -> Fleet {
        Fleet::start_with("90s").await
    }

    /// A fleet whose worker smoke may take `smoke_timeout`.
    pub async fn start_with(smoke_timeout: &str) -> Fleet {
        Fleet::start_opts(smoke_timeout, false, &[]).await
    }

    /// `failing_pg_restore`: the database agent's Postgres tools are a directory whose
    /// pg_restore fails while `pg_restore_fails` exists. `clocks`: processes (by name:
    /// `coordinator`, `db-1`, ...) whose clock runs off by an offset (libfaketime's `+10m`).
    pub async fn start_opts(
        smoke_timeout: &str,
        failing_pg_restore: bool,
        clocks: &[(&str, &str)],
    ) -> Fleet {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let cluster = ephemeral_pg::Cluster::start().unwrap();
        cluster.create_database("cowork").unwrap();
        let db_url = cluster.url("cowork");
        let objects = dir.path().join("objects");
        let repo = dir.path().join("repository");
        std::fs::create_dir_all(&objects).unwrap();
        let objects_url = format!("file://{}", objects.display());
        let data_env = [
            ("DATABASE_URL", db_url.as_str()),
            ("OBJECT_STORE_URL", objects_url.as_str()),
        ];
        let (operator_token, token_file) = seed_service(dir.path(), &data_env, &[]);

        let certs = certs_init(
            dir.path(),
            &[
                "web-1:web",
                "worker-1:worker",
                "db-1:database",
                "obj-1:objects",
            ],
        );
        let plan = dir.path().join("plan.toml");
        std::fs::write(&plan, PLAN).unwrap();
        let (agents_addr, operator_addr, web_addr) = (free_addr(), free_addr(), free_addr());
        let env = format!(
            r#"
    [environments.test]
    rpo = "1h"
    rto = "1h"
    retention = "7days"
    repository = "file://{repo}"
    plan = "{plan}"
    fleet = {{ web = 1, worker = 1, database = 1, objects = 1 }}
    [[environments.test.secret]]
    name = "cookie-secret"
    manager = "vault"
    reference = "kv/cowork/cookie"
    version = "7"
    "#,
            repo = repo.display(),
            plan = plan.display()
        );
        let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
        let spawn = |name: &str, args: &[&str], env: &[(&str, &str)]| {
            let mut env = env.to_vec();
            if let Some((_, offset)) = clocks.iter().find(|(n, _)| *n == name) {
                env.extend([("LD_PRELOAD", libfaketime()), ("FAKETIME", *offset)]);
            }
            spawn_rollcall(name, dir.path(), args, &env)
        };
        let coordinator = spawn(
            "coordinator",
            &["coordinator", "--config", config.to_str().unwrap()],
            &[],
        );

        let sim = cowork_sim_bin();
        let web_control = format!(
            r#"
    [control]
    scale = "process"
    freeze = "http"
    [control.process]
    program = "{sim}"
    args = ["web", "--listen", "{web_addr}"]
    health_url = "http://{web_addr}/readyz"
    stop_grace = "5s"
    frozen_args = ["--maintenance"]
    [control.http]
    url = "http://{web_addr}/admin/maintenance"
    token_env = "COWORK_OPERATOR_TOKEN"
    [[check]]
    name = "readyz"
    url = "http://{web_addr}/readyz"
    [[check]]
    name = "operator diagnostics"
    url = "http://{web_addr}/api/diagnostics"
    token_file = "{token_file}"
    [[check]]
    name = "frozen while verified"
    url = "http://{web_addr}/admin/maintenance"
    token_env = "COWORK_OPERATOR_TOKEN"
    expect = {{ maintenance = true }}
    "#,
            sim = sim.display(),
            token_file = token_file.display(),
        );
        // The worker's smoke hangs while `hang-smoke` exists (a test of smoke timeouts).
        let hang = dir.path().join("hang-smoke");
        let worker_control = format!(
            "[control]\nscale = \"process\"\n[control.process]\nprogram = \"{sim}\"\nargs = [\"worker\"]\nstop_grace = \"5s\"\n\
             [smoke]\ncommand = [\"sh\", \"-c\", \"test -e {hang} && exec sleep 600; exec {sim} smoke worker --web-url http://{web_addr} --timeout 60s\"]\ntimeout = \"{smoke_timeout}\"\n",
            sim = sim.display(),
            hang = hang.display(),
        );
        let pg_restore_fails = dir.path().join("pg-restore-fails");
        let bin_dir = if failing_pg_restore {
            let bin = dir.path().join("pg-bin");
            std::fs::create_dir_all(&bin).unwrap();
            for entry in std::fs::read_dir(cluster.bin_dir()).unwrap() {
                let entry = entry.unwrap();
                if entry.file_name() != "pg_restore" {
                    std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
                }
            }
            let wrapper = bin.join("pg_restore");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh
if [ \"$1\" != --version ] && [ -e {switch} ]; then
  \
                     echo 'pg_restore: error: could not extend file: No space left on device' >&2
  \
                     exit 1
fi
exec {real} \"$@\"
",
                    switch = pg_restore_fails.display(),
                    real = cluster.bin_dir().join("pg_restore").display()
                ),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
            format!("bin_dir = \"{}\"\n", bin.display())
        } else {
            String::new()
        };
        let db_data = format!("\n    [postgres]\n    url_env = \"DATABASE_URL\"\n    {bin_dir}")
            + r#"
    [[invariant]]
    name = "no projection ahead of its events"
    sql = "SELECT p.session_id FROM session_projections p WHERE p.sequence > (SELECT coalesce(max(e.sequence), 0) FROM session_events e WHERE e.session_id = p.session_id)"
    [[invariant]]
    name = "no delivery cursor beyond its session's events"
    sql = "SELECT c.binding_id FROM channel_session_bindings c WHERE c.last_event_sequence > (SELECT coalesce(max(e.sequence), 0) FROM session_events e WHERE e.session_id = c.session_id)"
    [[reference]]
    name = "artifact objects"
    sql = "SELECT object_key FROM artifact_index"
    "#;
        // Scratch in the test's directory: other tests' objects agents are also named obj-1.
        let obj_data = format!(
            "[objects]\nurl = \"{objects_url}\"\nverify_ignore = [\"_probe/\"]\nscratch_dir = \"scratch/obj-1\"\n\
             scratch = \"always\"\n"
        );
        let agent_env = [
            ("DATABASE_URL", db_url.as_str()),
            ("OBJECT_STORE_URL", objects_url.as_str()),
            ("COWORK_OPERATOR_TOKEN", operator_token.as_str()),
        ];
        let mut agents = Vec::new();
        for (name, role, extra) in [
            ("web-1", "web", web_control.as_str()),
            ("worker-1", "worker", worker_control.as_str()),
            ("db-1", "database", db_data.as_str()),
            ("obj-1", "objects", obj_data.as_str()),
        ] {
            let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, extra);
            agents.push(spawn(
                name,
                &["agent", "--config", cfg.to_str().unwrap()],
                &agent_env,
            ));
        }
        let all = ["web-1", "worker-1", "db-1", "obj-1"];
        fleet_ready(
            operator_addr,
            &certs,
            &all,
            dir.path(),
            Duration::from_secs(60),
        )
        .await;
        Fleet {
            cluster,
            repo,
            objects,
            db_url,
            objects_url,
            operator_token,
            certs,
            config,
            operator_addr,
            web_addr,
            pg_restore_fails,
            coordinator,
            agents,
            agent_names: all.iter().map(|n| (*n).to_owned()).collect(),
            agent_envs: std::collections::BTreeMap::new(),
            dir,
        }
    }

    /// Stops the agents gracefully (they stop the roles they supervise), then the rest.
    pub fn stop(mut self) {
        for a in &mut self.agents {
            a.terminate(Duration::from_secs(10));
        }
    }

    /// A disaster's lost object: deletes from the live store the object of the first artifact
    /// row (by key), and returns its key.
    pub fn delete_first_artifact(&self) -> String {
        let artifact = self
            .cluster
            .psql(
                "cowork",
                "SELECT object_key FROM artifact_index ORDER BY object_key LIMIT 1",
            )
            .unwrap()
            .trim()
            .to_owned();
        std::fs::remove_file(self.objects.join(&artifact)).unwrap();
        artifact
    }

    /// An operator command against this fleet's coordinator.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let operator = format!("https://{}", self.operator_addr);
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&[
            "--coordinator",
            operator.as_str(),
            "--certs",
            self.certs.to_str().unwrap(),
        ]);
        rollcall(&all)
    }

    /// SIGKILLs the coordinator and starts a new one on the same config (same journal, same
    /// addresses): a crash and a restart.
    pub fn crash_and_restart_coordinator(&mut self) {
        self.coordinator.kill();
        let args = ["coordinator", "--config", self.config.to_str().unwrap()];
        self.coordinator = spawn_rollcall("coordinator-restarted", self.dir.path(), &args, &[]);
    }
}

impl Fleet {
    /// SIGKILLs the agent `name` (`web-1`, `worker-1`, `db-1` or `obj-1`): no clean-up runs.
    pub fn kill_agent(&mut self, name: &str) {
        self.agent(name).kill();
    }

    /// Starts the agent `name` again on its config and environment (after `kill_agent`).
    pub fn restart_agent(&mut self, name: &str) {
        let config = self.dir.path().join(format!("{name}.toml"));
        let args = ["agent", "--config", config.to_str().unwrap()];
        let env: Vec<(&str, &str)> = match self.agent_envs.get(name) {
            Some(env) => env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            None => vec![
                ("DATABASE_URL", self.db_url.as_str()),
                ("OBJECT_STORE_URL", self.objects_url.as_str()),
                ("COWORK_OPERATOR_TOKEN", self.operator_token.as_str()),
            ],
        };
        let restarted = spawn_rollcall(&format!("{name}-restarted"), self.dir.path(), &args, &env);
        *self.agent(name) = restarted;
    }

    /// Waits for run `id` to succeed and returns `run show --json` of it; panics naming the
    /// state and reason if it ends any other way.
    pub async fn succeeded(&self, id: &str, within: Duration) -> serde_json::Value {
        eventually(&format!("run {id} succeeded"), within, async || {
            let out = self.run(&["run", "show", id, "--json"]);
            let show: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            match show["run"]["state"].as_str()? {
                "succeeded" => Some(show),
                "blocked" | "failed" | "aborted" => panic!(
                    "run {id} ended {}: {}",
                    show["run"]["state"], show["run"]["reason"]
                ),
                _ => None,
            }
        })
        .await
    }

    fn agent(&mut self, name: &str) -> &mut Proc {
        let i = self
            .agent_names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no agent {name} in the fleet"));
        &mut self.agents[i]
    }
}

/// A `psql` session connected to a database, holding whatever its statements left open (a
/// transaction, locks) until [`HeldSession::release`] or drop.
pub struct HeldSession {
    psql: std::process::Child,
}

impl HeldSession {
    /// Connects to `database` as the cluster's superuser and runs `sql`; returns once the
    /// server shows every statement of it done.
    pub async fn open(cluster: &ephemeral_pg::Cluster, database: &str, sql: &str) -> HeldSession {
        use std::io::Write as _;
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Owned at once, so a failed step below ends it (Drop) instead of leaving a zombie.
        let mut held = HeldSession {
            psql: std::process::Command::new(cluster.bin_dir().join("psql"))
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(cluster.url(database))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        };
        let application = format!(
            "held-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The marker runs last: once the server shows it done, so is everything before it.
        writeln!(
            held.psql.stdin.as_mut().unwrap(),
            "SET application_name = '{application}';\n{sql}\nSELECT 'held-marker';"
        )
        .unwrap();
        held.psql.stdin.as_mut().unwrap().flush().unwrap();
        eventually(
            &format!("psql to run {sql:?} on {database}"),
            Duration::from_secs(20),
            async || {
                let done = cluster
                    .psql(
                        "postgres",
                        &format!(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = \
                             '{application}' AND state LIKE 'idle%' AND query LIKE '%held-marker%'"
                        ),
                    )
                    .ok()?;
                (done.trim() == "1").then_some(())
            },
        )
        .await;
        held
    }

    /// A superuser's open transaction that has updated `database`'s row in `pg_database` (a
    /// `GRANT CONNECT`), so any `ALTER DATABASE` of it waits until release: a way to stop the
    /// database agent at one statement of a swap, from outside, with real Postgres.
    pub async fn holding_row(cluster: &ephemeral_pg::Cluster, database: &str) -> HeldSession {
        let database = database.replace('"', "\"\"");
        HeldSession::open(
            cluster,
            "postgres",
            &format!("BEGIN;\nGRANT CONNECT ON DATABASE \"{database}\" TO PUBLIC;"),
        )
        .await
    }

    /// Rolls back what is open and ends the session: a waiting `ALTER DATABASE` goes on.
    pub fn release(mut self) {
        use std::io::Write as _;
        let stdin = self.psql.stdin.as_mut().unwrap();
        writeln!(stdin, "ROLLBACK;").unwrap();
        drop(self.psql.stdin.take());
        assert!(
            self.psql.wait().unwrap().success(),
            "the held psql session failed"
        );
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        // After release() this finds the process gone; otherwise the session ends with it.
        let _ = self.psql.kill();
        let _ = self.psql.wait();
    }
}

/// Waits until a session runs an `ALTER DATABASE` statement containing `text` and waits for a
/// lock (a [`HeldSession::holding_row`]), and returns that backend's pid.
pub async fn waiting_alter(cluster: &ephemeral_pg::Cluster, text: &str) -> i32 {
    eventually(
        &format!("an ALTER DATABASE ... {text} waiting for a lock"),
        Duration::from_secs(90),
        async || {
            let pid = cluster
                .psql(
                    "postgres",
                    &format!(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                         AND query ILIKE 'ALTER DATABASE%' AND query LIKE '%{text}%'"
                    ),
                )
                .ok()?;
            pid.trim().parse().ok()
        },
    )
    .await
}

/// Debian's libfaketime (package `faketime`, which `.ci/run` installs).
pub fn libfaketime() -> &'static str {
    const CANDIDATES: [&str; 2] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    CANDIDATES
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime is not installed: apt-get install faketime")
}

/// The live objects, leaving out the web role's readiness probes (`_probe/`).
pub fn live_objects(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut objects = files(dir);
    objects.retain(|k, _| !k.starts_with("_probe/"));
    objects
}

pub fn run_tag(run_id: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("r{}", &hex::encode(Sha256::digest(run_id.as_bytes()))[..8])
}

/// cowork-sim's real profile: its tools take the profile from this variable (its roles from
/// the overlay file in their working directory).
pub const REAL_PROFILE: (&str, &str) = ("COWORK_PROFILE", "real");

/// The login role the real profile's service runs as: the database's owner, not a superuser
/// (`deploy/cowork-sim-real/database.toml` freezes it).
pub const REAL_APP_ROLE: &str = "cowork";

/// A TOML file of `deploy/cowork-sim-real/`, parsed.
pub fn real_profile_deploy(file: &str) -> toml::Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/cowork-sim-real")
        .join(file);
    std::fs::read_to_string(&path)
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `value` as a TOML literal, for writing configs.
fn toml_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        toml::Value::Table(table) => {
            let pairs: Vec<String> = table
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect();
            format!("{{ {} }}", pairs.join(", "))
        }
        other => other.to_string(),
    }
}

/// The `[[invariant]]`/`[[reference]]` (`key`) entries of a deploy file as TOML text.
fn toml_entries(file: &toml::Table, key: &str) -> String {
    let mut out = String::new();
    for entry in file
        .get(key)
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!("[[{key}]]\n"));
        for (k, v) in entry.as_table().unwrap() {
            out.push_str(&format!("{k} = {}\n", toml_value(v)));
        }
    }
    out
}

impl Fleet {
    /// A fleet of cowork-sim's real profile as real processes: web, worker, scheduler,
    /// database and objects agents (no gateway), the service running as a non-superuser owner
    /// of its database, 12 sessions seeded, the default plan (no plan file). The report rows,
    /// counts, invariants, references and the freeze come from `deploy/cowork-sim-real/`; web
    /// connects as the app role (frozen with it), the worker and the scheduler with a URL that
    /// opts out of the freeze, the database agent as the app role too (a managed Postgres gives
    /// no superuser: a restore as one would leave the tables owned by someone else, since
    /// dumps are restored `--no-owner`).
    pub async fn start_real() -> Fleet {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let cluster = ephemeral_pg::Cluster::start().unwrap();
        cluster
            .psql(
                "postgres",
                &format!("CREATE ROLE {REAL_APP_ROLE} LOGIN CREATEDB"),
            )
            .unwrap();
        cluster.create_database("cowork").unwrap();
        cluster
            .psql(
                "postgres",
                &format!("ALTER DATABASE cowork OWNER TO {REAL_APP_ROLE}"),
            )
            .unwrap();
        let db_url = cluster.url("cowork");
        let app_url = format!(
            "postgres://{REAL_APP_ROLE}@127.0.0.1:{}/cowork",
            cluster.port()
        );
        let writer_url = format!("{app_url}?options=-c%20default_transaction_read_only%3Doff");
        let objects = dir.path().join("objects");
        let repo = dir.path().join("repository");
        std::fs::create_dir_all(&objects).unwrap();
        let objects_url = format!("file://{}", objects.display());
        let overlay = dir.path().join("overlay");
        std::fs::create_dir_all(&overlay).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/cowork-sim-real/overlay/cowork-sim.toml"),
            overlay.join("cowork-sim.toml"),
        )
        .unwrap();
        let data_env = [
            ("DATABASE_URL", app_url.as_str()),
            ("OBJECT_STORE_URL", objects_url.as_str()),
            REAL_PROFILE,
        ];
        let (operator_token, token_file) =
            seed_service(dir.path(), &data_env, &["--bind-every", "2"]);

        let names = ["web-1", "worker-1", "sched-1", "db-1", "obj-1"];
        let certs = certs_init(
            dir.path(),
            &[
                "web-1:web",
                "worker-1:worker",
                "sched-1:scheduler",
                "db-1:database",
                "obj-1:objects",
            ],
        );
        let deploy_rollcall = real_profile_deploy("rollcall.toml");
        let rows = deploy_rollcall["environments"]["staging"]["report"]["rows"].clone();
        let (agents_addr, operator_addr, web_addr) = (free_addr(), free_addr(), free_addr());
        let env = format!(
            r#"
    [environments.test]
    rpo = "1h"
    rto = "1h"
    retention = "7days"
    repository = "file://{repo}"
    fleet = {{ web = 1, worker = 1, scheduler = 1, database = 1, objects = 1 }}
    [environments.test.report]
    rows = {rows}
    "#,
            repo = repo.display(),
            rows = toml_value(&rows),
        );
        let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
        let coordinator = spawn_rollcall(
            "coordinator",
            dir.path(),
            &["coordinator", "--config", config.to_str().unwrap()],
            &[],
        );

        let sim = cowork_sim_bin();
        let web_control = format!(
            r#"
    [control]
    scale = "process"
    [control.process]
    program = "{sim}"
    args = ["web", "--listen", "{web_addr}"]
    cwd = "{overlay}"
    first_start_env = {{ COWORK_MIGRATE_ON_BOOT = "false" }}
    health_url = "http://{web_addr}/readyz"
    stop_grace = "5s"
    [[check]]
    name = "livez"
    url = "http://{web_addr}/livez"
    [[check]]
    name = "readyz"
    url = "http://{web_addr}/readyz"
    expect = {{ status = "ready" }}
    [[check]]
    name = "operator diagnostics"
    url = "http://{web_addr}/api/diagnostics"
    token_file = "{token_file}"
    "#,
            sim = sim.display(),
            overlay = overlay.display(),
            token_file = token_file.display(),
        );
        let role_control = |role: &str, smoke: &str| {
            format!(
                "[control]\nscale = \"process\"\n[control.process]\nprogram = \"{sim}\"\n\
                 args = [\"{role}\"]\ncwd = \"{overlay}\"\nstop_grace = \"5s\"\n\
                 [smoke]\ncommand = [\"env\", \"COWORK_PROFILE=real\", \"{sim}\", \"smoke\", {smoke}]\n\
                 timeout = \"90s\"\n",
                sim = sim.display(),
                overlay = overlay.display(),
            )
        };
        let worker_control = role_control(
            "worker",
            &format!("\"worker\", \"--web-url\", \"http://{web_addr}\", \"--timeout\", \"60s\""),
        );
        let scheduler_control = role_control("scheduler", "\"scheduler\", \"--timeout\", \"60s\"");
        let database = real_profile_deploy("database.toml");
        let postgres = database["postgres"].as_table().unwrap();
        let db_data = format!(
            "[postgres]\nurl_env = \"DATABASE_URL\"\ncounts = {counts}\n[postgres.freeze]\n{freeze}\n{invariants}{references}",
            counts = toml_value(&postgres["counts"]),
            freeze = postgres["freeze"]
                .as_table()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect::<Vec<_>>()
                .join("\n"),
            invariants = toml_entries(&database, "invariant"),
            references = toml_entries(&database, "reference"),
        );
        let obj_data = format!(
            "[objects]\nurl = \"{objects_url}\"\nverify_ignore = [\"health/\"]\nscratch_dir = \"scratch/obj-1\"\n"
        );
        let with_db = |url: &str| {
            vec![
                ("DATABASE_URL".to_owned(), url.to_owned()),
                ("OBJECT_STORE_URL".to_owned(), objects_url.clone()),
                ("COWORK_OPERATOR_TOKEN".to_owned(), operator_token.clone()),
            ]
        };
        let mut agent_envs = std::collections::BTreeMap::new();
        let mut agents = Vec::new();
        for (name, role, extra, url) in [
            ("web-1", "web", web_control.as_str(), app_url.as_str()),
            (
                "worker-1",
                "worker",
                worker_control.as_str(),
                writer_url.as_str(),
            ),
            (
                "sched-1",
                "scheduler",
                scheduler_control.as_str(),
                writer_url.as_str(),
            ),
            ("db-1", "database", db_data.as_str(), app_url.as_str()),
            ("obj-1", "objects", obj_data.as_str(), db_url.as_str()),
        ] {
            let cfg = write_agent_config(dir.path(), &certs, agents_addr, name, role, extra);
            let env = with_db(url);
            let pairs: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            agents.push(spawn_rollcall(
                name,
                dir.path(),
                &["agent", "--config", cfg.to_str().unwrap()],
                &pairs,
            ));
            agent_envs.insert(name.to_owned(), env);
        }
        fleet_ready(
            operator_addr,
            &certs,
            &names,
            dir.path(),
            Duration::from_secs(60),
        )
        .await;
        Fleet {
            cluster,
            repo,
            objects,
            db_url,
            objects_url,
            operator_token,
            certs,
            config,
            operator_addr,
            web_addr,
            pg_restore_fails: dir.path().join("pg-restore-fails"),
            coordinator,
            agents,
            agent_names: names.iter().map(|n| (*n).to_owned()).collect(),
            agent_envs,
            dir,
        }
    }
}

/// Migrates and seeds the service (12 sessions, plus `seed_args`) with `data_env`, and mints an
/// operator token, also written to `<dir>/operator-token` (the web agent's "operator
/// diagnostics" check reads its bearer token from that file). Returns the token and the file.
fn seed_service(
    dir: &Path,
    data_env: &[(&str, &str)],
    seed_args: &[&str],
) -> (String, std::path::PathBuf) {
    cowork(&["migrate"], data_env);
    let tokens = dir.join("tokens.json");
    let mut seed = vec!["seed", "--sessions", "12"];
    seed.extend_from_slice(seed_args);
    seed.extend(["--tokens-out", tokens.to_str().unwrap()]);
    cowork(&seed, data_env);
    let operator_token = cowork(&["token", "--scope", "operator"], data_env)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token_file = dir.join("operator-token");
    std::fs::write(&token_file, &operator_token).unwrap();
    (operator_token, token_file)
}
