//! Reaching the server and its tools: database URLs split so passwords stay out of argv and
//! messages, connections, finding a `pg_dump`/`pg_restore` new enough for the server, and
//! reading what a tool said when it failed.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::redact::redact_url;

/// A database URL split for safe use: the password goes to `PGPASSWORD`, never to argv or
/// messages.
#[derive(Clone)]
pub(super) struct DbUrl {
    pub(super) full: String,
    pub(super) without_password: String,
    pub(super) password: Option<String>,
    pub(super) display: String,
    pub(super) database: String,
}

impl DbUrl {
    pub(super) fn parse(raw: &str) -> Result<DbUrl> {
        let display = redact_url(raw);
        let mut url = url::Url::parse(raw).map_err(|_| {
            anyhow::anyhow!(
                "database URL {display} is not a URL: write it as \
                 postgres://USER@HOST:PORT/DATABASE"
            )
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            bail!("database URL {display} must start with postgres://");
        }
        let database = url.path().trim_start_matches('/').to_owned();
        if database.is_empty() {
            bail!("database URL {display} names no database: add /DATABASE to it");
        }
        let mut password = url
            .password()
            .map(|p| {
                url::form_urlencoded::parse(format!("p={p}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            })
            .filter(|p| !p.is_empty());
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut kept = Vec::new();
        for (k, v) in pairs {
            if k == "password" {
                password = Some(v);
            } else {
                kept.push((k, v));
            }
        }
        let _ = url.set_password(None);
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok(DbUrl {
            full: raw.to_owned(),
            without_password: url.to_string(),
            password,
            display: url.to_string(),
            database: percent_decode(&database),
        })
    }

    pub(super) fn apply_password(&self, cmd: &mut Command) {
        cmd.env_remove("PGPASSWORD");
        if let Some(password) = &self.password {
            cmd.env("PGPASSWORD", password);
        }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

pub(super) fn with_database(raw: &str, database: &str) -> Result<String> {
    let mut url = url::Url::parse(raw).context("parse the database URL")?;
    url.set_path(&format!("/{database}"));
    Ok(url.to_string())
}

pub(super) async fn connect(db: &DbUrl, timeout: Duration) -> Result<PgConnection> {
    let options = PgConnectOptions::from_str(&db.full)
        .map_err(|_| {
            anyhow::anyhow!(
                "database URL {} is not valid: write it as postgres://USER@HOST:PORT/DATABASE",
                db.display
            )
        })?
        .application_name("rollcall-repository")
        // A database freeze makes the application's roles read-only by default (`freeze`);
        // Rollcall's own sessions, which may connect as one of them, opt out.
        .options([("default_transaction_read_only", "off")]);
    match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "connect to database {}: {e}: check the URL, that the server is running and \
             reachable, and the credentials",
            db.display
        )),
        Err(_) => bail!(
            "connect to database {}: no answer within {timeout:?}: check the host, port and \
             network path",
            db.display
        ),
    }
}

/// Where a Postgres tool might be: the configured directory only, or PATH then Debian's
/// versioned directories (newest first).
pub(super) fn tool_candidates(name: &str, bin_dir: Option<&FsPath>) -> Result<Vec<PathBuf>> {
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
        bail!(
            "{name} was not found in {} (the configured Postgres tools directory): install the \
             PostgreSQL client tools there or fix the setting",
            dir.display()
        );
    }
    let mut found = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                found.push(candidate);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versioned: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let path = e.path().join("bin").join(name);
                path.is_file().then_some((version, path))
            })
            .collect();
        versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
        found.extend(versioned.into_iter().map(|(_, p)| p));
    }
    if found.is_empty() {
        bail!(
            "{name} was not found on PATH or in /usr/lib/postgresql/*/bin: install the \
             PostgreSQL client tools (Debian/Ubuntu: `apt-get install postgresql-client`) or \
             configure the directory that holds {name}"
        );
    }
    Ok(found)
}

/// The first candidate whose major version is at least `min_major`.
pub(super) async fn pick_tool(
    candidates: &[PathBuf],
    name: &str,
    min_major: u32,
) -> Result<(PathBuf, String)> {
    let mut seen = Vec::new();
    for path in candidates {
        let (major, version) = tool_version(path)
            .await
            .with_context(|| format!("run {} --version", path.display()))?;
        if major >= min_major {
            return Ok((path.clone(), version));
        }
        seen.push(format!("{} ({version})", path.display()));
    }
    bail!(
        "no {name} of version {min_major} or newer was found (found: {}): install the \
         PostgreSQL {min_major} client tools or configure their directory",
        seen.join(", ")
    )
}

/// What `path --version` says, and its major version (0 when it fails or says none).
pub(super) async fn tool_version(path: &FsPath) -> std::io::Result<(u32, String)> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major = if out.status.success() {
        major_of(&version).unwrap_or(0)
    } else {
        0
    };
    Ok((major, version))
}

/// `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15.
pub(super) fn major_of(version: &str) -> Option<u32> {
    version
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .and_then(|w| w.split('.').next())
        .and_then(|m| m.parse().ok())
}

pub(super) fn collect_stderr(
    stderr: Option<tokio::process::ChildStderr>,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stderr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    // Keep the tail: the last lines say what went wrong.
                    if buf.len() > 128 << 10 {
                        buf.drain(..buf.len() - (64 << 10));
                    }
                }
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(no error output)".to_owned()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_passwords_off_database_urls() {
        let db = DbUrl::parse("postgres://app:s%40cret@db.internal:5432/cowork?sslmode=require")
            .expect("parse");
        assert_eq!(db.password.as_deref(), Some("s@cret"));
        assert_eq!(
            db.without_password,
            "postgres://app@db.internal:5432/cowork?sslmode=require"
        );
        assert!(!db.display.contains("cret"));
        assert_eq!(db.database, "cowork");

        let db =
            DbUrl::parse("postgresql://app@h/db?password=pw&application_name=x").expect("parse");
        assert_eq!(db.password.as_deref(), Some("pw"));
        assert!(
            !db.without_password.contains("pw"),
            "{}",
            db.without_password
        );

        assert!(DbUrl::parse("mysql://h/db").is_err());
        assert!(DbUrl::parse("postgres://h").is_err());
        let err = DbUrl::parse("postgres://u:hunter2@[bad")
            .err()
            .expect("bad URL is refused");
        assert!(!format!("{err:#}").contains("hunter2"));
    }

    #[test]
    fn reads_tool_versions() {
        assert_eq!(
            major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of("pg_restore (PostgreSQL) 9.6.24"), Some(9));
    }

    #[test]
    fn missing_tool_directory_is_named() {
        let err = tool_candidates("pg_dump", Some(FsPath::new("/nonexistent/pg/bin")))
            .expect_err("missing");
        let text = err.to_string();
        assert!(
            text.contains("pg_dump was not found in /nonexistent/pg/bin"),
            "{text}"
        );
    }
}
