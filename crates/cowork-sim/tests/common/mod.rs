//! Shared helpers of the cowork-sim tests: one throwaway Postgres cluster per test binary (a
//! database per test), object stores, the web role in-process, child processes that die with
//! the test, a local S3-compatible server, and polling with deadlines.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cowork_sim::auth::{self, IssuedToken, Scope};
use cowork_sim::web::{WebConfig, WebState};
use cowork_sim::{Deps, ObjectStoreOptions, Profile};
use ephemeral_pg::Cluster;
use tokio_util::sync::CancellationToken;

/// The cluster shared by the tests of this binary that are running. It stops when the last
/// of them drops its handle (a static would leave the server running after the tests).
static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn cluster() -> Arc<Cluster> {
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(Cluster::start().expect("start a throwaway Postgres cluster"));
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// A fresh database for one test, on the shared cluster.
pub struct TestDb {
    pub cluster: Arc<Cluster>,
    pub name: String,
    pub url: String,
}

pub fn fresh_db(label: &str) -> TestDb {
    let cluster = cluster();
    let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{label}_{}_{n}", std::process::id());
    cluster
        .create_database(&name)
        .expect("create a test database");
    let url = cluster.url(&name);
    TestDb { cluster, name, url }
}

/// A migrated database plus a LocalFileSystem object store in a temporary directory.
pub struct Env {
    pub db: TestDb,
    pub deps: Deps,
    pub dir: tempfile::TempDir,
    pub objects_dir: PathBuf,
    pub objects_url: String,
}

pub async fn env(label: &str) -> Env {
    env_with(label, Profile::Kind).await
}

/// [`env`] in `profile`, migrated with its names.
pub async fn env_with(label: &str, profile: Profile) -> Env {
    let db = fresh_db(label);
    let dir = tempfile::tempdir().unwrap();
    let objects_dir = dir.path().join("objects");
    let objects_url = format!("file://{}", objects_dir.display());
    let deps = Deps::connect(
        &db.url,
        &objects_url,
        &ObjectStoreOptions::default(),
        profile,
    )
    .await
    .unwrap();
    cowork_sim::schema::migrate(&deps.pool, deps.profile)
        .await
        .unwrap();
    Env {
        db,
        deps,
        dir,
        objects_dir,
        objects_url,
    }
}

/// A tenant with a desktop token.
pub struct Tenant {
    pub id: String,
    pub desktop: IssuedToken,
}

pub async fn tenant(deps: &Deps, slug: &str) -> Tenant {
    let id =
        cowork_sim::store::create_tenant(&deps.pool, deps.profile, slug, &format!("Tenant {slug}"))
            .await
            .unwrap();
    let desktop = auth::issue_token(
        &deps.pool,
        deps.profile,
        Scope::Desktop,
        Some(&id),
        None,
        "test",
    )
    .await
    .unwrap();
    Tenant { id, desktop }
}

pub async fn token(deps: &Deps, scope: Scope) -> IssuedToken {
    auth::issue_token(&deps.pool, deps.profile, scope, None, None, "test")
        .await
        .unwrap()
}

/// The web role in-process on a loopback port.
pub struct Web {
    pub addr: SocketAddr,
    pub state: WebState,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Web {
    pub async fn start(deps: &Deps) -> Web {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = WebState::new(
            deps.clone(),
            WebConfig {
                instance_id: "test".into(),
                maintenance: false,
            },
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(cowork_sim::web::run(
            listener,
            state.clone(),
            cancel.clone(),
        ));
        Web {
            addr,
            state,
            cancel,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub fn http() -> reqwest::Client {
    cowork_sim::objects::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

// Polling with a deadline and free ports live in ephemeral-pg, the test-support crate this
// harness and the e2e one both use (cowork-sim itself depends on no Rollcall crate).
pub use ephemeral_pg::eventually;

pub fn free_addr() -> SocketAddr {
    ephemeral_pg::free_addr().expect("find a free loopback port")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cowork-sim")
}

/// A child process, killed when dropped; its stderr goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    stdout: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, log_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Proc::start(name, log_dir, None, args, envs)
    }

    /// [`Proc::spawn`] with `cwd` as the working directory (where the overlay file is read).
    pub fn spawn_in(
        name: &str,
        log_dir: &Path,
        cwd: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        Proc::start(name, log_dir, Some(cwd), args, envs)
    }

    fn start(
        name: &str,
        log_dir: &Path,
        cwd: Option<&Path>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let stdout = log_dir.join(format!("{name}.out"));
        let mut cmd = Command::new(bin());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Proc {
            name: name.into(),
            child: Some(child),
            log,
            stdout,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.exit_within(timeout, &format!("stop within {timeout:?} of SIGTERM"))
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.exit_within(timeout, &format!("exit within {timeout:?}"))
    }

    /// The exit status, once there is one; past `timeout` the process is killed and the test
    /// fails saying it did not `what`, with its log.
    fn exit_within(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not {what}; log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the binary to completion; returns (status, stdout, stderr).
pub fn run_bin(args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String, String) {
    run_bin_at(None, args, envs)
}

/// [`run_bin`] in the working directory `cwd`.
pub fn run_bin_in(
    cwd: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    run_bin_at(Some(cwd), args, envs)
}

fn run_bin_at(
    cwd: Option<&Path>,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(bin());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A local S3-compatible server (`moto_server`) on a free loopback port, with one bucket.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl Moto {
    /// `None` (with a note on stderr) when `moto_server` is not installed.
    pub async fn start(bucket: &str) -> Option<Moto> {
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("moto_server").is_file()))
            .unwrap_or(false);
        if !on_path {
            assert!(
                std::env::var_os("ROLLCALL_REQUIRE_EMULATORS")
                    .is_none_or(|v| v.is_empty() || v == "0"),
                "moto_server is not on PATH and ROLLCALL_REQUIRE_EMULATORS is set"
            );
            eprintln!(
                "SKIPPED: moto_server is not on PATH; install it with `pip install 'moto[server]'` \
                 to run the S3 tests"
            );
            return None;
        }
        let addr = free_addr();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://{addr}");
        let moto = Moto {
            child,
            endpoint: endpoint.clone(),
            bucket: bucket.into(),
        };
        let client = http();
        eventually(
            "moto_server to answer",
            Duration::from_secs(30),
            async || client.get(&endpoint).send().await.ok().map(|_| ()),
        )
        .await;
        let created = client
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success(), "create bucket: {created:?}");
        Some(moto)
    }

    pub fn options(&self) -> ObjectStoreOptions {
        ObjectStoreOptions {
            s3_endpoint: Some(self.endpoint.clone()),
            s3_region: Some("us-east-1".into()),
            s3_access_key_id: Some("testing".into()),
            s3_secret_access_key: Some("testing".into()),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
