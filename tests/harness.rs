//! Shared harness of the end-to-end tests: certificates, config files, in-process fleets,
//! child processes that die with the test, polling with deadlines, and an OTLP collector.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::model::{AgentName, Role};
use tokio_util::sync::CancellationToken;

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub mod fleet;

// Polling with a deadline lives in ephemeral-pg, which this harness and cowork-sim's both use.
pub use ephemeral_pg::{eventually, eventually_explained};

/// The last `lines` lines of every `*.log` file under `dir` (processes' and roles' logs),
/// each under its path.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut logs = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                logs.push(path);
            }
        }
    }
    logs.sort();
    let mut text = String::new();
    for path in logs {
        let body = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = body.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        text.push_str(&format!(
            "--- {} (last {} lines)\n",
            path.display(),
            tail.len()
        ));
        for line in tail {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// A loopback address that was free a moment ago and that no other caller in this process got
/// (`ephemeral_pg::free_addr`, which the clusters' ports come from too).
pub fn free_addr() -> SocketAddr {
    ephemeral_pg::free_addr().expect("find a free loopback port")
}

/// A certificate directory from `certs init`, for the named `NAME:ROLE` agents.
pub fn certs(dir: &Path, agents: &[&str]) -> PathBuf {
    certs_with_operators(dir, agents, &[])
}

/// Like [`certs`], with operator certificates for the named `NAME:ROLE` operators too
/// (`operators/NAME.pem`).
pub fn certs_with_operators(dir: &Path, agents: &[&str], operators: &[&str]) -> PathBuf {
    let certs = dir.join("certs");
    coordinator::certs::init(&coordinator::certs::InitRequest {
        dir: certs.clone(),
        agents: agents
            .iter()
            .map(|s| coordinator::certs::parse_agent_spec(s).unwrap())
            .collect(),
        coordinator_hosts: vec![],
        operator: "ops".into(),
        operators: operators
            .iter()
            .map(|s| coordinator::certs::parse_operator_spec(s).unwrap())
            .collect(),
    })
    .unwrap();
    certs
}

/// The named bearer tokens every in-process coordinator accepts besides
/// `test-operator-token` (an admin named `token`): (token, name, role).
pub const TEST_TOKENS: [(&str, &str, &str); 3] = [
    ("viewer-token", "tvera", "viewer"),
    ("operator-token", "toscar", "operator"),
    ("admin-token", "tada", "admin"),
];

fn test_operator_tokens() -> Vec<coordinator::grpc::OperatorToken> {
    TEST_TOKENS
        .iter()
        .map(|(token, name, role)| coordinator::grpc::OperatorToken {
            name: (*name).to_owned(),
            role: api::identity::OperatorRole::parse(role).unwrap(),
            sha256: coordinator::grpc::token_hash(token),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// In-process fleets

pub struct InProcessCoordinator {
    pub handle: coordinator::Handle,
    pub cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl InProcessCoordinator {
    pub async fn start(
        certs: &Path,
        state_url: &str,
        agent_timeout: Duration,
    ) -> InProcessCoordinator {
        Self::start_with(certs, state_url, agent_timeout, Duration::from_millis(200)).await
    }

    pub async fn start_with(
        certs: &Path,
        state_url: &str,
        agent_timeout: Duration,
        heartbeat_interval: Duration,
    ) -> InProcessCoordinator {
        Self::start_full(
            certs,
            state_url,
            agent_timeout,
            heartbeat_interval,
            BTreeMap::new(),
        )
        .await
    }

    /// With environments (for runs).
    pub async fn start_full(
        certs: &Path,
        state_url: &str,
        agent_timeout: Duration,
        heartbeat_interval: Duration,
        environments: BTreeMap<String, coordinator::config::Environment>,
    ) -> InProcessCoordinator {
        let any = "127.0.0.1:0".parse().unwrap();
        Self::start_full_at(
            certs,
            state_url,
            agent_timeout,
            heartbeat_interval,
            environments,
            any,
        )
        .await
    }

    /// With environments, its agent listener on `agents` (a successor at its predecessor's
    /// address, so agents reconnect to it).
    pub async fn start_full_at(
        certs: &Path,
        state_url: &str,
        agent_timeout: Duration,
        heartbeat_interval: Duration,
        environments: BTreeMap<String, coordinator::config::Environment>,
        agents: SocketAddr,
    ) -> InProcessCoordinator {
        Self::start_limited(
            certs,
            state_url,
            agent_timeout,
            heartbeat_interval,
            environments,
            agents,
            coordinator::layers::Limits::default(),
        )
        .await
    }

    /// Like `start_full_at`, with the given attach rate and operator call limits.
    pub async fn start_limited(
        certs: &Path,
        state_url: &str,
        agent_timeout: Duration,
        heartbeat_interval: Duration,
        environments: BTreeMap<String, coordinator::config::Environment>,
        agents: SocketAddr,
        limits: coordinator::layers::Limits,
    ) -> InProcessCoordinator {
        let settings = coordinator::Settings {
            tls: Self::tls(certs),
            heartbeat_interval,
            agent_timeout,
            operator_token_hashes: vec![coordinator::grpc::token_hash("test-operator-token")],
            operator_tokens: test_operator_tokens(),
            environments,
            limits,
            notify: Vec::new(),
            observe_interval: Duration::from_secs(60),
        };
        Self::launch(settings, state_url, agents).await
    }

    /// With environments and `[[notify]]` webhooks (agent timeout 5 s, heartbeats 200 ms).
    pub async fn start_notifying(
        certs: &Path,
        state_url: &str,
        environments: BTreeMap<String, coordinator::config::Environment>,
        notify: Vec<coordinator::notify::Webhook>,
    ) -> InProcessCoordinator {
        let settings = coordinator::Settings {
            tls: Self::tls(certs),
            heartbeat_interval: Duration::from_millis(200),
            agent_timeout: Duration::from_secs(5),
            operator_token_hashes: vec![coordinator::grpc::token_hash("test-operator-token")],
            operator_tokens: test_operator_tokens(),
            environments,
            limits: coordinator::layers::Limits::default(),
            notify,
            observe_interval: Duration::from_secs(60),
        };
        Self::launch(settings, state_url, "127.0.0.1:0".parse().unwrap()).await
    }

    fn tls(certs: &Path) -> coordinator::tls::TlsMaterial {
        coordinator::tls::TlsMaterial::load(&coordinator::tls::TlsPaths {
            ca: certs.join("ca.pem"),
            cert: certs.join("coordinator.pem"),
            key: certs.join("coordinator-key.pem"),
            key_prefix: "tls",
        })
        .unwrap()
    }

    async fn launch(
        settings: coordinator::Settings,
        state_url: &str,
        agents: SocketAddr,
    ) -> InProcessCoordinator {
        let store = coordinator::store::open(state_url).await.unwrap();
        let listeners = coordinator::Listeners::bind(
            agents,
            "127.0.0.1:0".parse().unwrap(),
            Some("127.0.0.1:0".parse().unwrap()),
        )
        .await
        .unwrap();
        let c = coordinator::Coordinator::start(settings, listeners, store)
            .await
            .unwrap();
        let handle = c.handle();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(c.run(cancel.clone()));
        InProcessCoordinator {
            handle,
            cancel,
            task,
        }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }

    pub fn agents_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.handle.agents_addr.port())
    }

    pub fn operator_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.handle.operator_addr.port())
    }

    /// Waits until `name` is connected and ready.
    pub async fn wait_ready(&self, names: &[&str]) {
        let handle = self.handle.clone();
        eventually(
            &format!("agents {names:?} ready"),
            Duration::from_secs(20),
            async || {
                let agents = handle.agents();
                names
                    .iter()
                    .all(|n| agents.iter().any(|a| a.name.as_str() == *n && a.ready))
                    .then_some(())
            },
        )
        .await;
    }
}

pub fn agent_settings(
    certs: &Path,
    state: &Path,
    url: &str,
    name: &str,
    role: &str,
) -> agent::Settings {
    agent::Settings {
        name: AgentName::parse(name).unwrap(),
        role: Role::parse(role).unwrap(),
        environment: api::model::Environment::parse("test").unwrap(),
        state_dir: state.join(name),
        coordinator_url: url.to_owned(),
        server_name: "localhost".into(),
        ca_pem: std::fs::read(certs.join("ca.pem")).unwrap(),
        cert_pem: std::fs::read(certs.join(format!("agents/{name}.pem"))).unwrap(),
        key_pem: std::fs::read(certs.join(format!("agents/{name}-key.pem"))).unwrap(),
        control: agent::control::ControlConfig::default(),
        postgres: None,
        objects: None,
        checks: Vec::new(),
        invariants: Vec::new(),
        references: Vec::new(),
        smoke: None,
        teardown_allowed: false,
        another_server: false,
        config_file: state.join(format!("{name}.toml")),
        reconnect: agent::config::ReconnectConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            ..Default::default()
        },
    }
}

pub struct InProcessAgent {
    pub cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl InProcessAgent {
    pub fn start(settings: agent::Settings) -> InProcessAgent {
        let agent = agent::Agent::build(settings).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(agent.run(cancel.clone()));
        InProcessAgent { cancel, task }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A plain HTTP/1.1 request on loopback with an optional bearer token and JSON body;
/// returns the status code and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A plain HTTP/1.1 GET on loopback; returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver

/// One request a [`WebhookReceiver`] got: its headers (names lower-cased) and exact body.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// A real HTTP/1.1 server on loopback that records every request it gets. It answers 503 to
/// the first `fail_first` requests and 204 to the rest; with `hang`, it reads each request and
/// never answers.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(fail_first: usize, hang: bool) -> WebhookReceiver {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = got.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                // One request per connection is all a client needs to see here; a client that
                // stalls mid-request is dropped rather than holding up the ones after it.
                let read = tokio::time::timeout(Duration::from_secs(10), read_request(&mut stream));
                let Ok(Ok(request)) = read.await else {
                    continue;
                };
                let n = {
                    let mut all = seen.lock().unwrap();
                    all.push(request);
                    all.len()
                };
                if hang {
                    held.push(stream);
                    continue;
                }
                let status = if n <= fail_first {
                    "503 Service Unavailable"
                } else {
                    "204 No Content"
                };
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        WebhookReceiver { addr, got, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks/rollcall", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Result<Received> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the request's head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut headers = BTreeMap::new();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .context("a request without content-length")?
        .parse()?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the body ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Received {
        headers,
        body: buf[head_end..head_end + length].to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// Real processes

/// A copy of the rollcall binary in `dir` the postgres user may run (the build's own may sit
/// under a directory it cannot enter): a server's archive and restore commands.
pub fn runnable_rollcall(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("rollcall");
    std::fs::copy(rollcall_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Gives `path` (recursively) to the postgres user when the tests run as root: the server runs
/// the archive and restore commands as that user.
pub fn give_to_postgres(path: &Path) {
    if nix::unistd::geteuid().is_root() {
        let status = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// The server's clock as RFC 3339 in UTC, as `--to-time` takes it.
pub const NOW_RFC3339: &str = "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', \
                               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// The `rollcall` binary, built once per test process (a no-op when it is fresh).
pub fn rollcall_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("cli", "rollcall")).clone()
}

/// The `cowork-sim` binary (the service Rollcall restores in tests), built once.
pub fn cowork_sim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("cowork-sim", "cowork-sim"))
        .clone()
}

/// Runs `cowork-sim` with `args` and `env`; panics with its stderr unless it succeeds.
/// Returns its JSON output (null when it printed none).
pub fn cowork(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new(cowork_sim_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cowork-sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// A release build of the `rollcall` binary (benchmarks measure what ships), built once.
pub fn rollcall_release_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin_in("cli", "rollcall", "release"))
        .clone()
}

fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    workspace_bin_in(package, bin, "debug")
}

/// Builds `bin` of `package` with cargo's `debug` or `release` profile; returns its path.
fn workspace_bin_in(package: &str, bin: &str, profile: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", package, "--bin", bin]);
    if profile == "release" {
        build.arg("--release");
    }
    let status = build.current_dir(&root).status().expect("run cargo build");
    assert!(status.success(), "building the {bin} binary failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join(profile).join(bin)
}

/// Environment `name` on the file:// repository in `repository`, declaring `fleet` and
/// following the plan `plan_text`: hour-long RPO and RTO, a day's retention, no schedule, not
/// protected. Tests set what they are about on the result (`Environment { protected: true,
/// ..test_environment(..) }`).
pub fn test_environment(
    name: &str,
    fleet: &[(&str, u32)],
    repository: &Path,
    plan_text: &str,
) -> coordinator::config::Environment {
    use coordinator::plan::{Fleet, Plan};
    let repository = format!("file://{}", repository.display());
    let fleet: Fleet = fleet.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect();
    coordinator::config::Environment {
        name: api::model::Environment::parse(name).unwrap(),
        rpo: Duration::from_secs(3600),
        rto: Duration::from_secs(3600),
        retention: Duration::from_secs(86400),
        repository: repository.clone(),
        backup_schedule: None,
        base_backup_schedule: None,
        backup_plan: Plan::backup_plan(&fleet).unwrap(),
        repository_ref: api::model::RepositoryRef {
            url: repository,
            ..Default::default()
        },
        secrets: Vec::new(),
        report_rows: Vec::new(),
        report_excluded: Vec::new(),
        protected: false,
        approvals: 0,
        approval_timeout: Duration::from_secs(3600),
        restore_test: None,
        pitr: coordinator::config::Pitr::Repository,
        plan: Plan::parse(Path::new("plan.toml"), plan_text, Some(&fleet)).unwrap(),
        fleet,
    }
}

pub fn rollcall(args: &[&str]) -> Output {
    rollcall_with_env(args, &[])
}

/// `rollcall args` with extra environment (an object store's credentials, say).
pub fn rollcall_with_env(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(rollcall_bin())
        .args(args)
        // The developer's own credentials never stand in for the test's.
        .env_remove("ROLLCALL_TOKEN")
        .env_remove("ROLLCALL_OPERATOR")
        .env_remove("ROLLCALL_CERTS")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run rollcall")
}

/// The JSON a successful command printed (null when it printed none); panics with its
/// stderr when it failed.
pub fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Fails with exactly one line on stderr, containing every one of `needles`.
pub fn fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} in {stderr}");
    }
}

/// A certificate directory made by `rollcall certs init` (the real binary), for the named
/// `NAME:ROLE` agents.
pub fn certs_init(dir: &Path, agents: &[&str]) -> PathBuf {
    let certs = dir.join("certs");
    let mut args = vec![
        "certs".to_string(),
        "init".into(),
        "--dir".into(),
        certs.display().to_string(),
    ];
    for a in agents {
        args.push("--agent".into());
        args.push((*a).into());
    }
    let out = Command::new(rollcall_bin()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("created"), "{stdout}");
    certs
}

/// Environment every process [`spawn_rollcall`] starts gets (an encrypted repository's key,
/// say): a test binary sets it before it starts its fleet.
pub static SPAWN_ENV: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// `rollcall args` as a child process logging at info into `dir`, with extra environment.
pub fn spawn_rollcall(name: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(rollcall_bin());
    cmd.args(args).env("RUST_LOG", "info");
    if let Ok(common) = SPAWN_ENV.lock() {
        cmd.envs(common.iter().map(|(k, v)| (k, v)));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(name, dir, cmd)
}

/// Every file under `dir` (relative path → bytes), leaving out the quarantine
/// (`rollcall-quarantine/`).
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out.retain(|k, _| !k.starts_with("rollcall-quarantine/"));
    out
}

/// A child process killed (SIGKILL) when dropped, so no test leaves one behind.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, log_dir: &Path, mut cmd: Command) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (up to `timeout`) for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    /// A test that ends (or panics) with the process still running stops it the way an
    /// operator would: SIGTERM, so an agent stops the role processes it supervises, and
    /// SIGKILL only if it has not exited within a few seconds.
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

/// Writes a coordinator config into `dir` and returns its path.
pub fn write_coordinator_config(
    dir: &Path,
    certs: &Path,
    agents: SocketAddr,
    operator: SocketAddr,
    extra: &str,
) -> PathBuf {
    let path = dir.join("rollcall.toml");
    let text = format!(
        r#"[listen]
agents = "{agents}"
operator = "{operator}"

[tls]
ca = "{certs}/ca.pem"
cert = "{certs}/coordinator.pem"
key = "{certs}/coordinator-key.pem"

[state]
url = "sqlite://{dir}/state.db"

[agents]
heartbeat_interval = "300ms"
timeout = "2s"
{extra}
"#,
        certs = certs.display(),
        dir = dir.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub fn write_agent_config(
    dir: &Path,
    certs: &Path,
    coordinator: SocketAddr,
    name: &str,
    role: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        r#"name = "{name}"
role = "{role}"
environment = "test"
state_dir = "{dir}/state/{name}"

[coordinator]
url = "https://{coordinator}"
server_name = "localhost"

[tls]
ca = "{certs}/ca.pem"
cert = "{certs}/agents/{name}.pem"
key = "{certs}/agents/{name}-key.pem"

[reconnect]
initial = "100ms"
max = "1s"
{extra}
"#,
        certs = certs.display(),
        dir = dir.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `rollcall agents --json` against a coordinator, parsed.
pub fn agents_json(operator: SocketAddr, certs: &Path) -> Result<serde_json::Value> {
    let out = rollcall(&[
        "agents",
        "--json",
        "--coordinator",
        &format!("https://127.0.0.1:{}", operator.port()),
        "--certs",
        &certs.display().to_string(),
    ]);
    if !out.status.success() {
        bail!(
            "rollcall agents failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parse rollcall agents --json")
}

/// Waits (up to `timeout`) until the coordinator at `operator` lists every one of `names` as
/// ready. On a timeout the failure shows what the coordinator listed and the tail of every log
/// under `logs`, so a fleet that did not come up in CI says which part did not.
pub async fn fleet_ready(
    operator: SocketAddr,
    certs: &Path,
    names: &[&str],
    logs: &Path,
    timeout: Duration,
) {
    let ready = async || {
        let json = agents_json(operator, certs).ok()?;
        let listed = json["agents"].as_array()?;
        names
            .iter()
            .all(|n| listed.iter().any(|a| a["name"] == *n && a["ready"] == true))
            .then_some(())
    };
    let explain = || {
        let agents = match agents_json(operator, certs) {
            Ok(json) => json.to_string(),
            Err(e) => format!("{e:#}"),
        };
        format!("agents: {agents}\n{}", log_tails(logs, 30))
    };
    let what = format!("{} to be ready", names.join(", "));
    eventually_explained(&what, timeout, ready, explain).await;
}

// ---------------------------------------------------------------------------------------------
// A minimal OTLP/gRPC trace collector

#[derive(Debug, Clone)]
pub struct CollectedSpan {
    pub service: String,
    /// `service.instance.id`: the agent's name.
    pub instance: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
}

#[derive(Clone, Default)]
pub struct Collector {
    pub spans: Arc<Mutex<Vec<CollectedSpan>>>,
}

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let attribute = |key: &str| {
                rs.resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == key))
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(
                            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                                s,
                            ),
                        ) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default()
            };
            let service = attribute("service.name");
            let instance = attribute("service.instance.id");
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(CollectedSpan {
                        service: service.clone(),
                        instance: instance.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a loopback port until `cancel`; returns the endpoint URL.
    pub async fn serve(&self, cancel: CancellationToken) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    cancel.cancelled_owned(),
                ),
        );
        format!("http://{addr}")
    }

    pub fn snapshot(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Azure Blob Storage emulator (Azurite, from npm)

/// Azurite's well-known development account and key (public, in Microsoft's documentation).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Whether a test that needs an emulator must fail, rather than skip, when it is missing.
/// `.ci/run` sets ROLLCALL_REQUIRE_EMULATORS=1, so CI never passes by skipping.
pub fn emulators_required() -> bool {
    std::env::var_os("ROLLCALL_REQUIRE_EMULATORS").is_some_and(|v| v != "0" && !v.is_empty())
}

/// An Azurite blob service on 127.0.0.1, stopped when dropped.
pub struct Azurite {
    pub port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts `azurite-blob` (npm package `azurite`); `None`, saying so, when it is not
    /// installed and emulators are not required.
    pub fn start() -> Option<Azurite> {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("azurite-blob").is_file()))
            .unwrap_or(false);
        if !found {
            assert!(
                !emulators_required(),
                "azurite-blob is not installed (npm install -g azurite) and \
                 ROLLCALL_REQUIRE_EMULATORS is set"
            );
            eprintln!(
                "SKIPPED: azurite-blob is not installed (npm install -g azurite); \
                 the Azure Blob Storage tests did not run"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_addr().port();
        let mut cmd = Command::new("azurite-blob");
        cmd.args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
            &dir.path().display().to_string(),
            "--skipApiVersionCheck",
        ]);
        let proc = Proc::spawn("azurite", dir.path(), cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "azurite did not listen on {port}: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Azurite {
            port,
            _proc: proc,
            _dir: dir,
        })
    }

    /// The environment that points object_store's `az://` URLs at this emulator.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
        ]
    }

    /// Creates a container with a SharedKey-signed `PUT ?restype=container` (object_store
    /// cannot create containers, and a real account has them made by its operator).
    pub fn create_container(&self, name: &str) {
        use base64::Engine as _;
        use std::io::{Read, Write};
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let version = "2021-08-06";
        // The string to sign: the verb, eleven empty standard headers, the x-ms- headers,
        // then the resource (the emulator's path carries the account, hence it twice).
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
             /{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(AZURITE_KEY).unwrap());
        let signature = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let mut tcp = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).unwrap();
        write!(
            tcp,
            "PUT /{AZURITE_ACCOUNT}/{name}?restype=container HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\n\
             Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            port = self.port
        )
        .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 201"),
            "create container {name}: {response}"
        );
    }
}
