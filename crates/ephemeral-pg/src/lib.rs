//! Throwaway PostgreSQL clusters: `initdb` in a directory, `postgres` on a free loopback port.
//!
//! Tests, benchmarks and `rollcall demo` start their own clusters and never depend on a server
//! someone started by hand. Postgres refuses to run as root, so when we are root every server
//! command runs as the `postgres` user through `runuser`.
//!
//! It also holds the two other things every test harness here needs and all of them already
//! reach through this crate: a free loopback port that is never handed out twice in a process
//! ([`free_addr`]; clusters take theirs from it too) and polling with a deadline
//! ([`eventually`]).

mod wait;

pub use wait::{eventually, eventually_explained};

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// The server binaries a cluster needs.
const BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// A running cluster. Dropping it stops the server; the directory goes too unless it was
/// given by the caller or the cluster was left running ([`Cluster::leave_running`]).
pub struct Cluster {
    root: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    run_as_postgres: bool,
    stopped: bool,
    temp: Option<tempfile::TempDir>,
}

#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Where the cluster lives; a fresh temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Extra `-c name=value` server settings.
    pub settings: Vec<(String, String)>,
}

impl Cluster {
    /// Starts a cluster in a temporary directory.
    pub fn start() -> Result<Cluster> {
        Cluster::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Result<Cluster> {
        let bin_dir = find_bin_dir()?;
        let run_as_postgres = nix::unistd::geteuid().is_root();
        if run_as_postgres
            && nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .is_none()
        {
            bail!(
                "running as root, but there is no `postgres` user to run the server as \
                 (Postgres refuses to run as root): create one with `useradd --system postgres` \
                 or run as an ordinary user"
            );
        }
        let (temp, root) = match options.dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create cluster directory {}", dir.display()))?;
                (None, dir)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("rollcall-pg-")
                    .tempdir()
                    .context("create a temporary directory for the cluster")?;
                let root = temp.path().to_path_buf();
                (Some(temp), root)
            }
        };
        // The postgres user must be able to reach and own its directories.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("open up {} to the postgres user", root.display()))?;
        let mut cluster = Cluster {
            root,
            port: 0,
            bin_dir,
            run_as_postgres,
            stopped: true,
            temp,
        };
        cluster.init()?;
        // A free port can be taken by someone else between our probe and the server's bind;
        // try a few before giving up.
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = free_addr()?.port();
            match cluster.start_server(&options.settings) {
                Ok(()) => {
                    cluster.stopped = false;
                    return Ok(cluster);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("start postgres")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// A connection URL for `database` as the superuser `postgres` (trust auth on loopback).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The directory holding `pg_dump`, `pg_restore`, `psql` for this cluster's version.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Creates a database (idempotent).
    pub fn create_database(&self, name: &str) -> Result<()> {
        let exists = self.psql(
            "postgres",
            &format!(
                "SELECT 1 FROM pg_database WHERE datname = '{}'",
                name.replace('\'', "''")
            ),
        )?;
        if exists.trim() == "1" {
            return Ok(());
        }
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        )?;
        Ok(())
    }

    /// Runs one SQL statement through `psql` and returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin_dir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .args(["-c", sql])
            .output()
            .context("run psql")?;
        check(&out, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Lets the server outlive this value, with its directory (`rollcall demo --keep`): whoever
    /// leaves it running says how to stop it (`pg_ctl -D <dir>/data stop`).
    pub fn leave_running(mut self) {
        self.stopped = true; // nothing for drop to stop
        if let Some(temp) = self.temp.take() {
            let _ = temp.keep();
        }
    }

    /// Stops the server now (also done on drop).
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let data = self.data_dir();
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .context("run pg_ctl stop")?;
        check(&out, "pg_ctl stop")
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn init(&self) -> Result<()> {
        let data = self.data_dir();
        if data.join("PG_VERSION").exists() {
            return Ok(());
        }
        if self.run_as_postgres {
            chown_postgres(&self.root)?;
        }
        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .context("run initdb")?;
        check(&out, "initdb")
    }

    fn start_server(&self, settings: &[(String, String)]) -> Result<()> {
        let mut opts = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off -c full_page_writes=off -c synchronous_commit=off",
            self.port,
            self.root.display()
        );
        for (name, value) in settings {
            opts.push_str(&format!(" -c {name}={value}"));
        }
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.root.join("postgres.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .output()
            .context("run pg_ctl start")?;
        check(&out, "pg_ctl start").with_context(|| {
            format!(
                "start postgres on 127.0.0.1:{} (log: {})",
                self.port,
                self.root.join("postgres.log").display()
            )
        })
    }

    fn server_command(&self, binary: &str) -> Command {
        let path = self.bin_dir.join(binary);
        let mut cmd = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Best effort: a server left running would outlive the test that started it.
        let _ = self.stop();
    }
}

fn check(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// A loopback address that was free a moment ago, for a server the caller starts next.
///
/// The port is released before that server binds it, so the kernel may hand the same port to
/// the next caller: on Linux a `bind` to port 0 draws from the odd half of the range only, and
/// measured here one call in about 1,700 returned a port returned within the ten calls before.
/// Tests of one binary run side by side and each starts several servers; two servers given one
/// port leave a fleet that never comes up. So this never returns a port twice in a process.
pub fn free_addr() -> Result<SocketAddr> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("find a free loopback port")?;
        let addr = listener
            .local_addr()
            .context("read the address of a loopback port")?;
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr);
        }
    }
}

/// Finds the directory of the server binaries: PATH first, then Debian's versioned layout.
pub fn find_bin_dir() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .collect();
        versions.sort();
        versions.reverse();
        candidates.extend(versions);
    }
    for dir in candidates {
        if BINARIES.iter().all(|b| dir.join(b).is_file()) {
            // Prefer the real directory so pg_dump/pg_restore of the same version sit beside it.
            let initdb = std::fs::canonicalize(dir.join("initdb")).unwrap_or(dir.join("initdb"));
            return Ok(initdb.parent().map(Path::to_path_buf).unwrap_or(dir));
        }
    }
    bail!(
        "PostgreSQL server binaries ({}) were not found on PATH or in /usr/lib/postgresql/*/bin: \
         install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`) or add its bin \
         directory to PATH",
        BINARIES.join(", ")
    )
}

fn chown_postgres(path: &Path) -> Result<()> {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .context("look up the postgres user")?;
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("give {} to the postgres user", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_stops() {
        let mut cluster = Cluster::start().expect("start a cluster");
        cluster.create_database("app").expect("create database");
        cluster
            .create_database("app")
            .expect("create database twice");
        let out = cluster.psql("app", "SELECT 40 + 2").expect("query");
        assert_eq!(out.trim(), "42");
        let port = cluster.port();
        cluster.stop().expect("stop");
        assert!(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }
}
