//! Verification and smoke on an agent: the runbook's steps 6–10 as configured checks.
//!
//! * `[[check]]` — HTTP checks of the role: the status (a code, a class, a list), comparisons
//!   on JSON pointers and on Prometheus samples (`expect`), with an operator bearer token read
//!   from an environment variable or file at call time, never logged.
//! * `[[invariant]]` — named SQL queries on the database agent with an expectation.
//! * `[[reference]]` — a SQL query on the database agent returning object keys that must exist
//!   in the restored object store (artifact rows); the objects agent answers the existence
//!   check (`check-objects`). All keys up to `limit`, else a random `sample`.
//! * `[smoke]` — a bounded command with a timeout (exit 0 = passed).
//!
//! The data plane adds count parity (database agent) and the live store against the point's
//! manifest (objects agent). Every check reports `{name, kind, required, passed, detail}`;
//! a failed required check fails the command (and so the phase's gate).

pub(crate) mod expect;
pub(crate) mod sql;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::config::ConfigError;
use serde::Deserialize;

use expect::{JsonExpect, JsonRule, MetricExpect, MetricRule, StatusRule};

pub use api::model::{Check, CheckKind};

/// `[[check]]` in agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub name: String,
    pub url: String,
    /// The statuses that pass: a code (`200`, the default), a class (`"2xx"`), or a list of
    /// them (`[200, 204]`).
    pub status: Option<toml::Value>,
    /// Environment variable holding a bearer token for the request.
    pub token_env: Option<String>,
    /// Or a file holding it (relative to agent.toml), read at every check so a rotated token
    /// is picked up.
    pub token_file: Option<std::path::PathBuf>,
    /// JSON fields the body must hold: dotted path → value, e.g. `{ "maintenance" = true }`.
    #[serde(default)]
    pub expect: BTreeMap<String, toml::Value>,
    /// `[[check.expect_json]]`: comparisons on JSON pointers into the body.
    #[serde(default)]
    pub expect_json: Vec<JsonExpect>,
    /// `[[check.expect_metric]]`: comparisons on samples of a Prometheus text body.
    #[serde(default)]
    pub expect_metric: Vec<MetricExpect>,
    #[serde(default = "yes")]
    pub required: bool,
}

/// An HTTP check with its expectations parsed.
struct HttpRun {
    check: HttpCheck,
    status: StatusRule,
    json: Vec<JsonRule>,
    metrics: Vec<MetricRule>,
}

fn yes() -> bool {
    true
}

/// `[[invariant]]` in agent.toml (database agents).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invariant {
    pub name: String,
    /// A query returning violating rows (for "zero_rows") or one number.
    pub sql: String,
    /// "zero_rows", or { equals = N }, or { at_least = N } on the first column of one row.
    #[serde(default = "zero_rows")]
    pub expect: InvariantExpect,
    #[serde(default = "yes")]
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum InvariantExpect {
    Named(String),
    Equals { equals: i64 },
    AtLeast { at_least: i64 },
}

fn zero_rows() -> InvariantExpect {
    InvariantExpect::Named("zero_rows".into())
}

/// `[[reference]]` in agent.toml (database agents): rows that name objects in the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub name: String,
    /// A query whose first column is an object key, e.g. `select object_key from artifacts`.
    pub sql: String,
    /// Check every key when the query returns at most this many rows.
    #[serde(default = "default_reference_limit")]
    pub limit: u64,
    /// Over the limit, check a random sample of this many keys (the report says so).
    #[serde(default = "default_reference_sample")]
    pub sample: u64,
    #[serde(default = "yes")]
    pub required: bool,
}

fn default_reference_limit() -> u64 {
    10_000
}

fn default_reference_sample() -> u64 {
    1_000
}

/// `[smoke]` in agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeConfig {
    pub command: Vec<String>,
    #[serde(with = "humantime_serde", default = "default_smoke_timeout")]
    pub timeout: Duration,
}

fn default_smoke_timeout() -> Duration {
    Duration::from_secs(120)
}

pub struct Checks {
    http: Vec<HttpRun>,
    pub(crate) invariants: Vec<Invariant>,
    pub(crate) references: Vec<Reference>,
    smoke: Option<SmokeConfig>,
}

impl Checks {
    pub fn from_config(
        file: &Path,
        http: &[HttpCheck],
        invariants: &[Invariant],
        references: &[Reference],
        smoke: Option<&SmokeConfig>,
    ) -> Result<Checks> {
        let mut resolved = Vec::with_capacity(http.len());
        for c in http {
            if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
                bail!(ConfigError::new(
                    file,
                    format!("check {:?}: url {:?} is not an http(s) URL", c.name, c.url),
                    "e.g. url = \"http://127.0.0.1:8080/readyz\""
                ));
            }
            if c.token_env.is_some() && c.token_file.is_some() {
                bail!(ConfigError::new(
                    file,
                    format!("check {:?}: both token_env and token_file are set", c.name),
                    "keep one of them"
                ));
            }
            let refused = |p: expect::Problem| {
                ConfigError::new(
                    file,
                    format!("check {:?}: {}: {}", c.name, p.key, p.problem),
                    p.fix,
                )
            };
            let status = StatusRule::parse(c.status.as_ref()).map_err(refused)?;
            let mut json: Vec<JsonRule> = c
                .expect
                .iter()
                .map(|(path, want)| JsonRule::dotted(path, want))
                .collect();
            for (i, e) in c.expect_json.iter().enumerate() {
                json.push(JsonRule::parse(i, e).map_err(refused)?);
            }
            let metrics = c
                .expect_metric
                .iter()
                .enumerate()
                .map(|(i, e)| MetricRule::parse(i, e).map_err(refused))
                .collect::<Result<Vec<_>, _>>()?;
            let mut check = c.clone();
            check.token_file = check.token_file.map(|p| api::config::resolve(file, &p));
            resolved.push(HttpRun {
                check,
                status,
                json,
                metrics,
            });
        }
        for i in invariants {
            if let InvariantExpect::Named(n) = &i.expect
                && n != "zero_rows"
            {
                bail!(ConfigError::new(
                    file,
                    format!("invariant {:?}: expect = {n:?} is not understood", i.name),
                    "use \"zero_rows\", { equals = N } or { at_least = N }"
                ));
            }
        }
        for r in references {
            if r.sql.trim().is_empty() || r.limit == 0 || r.sample == 0 || r.sample > r.limit {
                bail!(ConfigError::new(
                    file,
                    format!(
                        "reference {:?}: needs sql and 0 < sample <= limit (sample = {}, limit = {})",
                        r.name, r.sample, r.limit
                    ),
                    "e.g. sql = \"select object_key from artifacts\", limit = 10000, sample = 1000"
                ));
            }
        }
        if let Some(s) = smoke
            && (s.command.is_empty() || s.timeout.is_zero())
        {
            bail!(ConfigError::new(
                file,
                "[smoke] needs a command and a positive timeout",
                "e.g. command = [\"cowork-sim\", \"smoke\", \"worker\"], timeout = \"2m\""
            ));
        }
        Ok(Checks {
            http: resolved,
            invariants: invariants.to_vec(),
            references: references.to_vec(),
            smoke: smoke.cloned(),
        })
    }

    pub fn capabilities(&self) -> Vec<String> {
        let mut out = vec!["verify".to_owned()];
        if self.smoke.is_some() {
            out.push("smoke".into());
        }
        out
    }

    pub async fn http_checks(&self) -> Vec<Check> {
        let Ok(client) = crate::control::http_client(Duration::from_secs(10)) else {
            return vec![Check {
                name: "http".into(),
                kind: CheckKind::Http,
                required: true,
                passed: false,
                detail: "cannot build an HTTP client".into(),
            }];
        };
        let mut out = Vec::new();
        for run in &self.http {
            let (passed, detail) = match run_http(&client, run).await {
                Ok(detail) => (true, detail),
                Err(e) => (
                    false,
                    api::redact::redact(&api::errors::one_line(&*e)).into_owned(),
                ),
            };
            out.push(Check {
                name: run.check.name.clone(),
                kind: CheckKind::Http,
                required: run.check.required,
                passed,
                detail,
            });
        }
        out
    }

    /// Runs the smoke command. With the run's recovery point, the command finds it in
    /// `ROLLCALL_POINT` and the time it was taken (RFC 3339, whole seconds, never later than
    /// the backup's snapshot) in `ROLLCALL_POINT_TIME`.
    pub async fn smoke(&self, point: Option<&str>) -> Result<Check> {
        let smoke = self
            .smoke
            .as_ref()
            .context("this agent has no [smoke] command; add one to agent.toml")?;
        let mut cmd = tokio::process::Command::new(&smoke.command[0]);
        cmd.args(&smoke.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(point) = point {
            cmd.env("ROLLCALL_POINT", point);
            match repository::PointId::parse(point) {
                Ok(id) => {
                    cmd.env("ROLLCALL_POINT_TIME", id.timestamp().to_rfc3339());
                }
                Err(e) => tracing::warn!("point {point}: no time for the smoke command: {e:#}"),
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start the smoke command {:?}", smoke.command[0]))?;
        let output = match tokio::time::timeout(smoke.timeout, child.wait_with_output()).await {
            Ok(out) => out.context("wait for the smoke command")?,
            Err(_) => {
                return Ok(Check {
                    name: "smoke".into(),
                    kind: CheckKind::Smoke,
                    required: true,
                    passed: false,
                    detail: format!(
                        "did not finish within {}",
                        humantime::format_duration(smoke.timeout)
                    ),
                });
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let text = if output.status.success() {
            stdout
        } else {
            stderr
        };
        let detail = api::redact::redact(&one_line(&text, 600)).into_owned();
        Ok(Check {
            name: "smoke".into(),
            kind: CheckKind::Smoke,
            required: true,
            passed: output.status.success(),
            detail: if output.status.success() {
                detail
            } else {
                format!("exited with {}: {detail}", output.status)
            },
        })
    }
}

async fn run_http(client: &reqwest::Client, run: &HttpRun) -> Result<String> {
    let c = &run.check;
    let mut request = client.get(&c.url);
    if let Some(var) = &c.token_env {
        let token = std::env::var(var)
            .with_context(|| format!("token_env names {var}, which is not set for the agent"))?;
        request = request.bearer_auth(token);
    }
    if let Some(path) = &c.token_file {
        let token = std::fs::read_to_string(path).with_context(|| {
            format!(
                "read token_file {} (a file holding the bearer token)",
                api::redact::redact(&path.display().to_string())
            )
        })?;
        request = request.bearer_auth(token.trim());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("GET {} failed", c.url))?;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    if !run.status.accepts(status) {
        bail!(
            "GET {} answered {status}, expected {}: {}",
            c.url,
            run.status,
            api::redact::redact(tail(body.trim(), 200))
        );
    }
    // The path, not the whole URL: the report shows which endpoint answered, and a query
    // string (a signed URL's, say) stays out of it.
    let answered = format!("GET {} answered {status}", url_path(&c.url));
    let expected = run.json.len() + run.metrics.len();
    if expected == 0 {
        return Ok(answered);
    }
    let mut failures = Vec::new();
    if !run.json.is_empty() {
        let json: serde_json::Value = serde_json::from_str(&body).with_context(|| {
            format!(
                "GET {} did not answer JSON: {}",
                c.url,
                api::redact::redact(tail(body.trim(), 200))
            )
        })?;
        failures.extend(run.json.iter().filter_map(|rule| rule.check(&json)));
    }
    if !run.metrics.is_empty() {
        let samples = expect::parse_exposition(&body);
        failures.extend(run.metrics.iter().filter_map(|rule| rule.check(&samples)));
    }
    if !failures.is_empty() {
        bail!("GET {}: {}", c.url, failures.join("; "));
    }
    let what = match expected {
        1 => "1 expectation met".to_owned(),
        n => format!("{n} expectations met"),
    };
    Ok(format!("{answered}, {what}"))
}

/// The path of an http(s) URL (`/` when it names none); the URL itself when it does not parse.
fn url_path(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(|_| url.to_owned(), |u| u.path().to_owned())
}

/// A command's output as one line for the report: JSON (what smoke commands such as
/// `cowork-sim smoke` print, pretty) re-serialized compactly, any other text with each run of
/// whitespace made one space. Of a longer line only the end is kept (the last `max` bytes,
/// from a word's start), after "…".
fn one_line(text: &str, max: usize) -> String {
    let line = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(json) => json.to_string(),
        Err(_) => text.split_whitespace().collect::<Vec<_>>().join(" "),
    };
    if line.len() <= max {
        return line;
    }
    let end = tail(&line, max);
    let from_word = match end.split_once(' ') {
        Some((_, rest)) if !rest.is_empty() => rest,
        _ => end,
    };
    format!("…{from_word}")
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The failed required checks, for the command's message; None when all required passed.
pub fn failures(checks: &[Check]) -> Option<String> {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| c.required && !c.passed)
        .map(|c| format!("{} ({}): {}", c.name, c.kind, c.detail))
        .collect();
    (!failed.is_empty()).then(|| failed.join("; "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn invariant_expectations_parse() {
        let i: Invariant = toml::from_str("name = \"a\"\nsql = \"select 1\"\n").unwrap();
        assert_eq!(i.expect, InvariantExpect::Named("zero_rows".into()));
        let i: Invariant =
            toml::from_str("name = \"a\"\nsql = \"select 1\"\nexpect = { equals = 3 }\n").unwrap();
        assert_eq!(i.expect, InvariantExpect::Equals { equals: 3 });
        let bad: Invariant =
            toml::from_str("name = \"a\"\nsql = \"x\"\nexpect = \"some\"\n").unwrap();
        let err = Checks::from_config(Path::new("agent.toml"), &[], &[bad], &[], None)
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("expect = \"some\" is not understood")
        );
    }

    /// A real HTTP/1.1 server on loopback answering `path -> (status, content type, body)`;
    /// `/api/metrics` wants the bearer token `op-token`.
    async fn serve(routes: Vec<(&'static str, u16, &'static str, String)>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let routes = routes.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let authorized = head
                        .lines()
                        .any(|l| l.trim() == "authorization: bearer op-token");
                    let (status, kind, body) = match routes.iter().find(|r| r.0 == path) {
                        Some(_) if path == "/api/metrics" && !authorized => {
                            (401, "text/plain", "unauthorized".to_owned())
                        }
                        Some((_, status, kind, body)) => (*status, *kind, body.clone()),
                        None => (404, "text/plain", "not found".to_owned()),
                    };
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        addr
    }

    #[derive(Deserialize)]
    struct Only {
        check: Vec<HttpCheck>,
    }

    /// `[[check]]` sections with expectations, against a real server: statuses, JSON
    /// pointers, the older `expect` table and Prometheus samples, passing and failing.
    #[tokio::test]
    async fn http_checks_compare_pointers_statuses_and_metrics_of_a_real_server() {
        let diagnostics = serde_json::json!({
            "database": { "ok": true, "connections": 2 },
            "version": "1.4.0",
            "api_token": "cws_desktop_0123456789abcdef0123456789abcdef01234567",
        })
        .to_string();
        let metrics = "# HELP cowork_sessions Sessions by status.\n# TYPE cowork_sessions gauge\n\
                       cowork_sessions{status=\"open\"} 2\ncowork_sessions{status=\"closed\"} 7\n"
            .to_owned();
        let addr = serve(vec![
            ("/api/diagnostics", 200, "application/json", diagnostics),
            ("/api/metrics", 200, "text/plain; version=0.0.4", metrics),
            ("/created", 201, "text/plain", "made".into()),
        ])
        .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("operator-token"), "op-token\n").unwrap();
        let base = format!("http://{addr}");
        let text = format!(
            r#"
[[check]]
name = "diagnostics"
url = "{base}/api/diagnostics"
status = "2xx"
expect = {{ "database.ok" = true }}
[[check.expect_json]]
pointer = "/database/connections"
op = ">="
value = 1
[[check.expect_json]]
pointer = "/version"
op = "matches"
value = '^1\.\d+'
[[check.expect_json]]
pointer = "/maintenance"
op = "absent"

[[check]]
name = "diagnostics, failing"
url = "{base}/api/diagnostics"
required = false
[[check.expect_json]]
pointer = "/database/connections"
op = ">"
value = 5
[[check.expect_json]]
pointer = "/api_token"
op = "=="
value = "something else"

[[check]]
name = "sessions"
url = "{base}/api/metrics"
token_file = "operator-token"
[[check.expect_metric]]
name = "cowork_sessions"
labels = {{ status = "open" }}
op = ">="
value = 1
[[check.expect_metric]]
name = "cowork_sessions"
op = "=="
value = 9

[[check]]
name = "sessions, failing"
url = "{base}/api/metrics"
token_file = "operator-token"
[[check.expect_metric]]
name = "cowork_sessions"
labels = {{ status = "open" }}
op = ">"
value = 5

[[check]]
name = "sessions without a token"
url = "{base}/api/metrics"

[[check]]
name = "created"
url = "{base}/created"
status = [200, 201]

[[check]]
name = "created, only 200"
url = "{base}/created"
"#
        );
        let only: Only = toml::from_str(&text).unwrap();
        let checks =
            Checks::from_config(&dir.path().join("agent.toml"), &only.check, &[], &[], None)
                .unwrap();
        let got: Vec<(String, bool, String)> = checks
            .http_checks()
            .await
            .into_iter()
            .map(|c| (c.name, c.passed, c.detail))
            .collect();
        let want = [
            (
                "diagnostics",
                true,
                "GET /api/diagnostics answered 200, 4 expectations met".to_owned(),
            ),
            (
                "diagnostics, failing",
                false,
                format!(
                    "GET {base}/api/diagnostics: /database/connections is 2, expected > 5; \
                     /api_token is [REDACTED], expected == \"something else\""
                ),
            ),
            (
                "sessions",
                true,
                "GET /api/metrics answered 200, 2 expectations met".to_owned(),
            ),
            (
                "sessions, failing",
                false,
                format!(
                    "GET {base}/api/metrics: cowork_sessions{{status=\"open\"}} is 2, expected > 5"
                ),
            ),
            (
                "sessions without a token",
                false,
                format!("GET {base}/api/metrics answered 401, expected 200: unauthorized"),
            ),
            ("created", true, "GET /created answered 201".to_owned()),
            (
                "created, only 200",
                false,
                format!("GET {base}/created answered 201, expected 200: made"),
            ),
        ];
        let want: Vec<(String, bool, String)> = want
            .into_iter()
            .map(|(n, p, d)| (n.to_owned(), p, d))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            failures(&checks.http_checks().await).map(|f| f.matches("(http)").count()),
            Some(3),
            "the optional failing check does not fail the command"
        );
    }

    #[test]
    fn bad_http_expectations_stop_the_agent_naming_file_check_and_key() {
        let only: Only = toml::from_str(
            "[[check]]\nname = \"diag\"\nurl = \"http://127.0.0.1:1/\"\n\
             [[check.expect_json]]\npointer = \"/a\"\nop = \"~=\"\nvalue = 1\n",
        )
        .unwrap();
        let err = Checks::from_config(Path::new("agent.toml"), &only.check, &[], &[], None)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "agent.toml: check \"diag\": expect_json[0].op: \"~=\" is not an operator; \
             use one of ==, !=, >=, <=, >, <, exists, absent, matches"
        );
        let only: Only = toml::from_str(
            "[[check]]\nname = \"m\"\nurl = \"http://127.0.0.1:1/\"\nstatus = \"2xy\"\n",
        )
        .unwrap();
        let err = Checks::from_config(Path::new("agent.toml"), &only.check, &[], &[], None)
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with(
                "agent.toml: check \"m\": status: \"2xy\" is not a status; use a code"
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn smoke_commands_pass_fail_and_time_out() {
        let smoke = |script: &str, timeout: u64| SmokeConfig {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(timeout),
        };
        let run = async |s: SmokeConfig| {
            Checks::from_config(Path::new("agent.toml"), &[], &[], &[], Some(&s))
                .unwrap()
                .smoke(None)
                .await
                .unwrap()
        };
        let ok = run(smoke("echo one prompt processed", 5000)).await;
        assert!(ok.passed && ok.detail == "one prompt processed", "{ok:?}");
        let failed = run(smoke(
            "echo 'no worker answered token=cws_desktop_0123456789abcdef0123456789abcdef01234567' >&2; exit 2",
            5000,
        ))
        .await;
        assert!(
            !failed.passed
                && failed
                    .detail
                    .starts_with("exited with exit status: 2: no worker answered"),
            "{failed:?}"
        );
        assert!(
            !failed.detail.contains("cws_desktop_0123"),
            "redacted: {failed:?}"
        );
        let slow = run(smoke("sleep 5", 200)).await;
        assert!(!slow.passed && slow.detail.contains("did not finish within 200ms"));
        // Pretty JSON (what `cowork-sim smoke` prints) is one compact line in the report.
        let json = run(smoke(
            "printf '{\\n  \"role\": \"worker\",\\n  \"detail\": {\\n    \"lag\": 0\\n  }\\n}\\n'",
            5000,
        ))
        .await;
        assert_eq!(json.detail, r#"{"detail":{"lag":0},"role":"worker"}"#);
        let lines = run(smoke("printf 'claimed\\n\\n   one lease\\t done\\n'", 5000)).await;
        assert_eq!(lines.detail, "claimed one lease done");
    }

    #[test]
    fn one_line_keeps_the_end_of_long_output() {
        let long = format!("{} the end", "word ".repeat(200));
        let line = one_line(&long, 20);
        assert_eq!(line, "…word word the end");
        assert_eq!(
            url_path("http://127.0.0.1:8080/api/metrics?sig=abc"),
            "/api/metrics"
        );
        assert_eq!(url_path("http://127.0.0.1:8080"), "/");
    }

    #[tokio::test]
    async fn the_smoke_command_learns_the_runs_point_and_its_time() {
        let config = SmokeConfig {
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$ROLLCALL_POINT at $ROLLCALL_POINT_TIME\"".into(),
            ],
            timeout: Duration::from_secs(5),
        };
        let checks =
            Checks::from_config(Path::new("agent.toml"), &[], &[], &[], Some(&config)).unwrap();
        let point = "20261126T101500Z-staging-0a1b2c3d";
        let told = checks.smoke(Some(point)).await.unwrap();
        assert_eq!(
            told.detail,
            format!("{point} at 2026-11-26T10:15:00+00:00"),
            "{told:?}"
        );
        let untold = checks.smoke(None).await.unwrap();
        assert_eq!(untold.detail, "at", "{untold:?}");
    }
}
