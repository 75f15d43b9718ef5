//! Database helpers shared by the roles, and the checks Rollcall runs against a restored
//! service: table counts, artifact bytes against their sha256, projections against events.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt as _;
use object_store::ObjectStore;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::Row as _;
use sqlx::postgres::PgPoolOptions;

use crate::Profile;
use crate::objects;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection pool to the service database.
pub async fn connect(database_url: &str) -> Result<PgPool> {
    connect_with(database_url, 8).await
}

/// Opens a pool of at most `max_connections`.
pub async fn connect_with(database_url: &str, max_connections: u32) -> Result<PgPool> {
    let shown = redact_url(database_url);
    if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
        anyhow::bail!(
            "database URL {shown:?} is not a postgres:// URL: pass --database-url (or set \
             DATABASE_URL) to e.g. postgres://user@127.0.0.1:5432/cowork"
        );
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(database_url)
        .await
        .with_context(|| {
            format!(
                "connect to Postgres at {shown}: check that the server is running and that \
                 --database-url (env DATABASE_URL) names an existing database"
            )
        })
}

/// The URL with any password replaced by `***`, safe for logs and reports.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// A new random id such as `ses_3f9c0a1b2c3d4e5f60718293`.
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    format!(
        "{prefix}_{:016x}{:08x}",
        rng.random::<u64>(),
        rng.random::<u32>()
    )
}

/// Deliveries by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounts {
    pub pending: i64,
    pub claimed: i64,
    pub sent: i64,
    pub failed: i64,
    pub dead: i64,
}

/// Row counts of the tables a restore must bring back (the drill report's "counts").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreCounts {
    pub sessions: i64,
    pub session_events: i64,
    pub session_projections: i64,
    pub artifact_index: i64,
    pub workflows: i64,
    pub channel_bindings: i64,
    pub channel_deliveries: DeliveryCounts,
}

impl RestoreCounts {
    /// Flat `(name, count)` pairs in a fixed order, e.g. `("channel_deliveries.dead", 3)`.
    pub fn as_pairs(&self) -> Vec<(&'static str, i64)> {
        let d = &self.channel_deliveries;
        vec![
            ("sessions", self.sessions),
            ("session_events", self.session_events),
            ("session_projections", self.session_projections),
            ("artifact_index", self.artifact_index),
            ("workflows", self.workflows),
            ("channel_bindings", self.channel_bindings),
            ("channel_deliveries.pending", d.pending),
            ("channel_deliveries.claimed", d.claimed),
            ("channel_deliveries.sent", d.sent),
            ("channel_deliveries.failed", d.failed),
            ("channel_deliveries.dead", d.dead),
        ]
    }
}

/// Counts the restore-relevant tables in one snapshot (one statement).
pub async fn counts(pool: &PgPool, profile: Profile) -> Result<RestoreCounts> {
    let row = sqlx::query(profile.sql(
        "SELECT
            (SELECT count(*) FROM {sessions}) AS sessions,
            (SELECT count(*) FROM {session_events}) AS session_events,
            (SELECT count(*) FROM {session_projections}) AS session_projections,
            (SELECT count(*) FROM {artifact_index}) AS artifact_index,
            (SELECT count(*) FROM {workflows}) AS workflows,
            (SELECT count(*) FROM {channel_bindings}) AS channel_bindings,
            d.pending, d.claimed, d.sent, d.failed, d.dead
         FROM (SELECT
                count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'claimed') AS claimed,
                count(*) FILTER (WHERE status = 'sent') AS sent,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                count(*) FILTER (WHERE status = 'dead') AS dead
               FROM {channel_deliveries}) d",
    ))
    .fetch_one(pool)
    .await
    .context("count the restore-relevant tables (is the schema migrated?)")?;
    Ok(RestoreCounts {
        sessions: row.try_get("sessions")?,
        session_events: row.try_get("session_events")?,
        session_projections: row.try_get("session_projections")?,
        artifact_index: row.try_get("artifact_index")?,
        workflows: row.try_get("workflows")?,
        channel_bindings: row.try_get("channel_bindings")?,
        channel_deliveries: DeliveryCounts {
            pending: row.try_get("pending")?,
            claimed: row.try_get("claimed")?,
            sent: row.try_get("sent")?,
            failed: row.try_get("failed")?,
            dead: row.try_get("dead")?,
        },
    })
}

/// Deliveries by status, on their own (cheap: no event count).
pub async fn delivery_counts(pool: &PgPool, profile: Profile) -> Result<DeliveryCounts> {
    let row = sqlx::query(profile.sql(
        "SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'claimed') AS claimed,
                count(*) FILTER (WHERE status = 'sent') AS sent,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                count(*) FILTER (WHERE status = 'dead') AS dead
         FROM {channel_deliveries}",
    ))
    .fetch_one(pool)
    .await
    .context("count channel deliveries by status")?;
    Ok(DeliveryCounts {
        pending: row.try_get("pending")?,
        claimed: row.try_get("claimed")?,
        sent: row.try_get("sent")?,
        failed: row.try_get("failed")?,
        dead: row.try_get("dead")?,
    })
}

/// How many problems lists keep by name; the counts are always complete.
const MAX_LISTED: usize = 20;

/// The outcome of reading indexed objects back and hashing them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactCheck {
    pub checked: u64,
    pub missing: u64,
    pub mismatched: u64,
    /// Up to 20 keys of missing objects.
    pub missing_keys: Vec<String>,
    /// Up to 20 keys whose size or sha256 differs from `artifact_index`.
    pub mismatched_keys: Vec<String>,
}

impl ArtifactCheck {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.mismatched == 0
    }
}

/// Reads every object in `artifact_index` (or the first `limit` by key) and compares its size
/// and sha256 with the row.
pub async fn verify_artifacts(
    pool: &PgPool,
    profile: Profile,
    store: &dyn ObjectStore,
    limit: Option<i64>,
) -> Result<ArtifactCheck> {
    let rows = sqlx::query(profile.sql(
        "SELECT object_key, size_bytes, sha256 FROM {artifact_index} ORDER BY object_key LIMIT $1",
    ))
    .bind(limit.unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .context("read artifact_index")?;
    let mut expected = Vec::with_capacity(rows.len());
    for row in rows {
        let key: String = row.try_get("object_key")?;
        let size: i64 = row.try_get("size_bytes")?;
        let sha: String = row.try_get("sha256")?;
        expected.push((key, size, sha));
    }
    let mut results = futures::stream::iter(expected)
        .map(|(key, size, sha)| async move {
            let found = objects::object_sha256(store, &key).await;
            (key, size, sha, found)
        })
        .buffer_unordered(16);
    let mut check = ArtifactCheck::default();
    while let Some((key, size, sha, found)) = results.next().await {
        check.checked += 1;
        match found? {
            None => {
                check.missing += 1;
                if check.missing_keys.len() < MAX_LISTED {
                    check.missing_keys.push(key);
                }
            }
            Some(stored) => {
                if i64::try_from(stored.size).ok() != Some(size) || stored.sha256 != sha {
                    check.mismatched += 1;
                    if check.mismatched_keys.len() < MAX_LISTED {
                        check.mismatched_keys.push(key);
                    }
                }
            }
        }
    }
    check.missing_keys.sort();
    check.mismatched_keys.sort();
    Ok(check)
}

/// Projections against the events they are derived from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionCheck {
    pub sessions: i64,
    /// Sessions without a projection row.
    pub missing: i64,
    /// Projection behind the latest event (the worker catches these up).
    pub lagging: i64,
    /// Projection ahead of the latest event: the events it was built from are gone.
    pub ahead: i64,
    /// Sessions whose events are not exactly 1..next_event_sequence-1.
    pub event_gaps: i64,
}

impl ProjectionCheck {
    /// Nothing is missing, ahead or gapped (lag is normal while a worker runs).
    pub fn consistent(&self) -> bool {
        self.missing == 0 && self.ahead == 0 && self.event_gaps == 0
    }
}

pub async fn verify_projections(pool: &PgPool, profile: Profile) -> Result<ProjectionCheck> {
    let row = sqlx::query(profile.sql(
        "SELECT count(*) AS sessions,
                count(*) FILTER (WHERE p.session_id IS NULL) AS missing,
                count(*) FILTER (WHERE p.sequence < s.next_event_sequence - 1) AS lagging,
                count(*) FILTER (WHERE p.sequence > s.next_event_sequence - 1) AS ahead,
                count(*) FILTER (WHERE coalesce(e.n, 0) <> s.next_event_sequence - 1
                                    OR coalesce(e.max_seq, 0) <> s.next_event_sequence - 1)
                    AS event_gaps
         FROM {sessions} s
         LEFT JOIN {session_projections} p ON p.session_id = s.id
         LEFT JOIN (SELECT session_id, count(*) AS n, max(sequence) AS max_seq
                    FROM {session_events} GROUP BY session_id) e ON e.session_id = s.id",
    ))
    .fetch_one(pool)
    .await
    .context("compare projections with session events")?;
    Ok(ProjectionCheck {
        sessions: row.try_get("sessions")?,
        missing: row.try_get("missing")?,
        lagging: row.try_get("lagging")?,
        ahead: row.try_get("ahead")?,
        event_gaps: row.try_get("event_gaps")?,
    })
}

/// Where one session's projection stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionStatus {
    pub session_id: String,
    pub event_count: i64,
    pub latest_event_sequence: i64,
    pub projection_sequence: i64,
    pub lag: i64,
}

/// The projection status of a session, if it exists (and belongs to `tenant` when given).
pub async fn projection_status(
    pool: &PgPool,
    profile: Profile,
    session_id: &str,
    tenant: Option<&str>,
) -> Result<Option<ProjectionStatus>> {
    let row = sqlx::query(profile.sql(
        "SELECT s.id,
                (SELECT count(*) FROM {session_events} e WHERE e.session_id = s.id) AS event_count,
                (SELECT coalesce(max(sequence), 0) FROM {session_events} e
                  WHERE e.session_id = s.id) AS latest,
                coalesce(p.sequence, 0) AS projected
         FROM {sessions} s LEFT JOIN {session_projections} p ON p.session_id = s.id
         WHERE s.id = $1 AND ($2::text IS NULL OR s.tenant_id = $2)",
    ))
    .bind(session_id)
    .bind(tenant)
    .fetch_optional(pool)
    .await
    .with_context(|| format!("read the projection status of session {session_id}"))?;
    let Some(row) = row else { return Ok(None) };
    let latest: i64 = row.try_get("latest")?;
    let projected: i64 = row.try_get("projected")?;
    Ok(Some(ProjectionStatus {
        session_id: row.try_get("id")?,
        event_count: row.try_get("event_count")?,
        latest_event_sequence: latest,
        projection_sequence: projected,
        lag: latest - projected,
    }))
}

/// Active workflows due for longer than `grace`: after a scheduler has run for a while this
/// should be zero ("due workflow claims" in the runbook).
pub async fn overdue_workflows(pool: &PgPool, profile: Profile, grace: Duration) -> Result<i64> {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    sqlx::query_scalar(profile.sql(
        "SELECT count(*) FROM {workflows}
         WHERE status = 'active' AND next_run_at < now() - $1 * interval '1 millisecond'",
    ))
    .bind(grace_ms)
    .fetch_one(pool)
    .await
    .context("count overdue workflows")
}

/// Records who did what to which target of a tenant, in the caller's transaction (the web
/// role's session writes, the seed's members and keys).
pub async fn audit(
    conn: &mut sqlx::PgConnection,
    profile: Profile,
    tenant_id: &str,
    actor: &str,
    action: &str,
    target: &str,
) -> Result<()> {
    sqlx::query(profile.sql(
        "INSERT INTO {audit_events} (tenant_id, actor, action, target) VALUES ($1, $2, $3, $4)",
    ))
    .bind(tenant_id)
    .bind(actor)
    .bind(action)
    .bind(target)
    .execute(conn)
    .await
    .context("record an audit event")?;
    Ok(())
}

/// A smoke session: one pending prompt for a worker to process end to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmokeSession {
    pub session_id: String,
    pub command_id: String,
    pub tenant_id: String,
}

/// Creates a session with one pending prompt in the first tenant (by id), in one transaction;
/// `None` when there is no tenant. Web's smoke hook (kind profile) and `cowork-sim smoke
/// worker` of the real profile, which writes with its own connection, both use it.
pub async fn create_smoke_session(
    pool: &PgPool,
    profile: Profile,
    actor: &str,
) -> Result<Option<SmokeSession>> {
    let mut tx = pool.begin().await.context("begin the smoke transaction")?;
    let tenant: Option<String> =
        sqlx::query_scalar(profile.sql("SELECT id FROM {tenants} ORDER BY id LIMIT 1"))
            .fetch_optional(&mut *tx)
            .await
            .context("find a tenant for the smoke session")?;
    let Some(tenant) = tenant else {
        return Ok(None);
    };
    let title = "rollcall smoke";
    let id = new_id("ses");
    let command_id = new_id("cmd");
    sqlx::query(profile.sql(
        "INSERT INTO {sessions} (id, tenant_id, account_id, title, status)
         VALUES ($1, $2, NULL, $3, 'idle')",
    ))
    .bind(&id)
    .bind(&tenant)
    .bind(title)
    .execute(&mut *tx)
    .await
    .context("create the smoke session")?;
    sqlx::query(
        profile.sql(
            "INSERT INTO {session_projections} (session_id, sequence, view) VALUES ($1, 0, $2)",
        ),
    )
    .bind(&id)
    .bind(crate::projection::SessionView::new(title).to_json())
    .execute(&mut *tx)
    .await
    .context("create the smoke session's projection")?;
    sqlx::query(profile.sql(
        "INSERT INTO {session_commands} (id, session_id, kind, payload, status)
         VALUES ($1, $2, 'prompt', $3, 'pending')",
    ))
    .bind(&command_id)
    .bind(&id)
    .bind(serde_json::json!({ "text": "rollcall smoke prompt" }))
    .execute(&mut *tx)
    .await
    .context("queue the smoke prompt")?;
    audit(&mut tx, profile, &tenant, actor, "session.smoke", &id).await?;
    tx.commit().await.context("commit the smoke session")?;
    Ok(Some(SmokeSession {
        session_id: id,
        command_id,
        tenant_id: tenant,
    }))
}

/// Creates a tenant (with a subscription) and returns its id.
pub async fn create_tenant(
    pool: &PgPool,
    profile: Profile,
    slug: &str,
    name: &str,
) -> Result<String> {
    let id = new_id("ten");
    let mut tx = pool.begin().await.context("begin a transaction")?;
    sqlx::query(profile.sql("INSERT INTO {tenants} (id, slug, name) VALUES ($1, $2, $3)"))
        .bind(&id)
        .bind(slug)
        .bind(name)
        .execute(&mut *tx)
        .await
        .with_context(|| format!("create tenant {slug:?} (is the slug already taken?)"))?;
    sqlx::query(profile.sql(
        "INSERT INTO {subscriptions} (id, tenant_id, plan, status, seats, current_period_end)
         VALUES ($1, $2, 'team', 'active', 5, now() + interval '30 days')",
    ))
    .bind(new_id("sub"))
    .bind(&id)
    .execute(&mut *tx)
    .await
    .with_context(|| format!("create the subscription of tenant {slug:?}"))?;
    tx.commit().await.context("commit the new tenant")?;
    Ok(id)
}

/// Creates an active workflow that first falls due at `first_due_unix_ms` and then every
/// `schedule_seconds`; returns its id.
pub async fn create_workflow(
    pool: &PgPool,
    profile: Profile,
    tenant_id: &str,
    name: &str,
    prompt: &str,
    schedule_seconds: i32,
    first_due_unix_ms: i64,
) -> Result<String> {
    anyhow::ensure!(
        schedule_seconds > 0,
        "workflow {name:?}: schedule_seconds must be positive, got {schedule_seconds}"
    );
    let id = new_id("wf");
    sqlx::query(
        profile.sql("INSERT INTO {workflows} (id, tenant_id, name, prompt, schedule_seconds, status, next_run_at)
         VALUES ($1, $2, $3, $4, $5, 'active', to_timestamp($6::float8 / 1000))"),
    )
    .bind(&id)
    .bind(tenant_id)
    .bind(name)
    .bind(prompt)
    .bind(schedule_seconds)
    .bind(first_due_unix_ms)
    .execute(pool)
    .await
    .with_context(|| format!("create workflow {name:?} for tenant {tenant_id}"))?;
    Ok(id)
}

/// Creates an active channel binding for a tenant; returns its id.
pub async fn create_channel_binding(
    pool: &PgPool,
    profile: Profile,
    tenant_id: &str,
    channel: &str,
    target: &str,
) -> Result<String> {
    let id = new_id("chb");
    sqlx::query(profile.sql(
        "INSERT INTO {channel_bindings} (id, tenant_id, channel, target, status)
         VALUES ($1, $2, $3, $4, 'active')",
    ))
    .bind(&id)
    .bind(tenant_id)
    .bind(channel)
    .bind(target)
    .execute(pool)
    .await
    .with_context(|| {
        format!(
            "create a {channel:?} channel binding for tenant {tenant_id} \
             (channel must be one of slack, email, webhook, teams)"
        )
    })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/cowork"),
            "postgres://app:***@db:5432/cowork"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:1/x"),
            "postgres://postgres@127.0.0.1:1/x"
        );
        assert_eq!(redact_url("postgres://h/db?a=b@c"), "postgres://h/db?a=b@c");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn ids_have_prefix_and_are_unique() {
        let a = new_id("ses");
        let b = new_id("ses");
        assert!(a.starts_with("ses_") && a.len() == 28, "{a}");
        assert_ne!(a, b);
    }
}
