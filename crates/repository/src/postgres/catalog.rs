//! Reading the database's catalog: which tables exist and how large they are, their columns,
//! row counts as a point records them, and whether a restore target is empty.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
// Identifiers in dynamic SQL are quoted with `quote_ident`; values are bound.
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;

use super::conn::DbUrl;
use super::{CountSelection, CountSpec, TableColumns};

/// A table whose data may get an archive of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableSize {
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) bytes: u64,
}

impl TableSize {
    pub(super) fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// A pg_dump pattern matching exactly this table (quoted: no wildcards, any case).
    pub(super) fn pattern(&self) -> String {
        format!(
            "\"{}\".\"{}\"",
            self.schema.replace('"', "\"\""),
            self.table.replace('"', "\"\"")
        )
    }
}

/// Ordinary tables with data pg_dump dumps (not system or extension tables), largest first.
pub(super) async fn list_tables(conn: &mut PgConnection) -> Result<Vec<TableSize>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, coalesce(pg_relation_size(c.oid), 0) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                           AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 3 DESC, 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(schema, table, bytes)| TableSize {
            schema,
            table,
            bytes: bytes.max(0) as u64,
        })
        .collect())
}

/// What `selection` counts on `conn`: its list, or every user table `conn` sees (in its
/// transaction's snapshot, when one is open).
pub async fn count_specs(
    conn: &mut PgConnection,
    selection: &CountSelection,
) -> Result<Vec<CountSpec>> {
    match selection {
        CountSelection::Listed(specs) => Ok(specs.clone()),
        CountSelection::AllTables => user_tables(conn).await,
    }
}

/// One count per user table: ordinary and partitioned tables outside the system schemas,
/// neither an extension's nor a partition (its parent's count holds its rows), keyed by name in
/// `public` and as `schema.table` elsewhere. A name holding a `.` cannot be told from a schema
/// in a key: such a table is left out, with a warning.
pub async fn user_tables(conn: &mut PgConnection) -> Result<Vec<CountSpec>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't' \
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                           AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .context("list the user tables to count from pg_class")?;
    let mut specs = Vec::with_capacity(rows.len());
    for (schema, table) in rows {
        if schema.contains('.') || table.contains('.') {
            tracing::warn!(
                schema,
                table,
                "not counting a table whose name holds a '.': list the tables to count to \
                 include it"
            );
            continue;
        }
        specs.push(CountSpec {
            name: match schema.as_str() {
                "public" => table.clone(),
                _ => format!("{schema}.{table}"),
            },
            table: format!("{schema}.{table}"),
            group_by: None,
        });
    }
    Ok(specs)
}

/// The user tables on `conn` owned by a role other than the connected one, with their owners
/// (at most `limit`). A restore (`pg_restore --no-owner --no-acl`, as the runbook's) makes the
/// restoring role own every table it creates and grants nothing: a role that owned a table
/// before, or read it through a grant, cannot read it after the swap.
pub async fn tables_owned_by_others(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT format('%I.%I', n.nspname, c.relname), pg_get_userbyid(c.relowner)::text \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.relpersistence <> 't' \
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
           AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user) \
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                           AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 1 LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
    .context("read the owners of the user tables")
}

/// Whether `table` (`table` or `schema.table`, as [`CountSpec::table`]) exists on `conn`.
pub(super) async fn table_exists(conn: &mut PgConnection, table: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(quote_qualified(table))
        .fetch_one(&mut *conn)
        .await
        .with_context(|| format!("look up table {table}"))
}

/// The tables of `specs` that do not exist on `conn` (as `CountSpec::table` names them).
pub async fn missing_tables(conn: &mut PgConnection, specs: &[CountSpec]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for spec in specs {
        if !table_exists(conn, &spec.table).await? && !missing.contains(&spec.table) {
            missing.push(spec.table.clone());
        }
    }
    Ok(missing)
}

/// The columns of every ordinary and partitioned table outside the system schemas, as
/// `schema.table` → column names in their order. Read in the dump's snapshot at backup, and
/// from the live database at a restore's preflight, so the two compare.
pub async fn table_columns(conn: &mut PgConnection) -> Result<TableColumns> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, a.attname::text
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\\_%'
          ORDER BY 1, 2, a.attnum",
    )
    .fetch_all(&mut *conn)
    .await
    .context("read the tables' columns from pg_attribute")?;
    let mut columns = TableColumns::new();
    for (schema, table, column) in rows {
        columns
            .entry(format!("{schema}.{table}"))
            .or_default()
            .push(column);
    }
    Ok(columns)
}

/// Counts the rows of the tables of `specs` on `conn`, keyed as a point records them: the
/// total under [`CountSpec::name`], and for a grouped count `name[column=value]` per value
/// (NULL as `NULL`). A grouped count scans its table once: the total is the sum of its groups.
/// Backups count in the dump's snapshot; verification counts the restored database the same
/// way, so the two compare key by key.
pub async fn count_rows(
    conn: &mut PgConnection,
    specs: &[CountSpec],
) -> Result<BTreeMap<String, i64>> {
    let mut counts = BTreeMap::new();
    for spec in specs {
        let table = quote_qualified(&spec.table);
        let Some(column) = &spec.group_by else {
            let total: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&mut *conn)
                    .await
                    .with_context(|| format!("count rows of {}", spec.table))?;
            counts.insert(spec.name.clone(), total);
            continue;
        };
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT coalesce({col}::text, 'NULL'), count(*) FROM {table} GROUP BY 1",
            col = quote_ident(column)
        )))
        .fetch_all(&mut *conn)
        .await
        .with_context(|| format!("count rows of {} by {column}", spec.table))?;
        counts.insert(spec.name.clone(), rows.iter().map(|(_, n)| n).sum());
        for (value, n) in rows {
            *counts
                .entry(format!("{}[{column}={value}]", spec.name))
                .or_insert(0) += n;
        }
    }
    Ok(counts)
}

/// Fails, naming the database, when it already holds tables: a parallel dump cannot drop
/// what it replaces in the right order (its constraints come after its data).
pub(super) async fn check_empty(conn: &mut PgConnection, db: &DbUrl) -> Result<()> {
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'",
    )
    .fetch_one(&mut *conn)
    .await
    .with_context(|| format!("check that database {} is empty", db.display))?;
    if tables > 0 {
        bail!(
            "database {} already holds {tables} tables, views or sequences: restore into a new \
             database (create it, or let the restore create it) and swap it in, or drop it first",
            db.display
        );
    }
    Ok(())
}

pub(super) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub(super) fn quote_qualified(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(
            quote_qualified("public.we\"ird"),
            "\"public\".\"we\"\"ird\""
        );
    }
}
