//! Postgres backups into the repository and restores out of it. This file holds what the parts
//! share: the types a point records about its dump, the counts to take and progress reports.
//! The parts import these from here (never the other way round); `lib.rs` re-exports the
//! public API from each part.
//!
//! Backup ([`backup`]): open a REPEATABLE READ transaction, export its snapshot
//! (`pg_export_snapshot()`), count the configured tables in it (every user table by default),
//! and run several
//! `pg_dump --snapshot` processes on that same snapshot at once, so the counts describe exactly
//! what the dump holds:
//!
//! * `schema`: `--section=pre-data --section=post-data` (definitions; indexes, constraints and
//!   materialized view refreshes);
//! * `data`: `--section=data` for everything but the tables split off (small tables, sequence
//!   values, large objects);
//! * `data-<n>`: `--section=data -t ...` for the largest tables, spread over the parts by size.
//!
//! Each pg_dump writes an uncompressed custom archive (`-Z0`) that we compress with zstd and
//! stream into its own multipart upload while hashing it: no local copy. The uploads are
//! committed only when every pg_dump succeeded; otherwise the completed ones are deleted.
//!
//! Restore ([`restore`]): the schema archive (small) is fetched and checked first and restores
//! the pre-data section; the data archives are streamed out of the repository ([`fetch`]),
//! checked against their sha256 and decompressed into one `pg_restore` each, several at once.
//! As each one commits, the indexes and constraints on its own tables are built
//! (`pg_restore -L`, planned from the schema archive's table of contents by [`toc`]), while the
//! other archives still load, as `pg_restore -j` does for a single archive; the rest of
//! post-data (foreign keys, triggers, attaches, materialized views) follows all data, with
//! parallel jobs. A split-off table's rows may load over several connections
//! ([`parallel_copy`]). Dumps of older points (one archive) are streamed into `pg_restore` in
//! one transaction, or restored from a scratch file with parallel jobs.
//!
//! A restore into a new database is swapped in for the live one by [`swap`], which keeps the
//! live database under another name.
//!
//! Passwords travel to the tools in `PGPASSWORD`, never on a command line ([`conn`]).

pub(crate) mod backup;
pub(crate) mod catalog;
mod conn;
pub(crate) mod copy;
pub(crate) mod fetch;
pub(crate) mod freeze;
pub(crate) mod kept;
mod parallel_copy;
pub(crate) mod physical;
pub(crate) mod restore;
pub(crate) mod swap;
mod toc;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How the dump is compressed in the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Compression {
    /// `pg_dump -Z0`, then zstd at `level` with `workers` threads in this process (default).
    Zstd { level: i32, workers: u32 },
    /// pg_dump's own compression (the runbook's plain `--format=custom`); single-threaded.
    PgDump,
    /// No compression at all.
    None,
}

impl Default for Compression {
    /// Level 1, one thread per archive: the archives of one backup are compressed
    /// concurrently, so more threads per archive only add hand-over costs.
    fn default() -> Self {
        Compression::Zstd {
            level: 1,
            workers: 1,
        }
    }
}

impl Compression {
    pub(crate) fn is_compressed(&self) -> bool {
        matches!(self, Compression::Zstd { .. })
    }
}

/// One count taken at backup time: rows of `table`, optionally broken down by a column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountSpec {
    /// Key in the point's `table_counts` (grouped counts add `name[column=value]` keys).
    pub name: String,
    /// `table` or `schema.table`.
    pub table: String,
    pub group_by: Option<String>,
}

impl CountSpec {
    pub fn table(table: &str) -> CountSpec {
        CountSpec {
            name: table.to_owned(),
            table: table.to_owned(),
            group_by: None,
        }
    }

    pub fn grouped(table: &str, column: &str) -> CountSpec {
        CountSpec {
            name: table.to_owned(),
            table: table.to_owned(),
            group_by: Some(column.to_owned()),
        }
    }

    /// The specs that count what a point's `table_counts` keys name: `table`, or
    /// `table[column=value]` (counted per value of the column).
    pub fn for_keys<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<CountSpec> {
        let mut specs: Vec<CountSpec> = Vec::new();
        for key in keys {
            let spec = match key.split_once('[') {
                Some((table, rest)) => match rest.split_once('=') {
                    Some((column, _)) => CountSpec::grouped(table, column),
                    None => continue,
                },
                None => CountSpec::table(key),
            };
            // A grouped count also gives the table's total: one spec per table.
            match specs.iter_mut().find(|s| s.table == spec.table) {
                Some(held) if held.group_by.is_none() => *held = spec,
                Some(_) => {}
                None => specs.push(spec),
            }
        }
        specs
    }
}

/// Which tables to count: every user table, or a list (none when empty). Never a guessed list:
/// a service's own tables come from its config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CountSelection {
    /// Every user table the counted snapshot holds: ordinary and partitioned tables outside
    /// the system schemas, not an extension's, not a partition (its parent's count holds its
    /// rows). Keys are table names for `public`, `schema.table` for any other schema.
    #[default]
    AllTables,
    /// These counts; an empty list counts nothing.
    Listed(Vec<CountSpec>),
}

impl CountSelection {
    /// No counts at all.
    pub fn none() -> CountSelection {
        CountSelection::Listed(Vec::new())
    }
}

/// How far a Postgres backup or restore has come, one archive at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PgProgress {
    /// `dumping`, `pre-data`, `data`, `post-data`, `restoring`, `done`.
    pub stage: &'static str,
    pub archives_done: u64,
    pub archives_total: u64,
    /// Archive bytes stored (backup) or handed to pg_restore (restore) so far.
    pub bytes_done: u64,
    /// Archive bytes in all (a restore knows it up front; a backup does not: 0).
    pub bytes_total: u64,
}

/// Called with [`PgProgress`]; must be cheap.
#[derive(Clone)]
pub struct PgProgressFn(pub Arc<dyn Fn(&PgProgress) + Send + Sync>);

impl std::fmt::Debug for PgProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgProgressFn")
    }
}

fn report(progress: Option<&PgProgressFn>, p: PgProgress) {
    if let Some(callback) = progress {
        (callback.0)(&p);
    }
}

/// A completed dump in the repository, as the point records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgBackupPart {
    /// Repository key of the dump: the archive itself (one archive, points before parallel
    /// dumps), or the directory holding [`PgBackupPart::files`].
    pub key: String,
    pub compression: Compression,
    /// Bytes stored (all archives).
    pub size: u64,
    /// sha256 of the bytes stored. For a parallel dump: the sha256 of its `sha256sum` listing,
    /// one line `<sha256>  <key>\n` per file in the order of `files`.
    pub sha256: String,
    /// Bytes pg_dump wrote (before our compression; all archives).
    pub dump_size: u64,
    /// The archives of a parallel dump; empty for a single archive at `key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<DumpFile>,
    /// Database name (no host, user or password).
    pub database: String,
    pub server_version: String,
    pub pg_dump_version: String,
    /// The exported snapshot the dump and the counts were taken in.
    pub snapshot: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Row counts in the dump's snapshot, keyed by [`CountSpec::name`].
    pub table_counts: BTreeMap<String, i64>,
    /// The columns of every table in the dump's snapshot, `schema.table` → column names (empty
    /// for points taken before it was recorded). A restore's preflight compares the live
    /// database with it: what the live schema has and the point lacks, a restore rolls back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: TableColumns,
    /// The server the dump was taken on, as far as the backup's role could see it (none for
    /// points taken before it was recorded): a restore test's preflight refuses to restore
    /// into that server's database of the same name, the source itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerIdentity>,
}

/// Which PostgreSQL server a session is connected to: its cluster's system identifier
/// (`pg_control_system()`, which a role may not be allowed to call) and the address and port
/// the server answered on (none over a Unix socket). Each part is None when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl ServerIdentity {
    /// What this session can see of its server; a part it may not read stays None. Run
    /// outside a transaction (a refused call must not abort one).
    pub async fn read(conn: &mut sqlx::PgConnection) -> ServerIdentity {
        let system_identifier: Option<String> =
            sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
                .fetch_one(&mut *conn)
                .await
                .ok();
        let (address, port): (Option<String>, Option<i32>) =
            sqlx::query_as("SELECT host(inet_server_addr()), inet_server_port()")
                .fetch_one(&mut *conn)
                .await
                .unwrap_or((None, None));
        ServerIdentity {
            system_identifier,
            address,
            port,
        }
    }

    /// Some(true) when both carry the same system identifier, Some(false) when both carry one
    /// and they differ, None otherwise. Addresses prove nothing either way: one server answers
    /// on several (a host address and loopback, a pooler, a Service), and one address names
    /// different servers on different hosts (127.0.0.1). A clone of a server (a restored base
    /// backup, a promoted replica) keeps its identifier: Some(true) for another server.
    pub fn same_server(&self, other: &ServerIdentity) -> Option<bool> {
        match (&self.system_identifier, &other.system_identifier) {
            (Some(a), Some(b)) => Some(a == b),
            _ => None,
        }
    }
}

/// One custom-format archive of a parallel dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpFile {
    /// Repository key of the archive.
    pub key: String,
    pub content: DumpContent,
    /// Bytes stored.
    pub size: u64,
    /// sha256 of the bytes stored.
    pub sha256: String,
    /// Bytes pg_dump wrote (before our compression).
    pub dump_size: u64,
}

/// What one archive of a parallel dump holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DumpContent {
    /// The pre-data and post-data sections: restored before and after all data.
    Schema,
    /// The data section without the tables split off into [`DumpContent::Tables`] archives.
    Data,
    /// The data of these tables (`schema.table`) and the values of their owned sequences.
    Tables { tables: Vec<String> },
}

/// One stored archive, whichever layout it comes from.
#[derive(Debug, Clone)]
pub(crate) struct Archive {
    pub(crate) key: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) compressed: bool,
}

impl PgBackupPart {
    /// The stored archives: the files of a parallel dump, or the single archive.
    pub(crate) fn archives(&self) -> Vec<Archive> {
        let compressed = self.compression.is_compressed();
        if self.files.is_empty() {
            return vec![Archive {
                key: self.key.clone(),
                size: self.size,
                sha256: self.sha256.clone(),
                compressed,
            }];
        }
        self.files
            .iter()
            .map(|f| Archive {
                key: f.key.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                compressed,
            })
            .collect()
    }
}

/// Tables and their columns: `schema.table` → column names in their order.
pub type TableColumns = BTreeMap<String, Vec<String>>;

#[cfg(test)]
mod tests {
    use super::ServerIdentity;

    fn server(id: Option<&str>, at: Option<(&str, i32)>) -> ServerIdentity {
        ServerIdentity {
            system_identifier: id.map(str::to_owned),
            address: at.map(|(a, _)| a.to_owned()),
            port: at.map(|(_, p)| p),
        }
    }

    #[test]
    fn one_server_only_by_its_system_identifier() {
        let a = server(Some("7301"), Some(("10.0.0.5", 5432)));
        // The system identifier decides when both have one, whatever the addresses.
        assert_eq!(
            a.same_server(&server(Some("7301"), Some(("10.9.9.9", 6000)))),
            Some(true)
        );
        assert_eq!(
            a.same_server(&server(Some("9999"), Some(("10.0.0.5", 5432)))),
            Some(false)
        );
        // Without both identifiers nothing is known, whatever the addresses say: one server
        // answers on several, one loopback address names a server per host.
        assert_eq!(a.same_server(&server(None, Some(("10.0.0.5", 5432)))), None);
        assert_eq!(a.same_server(&server(None, Some(("10.0.0.5", 5433)))), None);
        // A Unix socket without the identifier: cannot tell.
        assert_eq!(a.same_server(&server(None, None)), None);
        assert_eq!(server(None, None).same_server(&server(None, None)), None);
    }
}
