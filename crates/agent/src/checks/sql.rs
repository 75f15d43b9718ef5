//! The database agent's SQL checks: `[[invariant]]` queries and `[[reference]]` queries that
//! name the object keys restored rows refer to.

use anyhow::{Context, Result};
use api::model::{Check, CheckKind, ObjectReferences};
use sqlx::Connection as _;

use super::{Invariant, InvariantExpect, Reference};

/// Runs each `[[reference]]` query: every key when the rows are at most `limit`, else a random
/// sample of `sample` keys.
pub(crate) async fn referenced_keys(
    url: &str,
    references: &[Reference],
) -> Result<Vec<ObjectReferences>> {
    if references.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {}", repository::redact_url(url)))?;
    let mut out = Vec::new();
    for r in references {
        let inner = r.sql.trim().trim_end_matches(';');
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from ({inner}) as referenced"
        )))
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("reference {:?}: count the rows of its query", r.name))?;
        let total = u64::try_from(total).unwrap_or(0);
        let sampled = total > r.limit;
        let sql = if sampled {
            format!(
                "select * from ({inner}) as referenced order by random() limit {}",
                r.sample
            )
        } else {
            inner.to_owned()
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .with_context(|| format!("reference {:?}: run its query", r.name))?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            use sqlx::Row as _;
            let key: String = row.try_get(0).with_context(|| {
                format!(
                    "reference {:?}: the query's first column must be text (an object key)",
                    r.name
                )
            })?;
            keys.push(key);
        }
        keys.sort_unstable();
        keys.dedup();
        out.push(ObjectReferences {
            name: r.name.clone(),
            keys,
            total,
            sampled,
            required: r.required,
        });
    }
    Ok(out)
}

pub(crate) async fn run_invariants(url: &str, invariants: &[Invariant]) -> Result<Vec<Check>> {
    if invariants.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {}", repository::redact_url(url)))?;
    let mut out = Vec::new();
    for inv in invariants {
        let (passed, detail) = match &inv.expect {
            InvariantExpect::Named(_) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(inv.sql.clone()))
                    .fetch_all(&mut conn)
                    .await;
                match rows {
                    Ok(rows) if rows.is_empty() => (true, "no violating rows".to_owned()),
                    Ok(rows) => (false, format!("{} violating rows", rows.len())),
                    Err(e) => (false, format!("query failed: {e}")),
                }
            }
            InvariantExpect::Equals { equals: want }
            | InvariantExpect::AtLeast { at_least: want } => {
                let got: Result<i64, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(inv.sql.clone()))
                    .fetch_one(&mut conn)
                    .await;
                match got {
                    Ok(got) => {
                        let ok = match inv.expect {
                            InvariantExpect::Equals { .. } => got == *want,
                            _ => got >= *want,
                        };
                        (ok, format!("got {got}, expected {:?}", inv.expect))
                    }
                    Err(e) => (
                        false,
                        format!("query failed (it must return one bigint): {e}"),
                    ),
                }
            }
        };
        out.push(Check {
            name: inv.name.clone(),
            kind: CheckKind::Invariant,
            required: inv.required,
            passed,
            detail,
        });
    }
    Ok(out)
}
