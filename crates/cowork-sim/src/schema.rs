//! The schema: migrations embedded from `migrations/`, recorded in `schema_migrations`.

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::Row as _;
use sqlx::migrate::Migrator;

/// Where applied migrations are recorded (sqlx's format, under the service's table name).
pub const MIGRATIONS_TABLE: &str = "schema_migrations";

/// The embedded migrator, writing to [`MIGRATIONS_TABLE`].
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    migrator()
        .run(pool)
        .await
        .context("apply the cowork-sim migrations (recorded in schema_migrations)")
}

/// Which migrations the database has, against the ones this binary carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationStatus {
    pub applied: Vec<i64>,
    pub expected: Vec<i64>,
    /// A migration started and did not finish.
    pub dirty: bool,
    /// Applied equals expected and nothing is dirty.
    pub current: bool,
}

/// Reads the migration state without changing anything.
pub async fn status(pool: &PgPool) -> Result<MigrationStatus> {
    let expected: Vec<i64> = migrator()
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .collect();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('schema_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("look for the schema_migrations table")?;
    let mut applied = Vec::new();
    let mut dirty = false;
    if exists {
        let rows = sqlx::query("SELECT version, success FROM schema_migrations ORDER BY version")
            .fetch_all(pool)
            .await
            .context("read schema_migrations")?;
        for row in rows {
            let version: i64 = row.try_get("version")?;
            let success: bool = row.try_get("success")?;
            if success {
                applied.push(version);
            } else {
                dirty = true;
            }
        }
    }
    let current = !dirty && applied == expected;
    Ok(MigrationStatus {
        applied,
        expected,
        dirty,
        current,
    })
}

/// Fails with a clear message unless the schema is current: roles other than `web` refuse to
/// run on a database they do not understand.
pub async fn ensure_current(pool: &PgPool) -> Result<()> {
    let status = status(pool).await?;
    if status.current {
        return Ok(());
    }
    anyhow::bail!(
        "the database schema is not current (applied migrations {:?}, this binary expects {:?}{}): \
         run `cowork-sim migrate --database-url ...` first",
        status.applied,
        status.expected,
        if status.dirty {
            "; a migration failed half-way"
        } else {
            ""
        }
    )
}
