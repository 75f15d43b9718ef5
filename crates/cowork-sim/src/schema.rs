//! The schema: one migration set (`migrations/`, relation names in braces) expanded per profile
//! ([`crate::profile`]) and recorded in the profile's ledger (`schema_migrations`, or
//! `cloud_migrations` in the real profile).

use std::borrow::Cow;

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::Row as _;
use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::Profile;

/// The migrations as written, relation names in braces: `(version, description, sql)`.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "control plane",
    include_str!("../migrations/0001_control_plane.sql"),
)];

/// The migrator of `profile`: its relation names, its ledger. The kind profile's SQL, and so
/// its checksums, are the files' text exactly as before profiles existed.
pub fn migrator(profile: Profile) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                sqlx::AssertSqlSafe(profile.expand(sql)).into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(profile.ledger());
    migrator
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool, profile: Profile) -> Result<()> {
    migrator(profile).run(pool).await.with_context(|| {
        format!(
            "apply the cowork-sim migrations of the {profile} profile (recorded in {})",
            profile.ledger()
        )
    })
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
pub async fn status(pool: &PgPool, profile: Profile) -> Result<MigrationStatus> {
    let expected: Vec<i64> = MIGRATIONS.iter().map(|(version, _, _)| *version).collect();
    let ledger = profile.ledger();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(ledger)
        .fetch_one(pool)
        .await
        .with_context(|| format!("look for the {ledger} table"))?;
    let mut applied = Vec::new();
    let mut dirty = false;
    if exists {
        let sql = match profile {
            Profile::Kind => "SELECT version, success FROM schema_migrations ORDER BY version",
            Profile::Real => "SELECT version, success FROM cloud_migrations ORDER BY version",
        };
        let rows = sqlx::query(sql)
            .fetch_all(pool)
            .await
            .with_context(|| format!("read {ledger}"))?;
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
pub async fn ensure_current(pool: &PgPool, profile: Profile) -> Result<()> {
    let status = status(pool, profile).await?;
    if status.current {
        return Ok(());
    }
    anyhow::bail!(
        "the database schema of the {profile} profile is not current (applied migrations {:?}, \
         this binary expects {:?}{}): run `cowork-sim migrate --database-url ...` first",
        status.applied,
        status.expected,
        if status.dirty {
            "; a migration failed half-way"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    /// The kind profile's migration is the file as it was before profiles: same schema, same
    /// checksum in `schema_migrations`, so databases migrated by older binaries stay current.
    #[test]
    fn kind_migration_is_unchanged() {
        let sql = Profile::Kind.expand(MIGRATIONS[0].2);
        assert_eq!(
            hex::encode(sha2::Sha256::digest(sql.as_bytes())),
            "92a428b899649ac0a76cd900338ab1ca8b82f7fe9dd6e8e256e55ef4931c2987"
        );
        let real = Profile::Real.expand(MIGRATIONS[0].2);
        assert!(real.contains("CREATE TABLE cloud_sessions ("), "{real}");
        assert!(real.contains("'^[0-9a-f]{64}$'"));
        for line in real.lines().filter(|l| l.contains("CREATE ")) {
            assert!(
                line.contains(" cloud_"),
                "a relation without the prefix: {line}"
            );
        }
    }
}
