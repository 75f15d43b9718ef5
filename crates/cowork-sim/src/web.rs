//! The `web` role: health and readiness, the operator endpoints the runbook verifies after a
//! restore, the session API, and read-only maintenance mode (the "freeze writes" step).
//!
//! Maintenance mode lives in the process, not the database: restoring the database must not
//! flip it, and Rollcall starts a restored web role already frozen (`--maintenance`).
//!
//! The real profile ([`crate::profile`]) has none of that, like the real service: no
//! maintenance mode, no `/healthz`, no smoke hook; `/readyz` lists named checks and probes
//! `health/readiness/<date>/<uuid>.txt`; a write on a database frozen read-only answers 503;
//! and the `cowork-sim web` process exits when Postgres terminates its connection.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::Deps;
use crate::auth::{self, Principal, Scope};
use crate::objects;
use crate::projection::SessionView;
use crate::schema;
use crate::store::{self, new_id};

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PROMPT_BYTES: usize = 32 * 1024;
const MAX_TITLE_CHARS: usize = 200;
const MAX_LIST: i64 = 500;
/// Seconds a frozen client is told to wait before retrying a write.
const RETRY_AFTER_SECONDS: &str = "5";

#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Names this instance in diagnostics and its readiness probe object.
    pub instance_id: String,
    /// Start in maintenance mode (writes answer 503).
    pub maintenance: bool,
}

/// Shared state of one web instance; cheap to clone.
#[derive(Clone)]
pub struct WebState(Arc<Inner>);

struct Inner {
    deps: Deps,
    instance_id: String,
    started: Instant,
    maintenance: AtomicBool,
    requests: AtomicU64,
    writes_rejected: AtomicU64,
}

impl WebState {
    pub fn new(deps: Deps, config: WebConfig) -> WebState {
        WebState(Arc::new(Inner {
            deps,
            instance_id: config.instance_id,
            started: Instant::now(),
            maintenance: AtomicBool::new(config.maintenance),
            requests: AtomicU64::new(0),
            writes_rejected: AtomicU64::new(0),
        }))
    }

    pub fn maintenance(&self) -> bool {
        self.0.maintenance.load(Ordering::SeqCst)
    }

    pub fn set_maintenance(&self, on: bool) {
        self.0.maintenance.store(on, Ordering::SeqCst);
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.0.deps.pool
    }

    pub fn profile(&self) -> crate::Profile {
        self.0.deps.profile
    }

    /// Postgres answers, the schema is current and the object store accepts a write.
    pub async fn readiness(&self) -> Readiness {
        let postgres = match tokio::time::timeout(
            PROBE_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(self.pool()),
        )
        .await
        {
            Ok(Ok(_)) => Check::ok("answers"),
            Ok(Err(e)) => Check::failed(format!("query failed: {e}")),
            Err(_) => Check::failed(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        let migrations = if postgres.ok {
            match schema::status(self.pool(), self.profile()).await {
                Ok(s) if s.current => Check::ok(format!("current ({:?})", s.applied)),
                Ok(s) => Check::failed(format!(
                    "applied {:?}, expected {:?}{}: run `cowork-sim migrate`",
                    s.applied,
                    s.expected,
                    if s.dirty { ", one failed half-way" } else { "" }
                )),
                Err(e) => Check::failed(format!("{e:#}")),
            }
        } else {
            Check::failed("postgres is not answering")
        };
        let probe_key = match self.profile() {
            crate::Profile::Kind => format!("_probe/web-{}", self.0.instance_id),
            crate::Profile::Real => objects::readiness_probe_key(),
        };
        let probe = objects::write_probe_at(self.0.deps.objects.as_ref(), &probe_key);
        let object_store = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(())) => Check::ok("accepts writes"),
            Ok(Err(e)) => Check::failed(format!("{e:#}")),
            Err(_) => Check::failed(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        Readiness {
            ready: postgres.ok && migrations.ok && object_store.ok,
            maintenance: self.maintenance(),
            postgres,
            migrations,
            object_store,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub maintenance: bool,
    pub postgres: Check,
    pub migrations: Check,
    pub object_store: Check,
}

impl Readiness {
    /// The real profile's answer: a status and a list of named checks (no maintenance mode).
    pub fn named(&self) -> Value {
        let checks: Vec<Value> = [
            ("postgres", &self.postgres),
            ("migrations", &self.migrations),
            ("object_store", &self.object_store),
        ]
        .into_iter()
        .map(|(name, check)| json!({ "name": name, "ok": check.ok, "detail": check.detail }))
        .collect();
        json!({
            "status": if self.ready { "ready" } else { "not_ready" },
            "checks": checks,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn ok(detail: impl Into<String>) -> Check {
        Check {
            ok: true,
            detail: detail.into(),
        }
    }

    fn failed(detail: impl Into<String>) -> Check {
        Check {
            ok: false,
            detail: detail.into(),
        }
    }
}

/// The router of the web role. The real profile has no `/healthz`, no maintenance mode and no
/// smoke hook: those paths answer 404 there, as on the real service.
pub fn router(state: WebState) -> Router {
    let mut router = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/api/workspace", get(workspace))
        .route("/api/diagnostics", get(diagnostics))
        .route("/api/metrics", get(metrics))
        .route("/api/sessions", get(list_sessions).post(create_session))
        .route(
            "/api/sessions/{id}/projection-status",
            get(projection_status),
        )
        .route("/api/sessions/{id}/prompt", post(prompt))
        .route("/api/channels/status", get(channel_status));
    if state.profile() == crate::Profile::Kind {
        router = router
            .route("/healthz", get(livez))
            .route(
                "/admin/maintenance",
                get(get_maintenance).post(set_maintenance),
            )
            .route("/admin/smoke", post(admin_smoke));
    }
    router
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Serves until `cancel` fires, then finishes in-flight requests.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: WebState,
    cancel: CancellationToken,
) -> Result<()> {
    let addr = listener.local_addr().context("read the listen address")?;
    tracing::info!(%addr, maintenance = state.maintenance(), "web role listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .context("serve HTTP")?;
    tracing::info!("web role stopped");
    Ok(())
}

/// Holds one connection of its own to the database and exits the process (status 70) once the
/// database ends it (`pg_terminate_backend`, a restart): the behaviour of a service whose
/// database client has no error handler. Checked every 250 ms.
pub async fn exit_on_db_loss(database_url: &str) -> Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .context("open the connection --exit-on-db-loss watches")?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Err(e) = sqlx::query("SELECT 1").execute(&mut conn).await {
                tracing::error!(
                    "the database ended this web role's connection ({e}); exiting \
                     (--exit-on-db-loss)"
                );
                std::process::exit(70);
            }
        }
    });
    Ok(())
}

/// Counts requests and, in maintenance mode, answers every write with 503. `/admin/` stays
/// writable so an operator can lift maintenance.
async fn guard(State(state): State<WebState>, request: Request, next: Next) -> Response {
    state.0.requests.fetch_add(1, Ordering::Relaxed);
    let is_write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if is_write && state.maintenance() && !request.uri().path().starts_with("/admin/") {
        state.0.writes_rejected.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER_SECONDS)],
            Json(json!({
                "error": "maintenance mode: writes are frozen while the service is restored; \
                          reads still work, retry the write later",
                "maintenance": true,
            })),
        )
            .into_response();
    }
    next.run(request).await
}

/// An error answered as `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

/// Set by the `cowork-sim web` command in the real profile (never in-process, where exiting
/// would end the host): a query that meets "terminating connection due to administrator
/// command" ends the process, as the real service's unhandled client error does.
static EXIT_ON_ADMIN_SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Makes this process exit (status 70) when any web query sees SQLSTATE 57P01.
pub fn exit_on_admin_shutdown() {
    EXIT_ON_ADMIN_SHUTDOWN.store(true, Ordering::SeqCst);
}

fn sqlstate(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        })
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        let code = sqlstate(&e);
        if code.as_deref() == Some("57P01") && EXIT_ON_ADMIN_SHUTDOWN.load(Ordering::SeqCst) {
            tracing::error!(
                "Postgres terminated this web role's connection ({e:#}); exiting, as the \
                 real service does"
            );
            std::process::exit(70);
        }
        if code.as_deref() == Some("25006") {
            tracing::warn!("web write refused, the database is read-only: {e:#}");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is read-only (writes are frozen); retry later",
            );
        }
        let unavailable = e.chain().any(|cause| {
            matches!(
                cause.downcast_ref::<sqlx::Error>(),
                Some(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed)
            )
        });
        if unavailable {
            tracing::warn!("web request failed, database unavailable: {e:#}");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable; retry later",
            );
        }
        tracing::error!("web request failed: {e:#}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the web role's log has the cause",
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        ApiError::from(anyhow::Error::new(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message }));
        if self.status == StatusCode::UNAUTHORIZED {
            return (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (self.status, body).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller of an `/api/` or `/admin/` endpoint.
pub struct Caller(pub Principal);

impl FromRequestParts<WebState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &WebState) -> ApiResult<Caller> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized(
                "missing Authorization header: send `Authorization: Bearer <token>`",
            )
        })?;
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        match auth::authenticate(state.pool(), state.profile(), token).await? {
            Some(principal) => Ok(Caller(principal)),
            None => Err(ApiError::unauthorized("unknown or revoked token")),
        }
    }
}

impl Caller {
    fn require(&self, allowed: &[Scope]) -> ApiResult<()> {
        if allowed.contains(&self.0.scope) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this endpoint needs a token with scope {}; this token has scope {}",
                names.join(" or "),
                self.0.scope
            ),
        ))
    }

    /// The tenant a desktop token acts for; `None` for fleet-wide tokens.
    fn tenant(&self) -> Option<&str> {
        self.0.tenant_id.as_deref()
    }

    fn desktop_tenant(&self) -> ApiResult<&str> {
        self.require(&[Scope::Desktop])?;
        self.tenant()
            .ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "this desktop token has no tenant"))
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn readyz(State(state): State<WebState>) -> Response {
    let report = state.readiness().await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match state.profile() {
        crate::Profile::Kind => (status, Json(report)).into_response(),
        crate::Profile::Real => (status, Json(report.named())).into_response(),
    }
}

async fn workspace(State(state): State<WebState>, caller: Caller) -> ApiResult<Json<Value>> {
    let profile = state.profile();
    caller.require(&[Scope::Desktop, Scope::Operator])?;
    let tenant = if caller.0.scope == Scope::Desktop {
        caller.tenant()
    } else {
        None
    };
    let rows = sqlx::query(profile.sql(
        "SELECT t.id, t.slug, t.name,
                (SELECT count(*) FROM {memberships} m WHERE m.tenant_id = t.id) AS members,
                (SELECT count(*) FROM {sessions} s WHERE s.tenant_id = t.id) AS sessions,
                (SELECT count(*) FROM {workflows} w WHERE w.tenant_id = t.id) AS workflows,
                (SELECT count(*) FROM {channel_bindings} b WHERE b.tenant_id = t.id)
                    AS channel_bindings,
                sub.plan, sub.status AS subscription_status, sub.seats,
                (SELECT coalesce(jsonb_agg(jsonb_build_object(
                            'provider', k.provider, 'last4', k.last4,
                            'storage', CASE WHEN k.kms_ref IS NULL THEN 'ciphertext'
                                            ELSE 'kms_ref' END,
                            'key_version', k.key_version) ORDER BY k.provider, k.id),
                         '[]'::jsonb)
                   FROM {byok_secrets} k WHERE k.tenant_id = t.id) AS byok
         FROM {tenants} t LEFT JOIN {subscriptions} sub ON sub.tenant_id = t.id
         WHERE ($1::text IS NULL OR t.id = $1)
         ORDER BY t.slug LIMIT 100",
    ))
    .bind(tenant)
    .fetch_all(state.pool())
    .await?;
    let mut tenants = Vec::with_capacity(rows.len());
    for row in rows {
        tenants.push(json!({
            "id": row.try_get::<String, _>("id")?,
            "slug": row.try_get::<String, _>("slug")?,
            "name": row.try_get::<String, _>("name")?,
            "members": row.try_get::<i64, _>("members")?,
            "sessions": row.try_get::<i64, _>("sessions")?,
            "workflows": row.try_get::<i64, _>("workflows")?,
            "channel_bindings": row.try_get::<i64, _>("channel_bindings")?,
            "subscription": {
                "plan": row.try_get::<Option<String>, _>("plan")?,
                "status": row.try_get::<Option<String>, _>("subscription_status")?,
                "seats": row.try_get::<Option<i32>, _>("seats")?,
            },
            "byok": row.try_get::<Value, _>("byok")?,
        }));
    }
    Ok(Json(json!({
        "scope": caller.0.scope,
        "tenants": tenants,
    })))
}

async fn diagnostics(State(state): State<WebState>, caller: Caller) -> ApiResult<Json<Value>> {
    let profile = state.profile();
    caller.require(&[Scope::Operator])?;
    let pool = state.pool();
    let server_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await?;
    let migrations = schema::status(pool, profile).await?;
    let workers = sqlx::query(profile.sql(
        "SELECT worker_id, status, commands_processed,
                extract(epoch FROM now() - last_seen_at)::float8 AS age
         FROM {worker_heartbeats} ORDER BY worker_id LIMIT 100",
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| {
        Ok(json!({
            "worker_id": row.try_get::<String, _>("worker_id")?,
            "status": row.try_get::<String, _>("status")?,
            "commands_processed": row.try_get::<i64, _>("commands_processed")?,
            "last_seen_seconds_ago": row.try_get::<f64, _>("age")?,
        }))
    })
    .collect::<Result<Vec<Value>, sqlx::Error>>()?;
    let commands = status_counts(
        pool,
        profile.sql("SELECT status, count(*) AS n FROM {session_commands} GROUP BY status"),
    )
    .await?;
    let workflows = status_counts(
        pool,
        profile.sql("SELECT status, count(*) AS n FROM {workflows} GROUP BY status"),
    )
    .await?;
    let deliveries = store::delivery_counts(pool, profile).await?;
    let lagging: i64 = sqlx::query_scalar(profile.sql(
        "SELECT count(*) FROM {sessions} s JOIN {session_projections} p ON p.session_id = s.id
         WHERE p.sequence < s.next_event_sequence - 1",
    ))
    .fetch_one(pool)
    .await?;
    let probe = tokio::time::timeout(
        PROBE_TIMEOUT,
        objects::write_probe_at(
            state.0.deps.objects.as_ref(),
            &match state.profile() {
                crate::Profile::Kind => format!("_probe/web-{}", state.0.instance_id),
                crate::Profile::Real => objects::readiness_probe_key(),
            },
        ),
    )
    .await;
    let (writable, object_error) = match probe {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => (false, Some(format!("{e:#}"))),
        Err(_) => (false, Some(format!("no answer within {PROBE_TIMEOUT:?}"))),
    };
    Ok(Json(json!({
        "instance": state.0.instance_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.0.started.elapsed().as_secs(),
        "maintenance": state.maintenance(),
        "database": {
            "server_version": server_version,
            "migrations": migrations,
        },
        "object_store": {
            "url": state.0.deps.objects_url,
            "writable": writable,
            "error": object_error,
        },
        "workers": workers,
        "commands": commands,
        "workflows": workflows,
        "deliveries": deliveries,
        "projections": { "lagging_sessions": lagging },
    })))
}

/// `{status: count}` from a `SELECT status, count(*) AS n ... GROUP BY status`.
async fn status_counts(pool: &sqlx::PgPool, sql: &'static str) -> ApiResult<Value> {
    let mut map = serde_json::Map::new();
    for row in sqlx::query(sql).fetch_all(pool).await? {
        map.insert(
            row.try_get::<String, _>("status")?,
            json!(row.try_get::<i64, _>("n")?),
        );
    }
    Ok(Value::Object(map))
}

async fn metrics(State(state): State<WebState>, caller: Caller) -> ApiResult<Response> {
    let profile = state.profile();
    caller.require(&[Scope::Operator])?;
    let pool = state.pool();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    gauge(
        "cowork_web_requests_total",
        "HTTP requests served by this web instance.",
        "counter",
        &[(
            String::new(),
            state.0.requests.load(Ordering::Relaxed) as f64,
        )],
    );
    gauge(
        "cowork_web_writes_rejected_total",
        "Writes answered 503 because of maintenance mode.",
        "counter",
        &[(
            String::new(),
            state.0.writes_rejected.load(Ordering::Relaxed) as f64,
        )],
    );
    gauge(
        "cowork_web_maintenance",
        "1 while this instance is in maintenance mode.",
        "gauge",
        &[(String::new(), f64::from(u8::from(state.maintenance())))],
    );
    for (name, help, sql) in [
        (
            "cowork_sessions",
            "Sessions by status.",
            "SELECT status, count(*) AS n FROM {sessions} GROUP BY status",
        ),
        (
            "cowork_session_commands",
            "Session commands by status.",
            "SELECT status, count(*) AS n FROM {session_commands} GROUP BY status",
        ),
        (
            "cowork_workflows",
            "Workflows by status.",
            "SELECT status, count(*) AS n FROM {workflows} GROUP BY status",
        ),
        (
            "cowork_channel_deliveries",
            "Channel deliveries by status.",
            "SELECT status, count(*) AS n FROM {channel_deliveries} GROUP BY status",
        ),
    ] {
        let rows = sqlx::query(profile.sql(sql)).fetch_all(pool).await?;
        let mut samples = Vec::with_capacity(rows.len());
        for row in rows {
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            samples.push((format!("{{status=\"{status}\"}}"), n as f64));
        }
        gauge(name, help, "gauge", &samples);
    }
    let events: i64 = sqlx::query_scalar(
        profile.sql("SELECT coalesce(sum(next_event_sequence - 1), 0)::bigint FROM {sessions}"),
    )
    .fetch_one(pool)
    .await?;
    gauge(
        "cowork_session_events",
        "Session events appended.",
        "gauge",
        &[(String::new(), events as f64)],
    );
    let lagging: i64 = sqlx::query_scalar(profile.sql(
        "SELECT count(*) FROM {sessions} s JOIN {session_projections} p ON p.session_id = s.id
         WHERE p.sequence < s.next_event_sequence - 1",
    ))
    .fetch_one(pool)
    .await?;
    gauge(
        "cowork_projection_lagging_sessions",
        "Sessions whose projection is behind their events.",
        "gauge",
        &[(String::new(), lagging as f64)],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
    status: Option<String>,
    tenant: Option<String>,
}

const SESSION_STATUSES: [&str; 4] = ["idle", "running", "closed", "errored"];

async fn list_sessions(
    State(state): State<WebState>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let profile = state.profile();
    caller.require(&[Scope::Desktop, Scope::Operator])?;
    let Query(query) = query.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIST}, got {limit}"
        )));
    }
    if let Some(status) = &query.status
        && !SESSION_STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "unknown status {status:?}: use one of {}",
            SESSION_STATUSES.join(", ")
        )));
    }
    // A desktop token only ever sees its own tenant.
    let tenant = match caller.0.scope {
        Scope::Desktop => caller.tenant().map(str::to_owned),
        _ => query.tenant,
    };
    let rows = sqlx::query(profile.sql(
        "SELECT id, tenant_id, title, status, next_event_sequence - 1 AS event_count,
                to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                    AS created_at
         FROM {sessions}
         WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id
         LIMIT $3",
    ))
    .bind(tenant)
    .bind(query.status)
    .bind(limit)
    .fetch_all(state.pool())
    .await?;
    let mut sessions = Vec::with_capacity(rows.len());
    for row in rows {
        sessions.push(json!({
            "id": row.try_get::<String, _>("id")?,
            "tenant_id": row.try_get::<String, _>("tenant_id")?,
            "title": row.try_get::<String, _>("title")?,
            "status": row.try_get::<String, _>("status")?,
            "event_count": row.try_get::<i64, _>("event_count")?,
            "created_at": row.try_get::<String, _>("created_at")?,
        }));
    }
    Ok(Json(json!({ "sessions": sessions })))
}

async fn projection_status(
    State(state): State<WebState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<store::ProjectionStatus>> {
    caller.require(&[Scope::Desktop, Scope::Operator])?;
    let tenant = if caller.0.scope == Scope::Desktop {
        caller.tenant()
    } else {
        None
    };
    store::projection_status(state.pool(), state.profile(), &id, tenant)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no session {id}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    title: Option<String>,
    channel_binding_id: Option<String>,
}

async fn create_session(
    State(state): State<WebState>,
    caller: Caller,
    body: Result<Json<CreateSession>, JsonRejection>,
) -> ApiResult<Response> {
    let profile = state.profile();
    let tenant = caller.desktop_tenant()?.to_owned();
    let Json(body) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let title = body
        .title
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "Untitled session".to_owned());
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::bad_request(format!(
            "title is longer than {MAX_TITLE_CHARS} characters"
        )));
    }
    let id = new_id("ses");
    let mut tx = state.pool().begin().await?;
    if let Some(binding) = &body.channel_binding_id {
        let found: Option<i32> = sqlx::query_scalar(
            profile.sql("SELECT 1 FROM {channel_bindings} WHERE id = $1 AND tenant_id = $2"),
        )
        .bind(binding)
        .bind(&tenant)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("channel binding {binding} does not exist in this tenant"),
            ));
        }
    }
    sqlx::query(profile.sql(
        "INSERT INTO {sessions} (id, tenant_id, account_id, title, status)
         VALUES ($1, $2, $3, $4, 'idle')",
    ))
    .bind(&id)
    .bind(&tenant)
    .bind(caller.0.account_id.as_deref())
    .bind(&title)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        profile.sql(
            "INSERT INTO {session_projections} (session_id, sequence, view) VALUES ($1, 0, $2)",
        ),
    )
    .bind(&id)
    .bind(SessionView::new(&title).to_json())
    .execute(&mut *tx)
    .await?;
    if let Some(binding) = &body.channel_binding_id {
        sqlx::query(profile.sql(
            "INSERT INTO {channel_session_bindings} (binding_id, session_id) VALUES ($1, $2)",
        ))
        .bind(binding)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    }
    store::audit(
        &mut tx,
        profile,
        &tenant,
        &caller.0.token_id,
        "session.create",
        &id,
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "tenant_id": tenant,
            "title": title,
            "status": "idle",
            "channel_binding_id": body.channel_binding_id,
        })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptBody {
    text: String,
}

async fn prompt(
    State(state): State<WebState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<PromptBody>, JsonRejection>,
) -> ApiResult<Response> {
    let profile = state.profile();
    let tenant = caller.desktop_tenant()?.to_owned();
    let Json(body) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    if body.text.trim().is_empty() {
        return Err(ApiError::bad_request("text is empty"));
    }
    if body.text.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::bad_request(format!(
            "text is longer than {MAX_PROMPT_BYTES} bytes"
        )));
    }
    let status: Option<String> = sqlx::query_scalar(
        profile.sql("SELECT status FROM {sessions} WHERE id = $1 AND tenant_id = $2"),
    )
    .bind(&id)
    .bind(&tenant)
    .fetch_optional(state.pool())
    .await?;
    match status.as_deref() {
        None => return Err(ApiError::not_found(format!("no session {id}"))),
        Some("closed") => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("session {id} is closed; create a new session"),
            ));
        }
        Some(_) => {}
    }
    let command_id = new_id("cmd");
    sqlx::query(profile.sql(
        "INSERT INTO {session_commands} (id, session_id, kind, payload, status)
         VALUES ($1, $2, 'prompt', $3, 'pending')",
    ))
    .bind(&command_id)
    .bind(&id)
    .bind(json!({ "text": body.text }))
    .execute(state.pool())
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "command_id": command_id, "session_id": id, "status": "pending" })),
    )
        .into_response())
}

async fn channel_status(State(state): State<WebState>, caller: Caller) -> ApiResult<Json<Value>> {
    let profile = state.profile();
    caller.require(&[Scope::Gateway, Scope::Operator])?;
    let deliveries = store::delivery_counts(state.pool(), profile).await?;
    let row = sqlx::query(profile.sql(
        "SELECT (SELECT count(*) FROM {channel_bindings}) AS bindings,
                (SELECT count(*) FROM {channel_session_bindings}) AS cursors,
                (SELECT coalesce(sum(last_event_sequence), 0)::bigint
                   FROM {channel_session_bindings}) AS cursor_sum",
    ))
    .fetch_one(state.pool())
    .await?;
    Ok(Json(json!({
        "deliveries": deliveries,
        "bindings": row.try_get::<i64, _>("bindings")?,
        "cursors": row.try_get::<i64, _>("cursors")?,
        "cursor_sum": row.try_get::<i64, _>("cursor_sum")?,
    })))
}

/// The operator's smoke hook (works in maintenance, like every `/admin/` route): a session
/// with one prompt in the first tenant, for a worker to process end to end.
async fn admin_smoke(State(state): State<WebState>, caller: Caller) -> ApiResult<Response> {
    caller.require(&[Scope::Operator])?;
    let created =
        store::create_smoke_session(state.pool(), state.profile(), &caller.0.token_id).await?;
    let Some(created) = created else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "there is no tenant to run a smoke session in; seed the service first".to_owned(),
        ));
    };
    Ok((StatusCode::CREATED, Json(json!(created))).into_response())
}

async fn get_maintenance(State(state): State<WebState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require(&[Scope::Operator])?;
    Ok(Json(json!({ "maintenance": state.maintenance() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceBody {
    enabled: bool,
}

async fn set_maintenance(
    State(state): State<WebState>,
    caller: Caller,
    body: Result<Json<MaintenanceBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    caller.require(&[Scope::Operator])?;
    let Json(body) = body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("{}; send {{\"enabled\": true|false}}", e.body_text()),
        )
    })?;
    let was = state.maintenance();
    state.set_maintenance(body.enabled);
    tracing::info!(
        token = %caller.0.token_id,
        from = was,
        to = body.enabled,
        "maintenance mode set"
    );
    Ok(Json(json!({ "maintenance": body.enabled, "was": was })))
}
