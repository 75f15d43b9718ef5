//! The data plane of the database and objects agents: backups into the repository, preflight
//! of a recovery point, and restores that never destroy data.
//!
//! * `[postgres]`: the live database (its URL from an environment variable or a file, never
//!   in the config itself). Restores go into a new database which is then swapped in; the
//!   previous database is kept under `<db>_pre_<run>` and named in the result.
//! * `[objects]`: the live object store. Restores make it equal the point's manifest; objects
//!   the restore replaces or removes are kept in the repository's `quarantine/<run>/` first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::config::{ConfigError, resolve};
use api::model::output::{Counts, PreflightOutput, RestoreObjectsOutput, RestorePostgresOutput};
use api::model::{Check, CheckKind, ObjectReferences, RepositoryRef};
use repository::{
    CountSpec, ObjectSnapshotPart, PgBackupOptions, PgBackupPart, PgRestoreOptions, PointId,
    RestoreObjectsOptions, S3Options, Shard, SnapshotOptions, TableColumns,
};
use serde::Deserialize;
use sqlx::Connection as _;

use crate::progress::Reporter;

/// `[postgres]` in agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Environment variable holding the live database URL.
    pub url_env: Option<String>,
    /// File holding the live database URL (relative to agent.toml).
    pub url_file: Option<PathBuf>,
    /// Directory of pg_dump / pg_restore; PATH and /usr/lib/postgresql/*/bin when unset.
    pub bin_dir: Option<PathBuf>,
    /// Parallel pg_restore jobs (default: this host's cores, the runbook's `pg_restore -j
    /// <cores>`; a point taken as one archive, by an older version, uses them only with
    /// scratch_dir).
    #[serde(default = "repository::default_restore_jobs")]
    pub jobs: u32,
    /// Connections that may load one split-off table of a parallel dump at once, its rows
    /// shared out between them (default: jobs); 1 loads each table with one COPY, as
    /// pg_restore does.
    pub copy_streams: Option<u32>,
    /// Where archives that must be files are staged: a parallel dump's schema archive (the
    /// system temporary directory when unset), an older single-archive dump for jobs > 1.
    pub scratch_dir: Option<PathBuf>,
    /// Tables to count: "table" or "table:column" (counts per value of column). Default:
    /// cowork-sim's restore-relevant tables.
    pub counts: Option<Vec<String>>,
}

/// `[objects]` in agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectsConfig {
    /// The live object store: file:///dir, s3://bucket/prefix, gs://..., az://...
    pub url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    #[serde(default)]
    pub s3_path_style: bool,
    /// Object copies in flight.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Key prefixes the role writes as scratch (health probes, temp files): verification
    /// does not count them as objects missing from the point.
    #[serde(default)]
    pub verify_ignore: Vec<String>,
}

fn default_parallelism() -> usize {
    64
}

pub struct DataPlane {
    postgres: Option<Postgres>,
    objects: Option<ObjectsConfig>,
    environment: String,
}

struct Postgres {
    config: PostgresConfig,
    url_file: Option<PathBuf>,
    counts: Vec<CountSpec>,
}

impl DataPlane {
    pub fn from_config(
        file: &Path,
        environment: &str,
        postgres: Option<&PostgresConfig>,
        objects: Option<&ObjectsConfig>,
    ) -> Result<DataPlane> {
        let postgres = match postgres {
            None => None,
            Some(p) => {
                if p.url_env.is_some() == p.url_file.is_some() {
                    bail!(ConfigError::new(
                        file,
                        "[postgres] needs exactly one of url_env and url_file",
                        "name the environment variable or file holding the database URL (the \
                         URL holds a password, so it never goes in agent.toml)"
                    ));
                }
                let counts = match &p.counts {
                    None => CountSpec::cowork_defaults(),
                    Some(list) => list
                        .iter()
                        .map(|c| match c.split_once(':') {
                            Some((table, column)) => CountSpec::grouped(table, column),
                            None => CountSpec::table(c),
                        })
                        .collect(),
                };
                Some(Postgres {
                    config: p.clone(),
                    url_file: p.url_file.as_ref().map(|f| resolve(file, f)),
                    counts,
                })
            }
        };
        if let Some(o) = objects
            && o.parallelism == 0
        {
            bail!(ConfigError::new(
                file,
                "objects.parallelism must be at least 1",
                "e.g. parallelism = 64"
            ));
        }
        Ok(DataPlane {
            postgres,
            objects: objects.cloned(),
            environment: environment.to_owned(),
        })
    }

    pub fn capabilities(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.postgres.is_some() {
            out.extend(["backup-postgres", "restore-postgres"].map(String::from));
        }
        if self.objects.is_some() {
            out.extend(["snapshot-objects", "restore-objects", "check-objects"].map(String::from));
        }
        if self.postgres.is_some() || self.objects.is_some() {
            out.push("preflight".into());
        }
        out
    }

    /// Whether this agent has a live object store (`[objects]`).
    pub fn has_objects(&self) -> bool {
        self.objects.is_some()
    }

    fn postgres(&self) -> Result<&Postgres> {
        self.postgres
            .as_ref()
            .context("this agent has no [postgres] section; it is not a database agent")
    }

    fn objects(&self) -> Result<&ObjectsConfig> {
        self.objects
            .as_ref()
            .context("this agent has no [objects] section; it is not an objects agent")
    }

    pub async fn backup_postgres(
        &self,
        repo: &RepositoryRef,
        point: &str,
        progress: &Reporter,
    ) -> Result<PgBackupPart> {
        let pg = self.postgres()?;
        let repo = repo.open().await?;
        let mut options = PgBackupOptions::new(PointId::parse(point)?, pg.url()?);
        options.bin_dir = pg.config.bin_dir.clone();
        options.counts = pg.counts.clone();
        options.progress = Some(progress.postgres());
        repository::backup_postgres(&repo, &options).await
    }

    pub async fn snapshot_objects(
        &self,
        repo: &RepositoryRef,
        point: &str,
        progress: &Reporter,
    ) -> Result<ObjectSnapshotPart> {
        let objects = self.objects()?;
        PointId::parse(point)?;
        let repo = repo.open().await?;
        let (live, label) = live_store(objects)?;
        let mut options = SnapshotOptions::new(label);
        options.environment = Some(self.environment.clone());
        options.parallelism = objects.parallelism;
        repository::snapshot_objects(&repo, live, &options, Some(progress.transfers())).await
    }

    /// Checks the point this agent would restore from, and records the live system's counts
    /// (database agent) so the report can show before → point → after.
    pub async fn preflight(&self, repo: &RepositoryRef, point: &str) -> Result<PreflightOutput> {
        let repo = repo.open().await?;
        let id = PointId::parse(point)?;
        let report = repo.verify_point(&id, false).await?;
        if !report.is_ok() {
            bail!(
                "point {point} failed verification: {}",
                report.problems.join("; ")
            );
        }
        let (live_counts, checks) = match &self.postgres {
            Some(pg) => {
                let point = repo.read_point(&id).await?;
                let at_point = point.postgres.as_ref().map(|p| &p.columns);
                let (counts, checks) = live_state(&pg.url()?, &pg.counts, at_point).await?;
                (Some(counts), checks)
            }
            None => (None, Vec::new()),
        };
        Ok(PreflightOutput {
            verify: Some(report),
            live_counts,
            checks,
        })
    }

    /// Restores the point's dump into `<db>_restore_<run>`, then swaps it in: the live
    /// database becomes `<db>_pre_<run>` (kept, never dropped) and the restored one takes the
    /// live name. Re-running after a crash finishes or redoes the step without losing either.
    pub async fn restore_postgres(
        &self,
        repo: &RepositoryRef,
        point: &str,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        let started = Instant::now();
        let pg = self.postgres()?;
        let live_url = pg.url()?;
        let (base, live_db, query) = split_database(&live_url)?;
        let tag = run_tag(run_id);
        let restore_db = format!("{live_db}_restore_{tag}");
        let pre_db = format!("{live_db}_pre_{tag}");
        if pre_db.len() > 63 || restore_db.len() > 63 {
            bail!(
                "database name {live_db:?} is too long to derive restore names from (Postgres \
                 allows 63 bytes)"
            );
        }
        let admin_url = format!("{base}/postgres{query}");
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .with_context(|| {
                format!(
                    "connect to the maintenance database of {} (the database agent needs a role \
                 that may create, rename and disconnect databases)",
                    repository::redact_url(&live_url)
                )
            })?;
        let exists = async |conn: &mut sqlx::PgConnection, name: &str| -> Result<bool> {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_one(conn)
                .await
                .context("query pg_database")?;
            Ok(n > 0)
        };
        let (has_live, has_pre, has_restore) = (
            exists(&mut admin, &live_db).await?,
            exists(&mut admin, &pre_db).await?,
            exists(&mut admin, &restore_db).await?,
        );
        let done = |resumed: &str, archive_bytes: u64| RestorePostgresOutput {
            database: live_db.clone(),
            pre_restore_database: pre_db.clone(),
            point: point.to_owned(),
            archive_bytes,
            resumed: resumed.to_owned(),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        if has_pre && has_live && !has_restore {
            // An earlier execution finished the swap.
            return Ok(done("already swapped", 0));
        }
        if has_pre && !has_live && has_restore {
            // Died between the two renames: finish the swap.
            rename(&mut admin, &restore_db, &live_db).await?;
            allow_connections(&mut admin, &pre_db, true).await?;
            return Ok(done("finished an interrupted swap", 0));
        }
        if !has_live {
            bail!(
                "the live database {live_db} does not exist (and no swap of this run is under \
                 way); check [postgres] url — refusing to guess"
            );
        }
        if has_restore {
            // Our own scratch copy from an interrupted attempt: never live data.
            tracing::warn!(database = %restore_db, "dropping an incomplete restore from an earlier attempt");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {}",
                ident(&restore_db)
            )))
            .execute(&mut admin)
            .await
            .with_context(|| format!("drop the incomplete {restore_db}"))?;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {} TEMPLATE template0",
            ident(&restore_db)
        )))
        .execute(&mut admin)
        .await
        .with_context(|| format!("create database {restore_db}"))?;

        let repo = repo.open().await?;
        let mut options = PgRestoreOptions::new(format!("{base}/{restore_db}{query}"));
        options.bin_dir = pg.config.bin_dir.clone();
        options.jobs = pg.config.jobs;
        options.copy_streams = pg.config.copy_streams;
        options.scratch_dir = pg.config.scratch_dir.clone();
        options.progress = Some(progress.postgres());
        let report = repository::restore_postgres(&repo, &PointId::parse(point)?, &options).await?;
        progress.report(api::model::Progress {
            stage: "swapping".into(),
            unit: "archives".into(),
            ..api::model::Progress::default()
        });

        // Swap: no new sessions on the live database, end the current ones, rename twice.
        allow_connections(&mut admin, &live_db, false).await?;
        let mut attempts = 0;
        loop {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&live_db)
            .execute(&mut admin)
            .await
            .context("disconnect sessions from the live database")?;
            match rename(&mut admin, &live_db, &pre_db).await {
                Ok(()) => break,
                Err(e) if attempts < 20 => {
                    attempts += 1;
                    tracing::debug!("rename not yet possible: {e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    allow_connections(&mut admin, &live_db, true).await?;
                    return Err(e);
                }
            }
        }
        rename(&mut admin, &restore_db, &live_db).await?;
        allow_connections(&mut admin, &pre_db, true).await?;
        Ok(done("", report.archive_bytes))
    }

    /// Makes the live store equal the point's manifest; displaced objects go to quarantine.
    pub async fn restore_objects(
        &self,
        repo: &RepositoryRef,
        point: &str,
        run_id: &str,
        shard: u32,
        shards: u32,
        progress: &Reporter,
    ) -> Result<RestoreObjectsOutput> {
        let objects = self.objects()?;
        // Several objects agents split one restore by key hash; each gets its shard.
        let shard = Shard::new(shard, shards).context("restore objects")?;
        let repo = repo.open().await?;
        let id = PointId::parse(point)?;
        let point = repo.read_point(&id).await?;
        let snapshot = point
            .objects
            .as_ref()
            .with_context(|| format!("point {id} has no object snapshot"))?
            .snapshot_id
            .clone();
        let (live, label) = live_store(objects)?;
        let mut options = RestoreObjectsOptions::new(label);
        options.parallelism = objects.parallelism;
        options.progress = Some(progress.transfers());
        // What the restore replaces or removes is kept in the repository, under
        // quarantine/<run tag>/, so the live store ends equal to the point.
        options.quarantine_in_repository = true;
        options.quarantine_prefix = Some(object_store::path::Path::from(format!(
            "quarantine/{}",
            run_tag(run_id)
        )));
        options.shard = Some(shard);
        let report = repository::restore_objects(&repo, &snapshot, live, &options).await?;
        Ok(RestoreObjectsOutput {
            snapshot: snapshot.as_str().to_owned(),
            shard: report.shard,
            shards: report.shards,
            restored: report.restored,
            restored_bytes: report.restored_bytes,
            unchanged: report.unchanged,
            replaced: report.replaced.len() as u64,
            removed: report.removed.len() as u64,
            quarantine_prefix: report.quarantine_prefix,
        })
    }
}

impl DataPlane {
    /// Verification against the point: count parity and invariants (database agent), the live
    /// store against the manifest (objects agent). Returns the checks and the live counts.
    pub async fn verify(
        &self,
        repo: &RepositoryRef,
        point: &str,
        invariants: &[crate::checks::Invariant],
        references: &[crate::checks::Reference],
    ) -> Result<Verified> {
        let mut checks = Vec::new();
        let mut counts = None;
        let mut keys = Vec::new();
        if self.postgres.is_none() && self.objects.is_none() {
            return Ok(Verified {
                checks,
                counts,
                references: keys,
            });
        }
        let repo = repo.open().await?;
        let id = PointId::parse(point)?;
        let recorded = repo.read_point(&id).await?;
        if let Some(pg) = &self.postgres {
            let live = count_tables(&pg.url()?, &pg.counts).await?;
            match recorded.table_counts() {
                None => checks.push(Check {
                    name: "count parity".into(),
                    kind: CheckKind::Count,
                    required: true,
                    passed: false,
                    detail: format!("point {point} recorded no table counts"),
                }),
                Some(at_point) => {
                    for (name, want) in at_point {
                        let got = live.get(name).copied().unwrap_or(0);
                        checks.push(Check {
                            name: format!("count {name}"),
                            kind: CheckKind::Count,
                            required: true,
                            passed: got == *want,
                            detail: format!("restored {got}, point {want}"),
                        });
                    }
                }
            }
            checks.extend(run_invariants(&pg.url()?, invariants).await?);
            keys = referenced_keys(&pg.url()?, references).await?;
            counts = Some(live);
        }
        if let Some(objects) = &self.objects {
            checks.push(match &recorded.objects {
                None => Check {
                    name: "objects match the point".into(),
                    kind: CheckKind::Objects,
                    required: true,
                    passed: false,
                    detail: format!("point {point} has no object snapshot"),
                },
                Some(part) => {
                    let manifest = repo.read_manifest(&part.snapshot_id).await?;
                    compare_with_manifest(objects, &manifest).await?
                }
            });
        }
        Ok(Verified {
            checks,
            counts,
            references: keys,
        })
    }

    /// The objects agent's answer to `check-objects`: does every key the restored rows name
    /// exist in the live store? One check per reference set, naming missing keys.
    pub async fn check_objects(&self, sets: &[ObjectReferences]) -> Result<Vec<Check>> {
        use futures::StreamExt as _;
        let objects = self.objects()?;
        let (live, _) = live_store(objects)?;
        let mut checks = Vec::new();
        for set in sets {
            let answers: Vec<(String, std::result::Result<bool, String>)> =
                futures::stream::iter(set.keys.clone())
                    .map(|key| lookup(live.clone(), key))
                    .buffer_unordered(CHECK_OBJECTS_IN_FLIGHT)
                    .collect()
                    .await;
            let mut missing: Vec<String> = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            for (key, found) in answers {
                match found {
                    Ok(true) => {}
                    Ok(false) => missing.push(key),
                    Err(e) => errors.push(e),
                }
            }
            missing.sort_unstable();
            let scope = if set.sampled {
                format!(
                    "a random sample of {} of {} rows",
                    set.keys.len(),
                    set.total
                )
            } else {
                format!("all {} rows", set.total)
            };
            let passed = missing.is_empty() && errors.is_empty();
            let mut detail = if missing.is_empty() {
                format!("every object present; checked {scope}")
            } else {
                format!(
                    "{} missing from the store: {}{}; checked {scope}",
                    missing.len(),
                    missing
                        .iter()
                        .take(10)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if missing.len() > 10 { ", ..." } else { "" },
                )
            };
            if let Some(first) = errors.first() {
                detail.push_str(&format!(
                    "; {} lookups failed (first: {first})",
                    errors.len()
                ));
            }
            checks.push(Check {
                name: set.name.clone(),
                kind: CheckKind::Reference,
                required: set.required,
                passed,
                detail,
            });
        }
        Ok(checks)
    }
}

/// Whether `key` exists in the live store (`Err`: the lookup itself failed).
async fn lookup(
    live: Arc<dyn object_store::ObjectStore>,
    key: String,
) -> (String, std::result::Result<bool, String>) {
    let found = match object_store::path::Path::parse(&key) {
        Err(e) => Err(format!("{key:?} is not an object key ({e})")),
        Ok(path) => match object_store::ObjectStoreExt::head(&live, &path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(format!("look up {key}: {e}")),
        },
    };
    (key, found)
}

/// Lookups in flight while checking referenced objects.
const CHECK_OBJECTS_IN_FLIGHT: usize = 32;

/// What `verify` found: the checks, the live table counts (database agent) and the object
/// keys the restored rows refer to, for the objects agent to look up.
#[derive(Debug, Default)]
pub struct Verified {
    pub checks: Vec<Check>,
    pub counts: Option<Counts>,
    pub references: Vec<ObjectReferences>,
}

/// Runs each `[[reference]]` query: every key when the rows are at most `limit`, else a random
/// sample of `sample` keys.
async fn referenced_keys(
    url: &str,
    references: &[crate::checks::Reference],
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

/// Every manifest key in the live store with its size, and nothing else (quarantine aside).
async fn compare_with_manifest(
    o: &ObjectsConfig,
    manifest: &repository::Manifest,
) -> Result<Check> {
    use futures::TryStreamExt;
    let (live, _) = live_store(o)?;
    let listed: Vec<object_store::ObjectMeta> = live
        .list(None)
        .try_collect()
        .await
        .context("list the live object store")?;
    let mut sizes: std::collections::BTreeMap<String, u64> = listed
        .into_iter()
        .filter(|m| !m.location.as_ref().starts_with(repository::QUARANTINE_ROOT))
        .filter(|m| {
            !o.verify_ignore
                .iter()
                .any(|p| m.location.as_ref().starts_with(p.as_str()))
        })
        .map(|m| (m.location.to_string(), m.size))
        .collect();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let ignored = |key: &str| o.verify_ignore.iter().any(|p| key.starts_with(p.as_str()));
    for entry in manifest.objects.iter().filter(|e| !ignored(&e.key)) {
        match sizes.remove(&entry.key) {
            None => missing.push(entry.key.clone()),
            Some(size) if size != entry.size => wrong.push(entry.key.clone()),
            Some(_) => {}
        }
    }
    let extra: Vec<String> = sizes.into_keys().collect();
    let passed = missing.is_empty() && wrong.is_empty() && extra.is_empty();
    let sample = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let detail = if passed {
        format!(
            "{} objects present with their sizes",
            manifest.objects.len()
        )
    } else {
        format!(
            "{} missing ({}), {} with another size ({}), {} not in the point ({})",
            missing.len(),
            sample(&missing),
            wrong.len(),
            sample(&wrong),
            extra.len(),
            sample(&extra)
        )
    };
    Ok(Check {
        name: "objects match the point".into(),
        kind: CheckKind::Objects,
        required: true,
        passed,
        detail,
    })
}

async fn run_invariants(url: &str, invariants: &[crate::checks::Invariant]) -> Result<Vec<Check>> {
    use crate::checks::InvariantExpect;
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

impl Postgres {
    /// The live database URL, read when needed (so a rotated password is picked up).
    fn url(&self) -> Result<String> {
        if let Some(var) = &self.config.url_env {
            return std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "postgres.url_env names {var}, which is not set in the agent's environment"
                )
            });
        }
        let file = self
            .url_file
            .as_ref()
            .context("postgres has neither url_env nor url_file")?;
        Ok(std::fs::read_to_string(file)
            .with_context(|| format!("read postgres.url_file {}", file.display()))?
            .trim()
            .to_owned())
    }
}

fn live_store(o: &ObjectsConfig) -> Result<(Arc<dyn object_store::ObjectStore>, String)> {
    let s3 = S3Options::connection(o.s3_endpoint.clone(), o.s3_region.clone(), o.s3_path_style);
    let (store, prefix) = repository::store_from_url(&o.url, &s3).with_context(|| {
        format!(
            "open the live object store {}",
            repository::redact_url(&o.url)
        )
    })?;
    let store: Arc<dyn object_store::ObjectStore> = if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    };
    Ok((store, repository::redact_url(&o.url)))
}

/// A short, stable tag for a run, fit for database names: `r` + 8 hex digits of its hash.
fn run_tag(run_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(run_id.as_bytes());
    format!("r{}", &hex::encode(digest)[..8])
}

/// `postgres://u:p@h:5432/db?x=y` → (`postgres://u:p@h:5432`, `db`, `?x=y`).
fn split_database(url: &str) -> Result<(String, String, String)> {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let slash = head[scheme_end..]
        .rfind('/')
        .map(|i| i + scheme_end)
        .with_context(|| {
            format!(
                "database URL {} names no database; write postgres://user@host:port/dbname",
                repository::redact_url(url)
            )
        })?;
    let db = &head[slash + 1..];
    if db.is_empty() {
        bail!(
            "database URL {} names no database; write postgres://user@host:port/dbname",
            repository::redact_url(url)
        );
    }
    Ok((head[..slash].to_owned(), db.to_owned(), query))
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn rename(conn: &mut sqlx::PgConnection, from: &str, to: &str) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} RENAME TO {}",
        ident(from),
        ident(to)
    )))
    .execute(conn)
    .await
    .with_context(|| format!("rename database {from} to {to}"))?;
    Ok(())
}

async fn allow_connections(conn: &mut sqlx::PgConnection, db: &str, allow: bool) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
        ident(db)
    )))
    .execute(conn)
    .await
    .with_context(|| format!("set ALLOW_CONNECTIONS {allow} on {db}"))?;
    Ok(())
}

/// What preflight reads from the live database before anything is frozen: the counts of the
/// tables it still has (the report's "before"), and the checks on what a disaster left: tables
/// gone (no count; the restore brings them back) and the schema against the point's.
async fn live_state(
    url: &str,
    specs: &[CountSpec],
    at_point: Option<&TableColumns>,
) -> Result<(std::collections::BTreeMap<String, i64>, Vec<Check>)> {
    let shown = repository::redact_url(url);
    let mut conn = match sqlx::PgConnection::connect(url).await {
        Ok(conn) => conn,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => bail!(
            "the live database of {shown} does not exist. If it was lost, create it empty \
             (createdb) and retry the run: the restore replaces it and keeps the empty one \
             under the pre-restore name; otherwise check [postgres] url"
        ),
        Err(e) => return Err(e).with_context(|| format!("connect to {shown}")),
    };
    let missing = repository::missing_tables(&mut conn, specs)
        .await
        .with_context(|| format!("look up the counted tables in {shown}"))?;
    let present: Vec<CountSpec> = specs
        .iter()
        .filter(|s| !missing.contains(&s.table))
        .cloned()
        .collect();
    let counts = repository::count_rows(&mut conn, &present)
        .await
        .with_context(|| format!("count tables in {shown}"))?;
    let mut checks = Vec::new();
    if !missing.is_empty() {
        checks.push(Check {
            name: "counted tables present".into(),
            kind: CheckKind::Preflight,
            required: false,
            passed: false,
            detail: format!(
                "the live database lacks {}: no count before the restore, which brings back \
                 the point's",
                missing.join(", ")
            ),
        });
    }
    if let Some(at_point) = at_point.filter(|c| !c.is_empty()) {
        let live = repository::table_columns(&mut conn)
            .await
            .with_context(|| format!("read the schema of {shown}"))?;
        checks.push(schema_check(at_point, &live));
    }
    let _ = conn.close().await;
    Ok((counts, checks))
}

/// The runbook's recovery boundary "do not drop additive schema columns as part of rollback":
/// tables and columns the live database has and the point does not are what a restore would
/// roll back. Optional: a restore to a point before a migration is sometimes the intent, and
/// the fix is the application's migrations afterwards, so it is a warning and a follow-up.
fn schema_check(at_point: &TableColumns, live: &TableColumns) -> Check {
    let mut newer = Vec::new();
    for (table, columns) in live {
        match at_point.get(table) {
            None => newer.push(format!("table {table}")),
            Some(known) => newer.extend(
                columns
                    .iter()
                    .filter(|c| !known.contains(c))
                    .map(|c| format!("{table}.{c}")),
            ),
        }
    }
    let detail = if newer.is_empty() {
        format!(
            "the live schema has no table or column the point lacks ({} tables)",
            live.len()
        )
    } else {
        let shown = newer
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let more = match newer.len() {
            n if n > 10 => format!(" and {} more", n - 10),
            _ => String::new(),
        };
        format!(
            "the live database has what the point lacks: {shown}{more}; the restore rolls \
             the schema back to the point's. Run the application's migrations after it (a \
             forward fix); never drop or re-add them by hand"
        )
    };
    Check {
        name: "schema not rolled back".into(),
        kind: CheckKind::Schema,
        required: false,
        passed: newer.is_empty(),
        detail,
    }
}

/// Counts rows of the configured tables in the live database, keyed as a point's counts.
async fn count_tables(
    url: &str,
    specs: &[CountSpec],
) -> Result<std::collections::BTreeMap<String, i64>> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {}", repository::redact_url(url)))?;
    repository::count_rows(&mut conn, specs)
        .await
        .with_context(|| format!("count tables in {}", repository::redact_url(url)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_schema_check_names_what_a_restore_rolls_back() {
        let cols = |pairs: &[(&str, &[&str])]| -> TableColumns {
            pairs
                .iter()
                .map(|(t, c)| (t.to_string(), c.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        let point = cols(&[("public.sessions", &["id", "title"])]);
        let same = schema_check(&point, &point);
        assert!(same.passed && !same.required, "{same:?}");
        // A column dropped since the point comes back with it: nothing is rolled back.
        let fewer = schema_check(&point, &cols(&[("public.sessions", &["id"])]));
        assert!(fewer.passed, "{fewer:?}");
        let newer = schema_check(
            &point,
            &cols(&[
                ("public.sessions", &["id", "title", "note"]),
                ("public.audit", &["id"]),
            ]),
        );
        assert!(!newer.passed, "{newer:?}");
        assert!(
            newer
                .detail
                .starts_with("the live database has what the point lacks: table public.audit, public.sessions.note;"),
            "{newer:?}"
        );
    }

    #[test]
    fn database_urls_split_and_run_tags_are_short() {
        assert_eq!(
            split_database("postgres://u:p@h:5432/cowork?sslmode=disable").unwrap(),
            (
                "postgres://u:p@h:5432".into(),
                "cowork".into(),
                "?sslmode=disable".into()
            )
        );
        let err = split_database("postgres://u:secret@h:5432/")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("names no database") && !err.contains("secret"),
            "{err}"
        );
        let tag = run_tag("drill-prod-20261125T101010-abcd");
        assert_eq!(tag.len(), 9);
        assert_eq!(tag, run_tag("drill-prod-20261125T101010-abcd"));
    }
}
