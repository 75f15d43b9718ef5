//! The data plane of the database and objects agents: backups into the repository, preflight
//! of a recovery point, restores that never destroy data, and verification against the point.
//!
//! * `[postgres]` ([`postgres`]): the live database (its URL from an environment variable or a
//!   file, never in the config itself). Restores go into a new database which is then swapped
//!   in; the previous database is kept under `<db>_pre_<run>` and named in the result.
//! * `[objects]` ([`objects`]): the live object store. Preflight hashes every blob a restore
//!   into it would write (the delta; `verify = "full"`: every blob) and keeps them in the
//!   agent's scratch directory for that run's restore. Restores make it equal the point's
//!   manifest; objects the restore replaces or removes are kept in the repository's
//!   `quarantine/<run>/` first.
//! * `[postgres.freeze]` ([`postgres`]): freezing writes at the database for services without
//!   a maintenance mode (`repository::DatabaseFreeze`); whether it is frozen is remembered in
//!   the state directory, so a swap carries the freeze onto the restored database until the
//!   unfreeze, across agent restarts.

mod objects;
mod physical;
mod postgres;
mod provider;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use api::config::{ConfigError, resolve};
use api::model::output::{Counts, PreflightOutput};
use api::model::{Check, CheckKind, ObjectReferences, RepositoryRef};
use repository::{CountSelection, CountSpec, PointId, VerifyOptions};
use serde::Deserialize;

use objects::compare_with_manifest;
pub use physical::PhysicalConfig;
use postgres::{count_tables, live_state};
pub use provider::ProviderConfig;

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
    /// Tables to count: "table", "schema.table" or "table:column" (counts per value of
    /// column); `[]` counts none. Default: every user table, in the dump's snapshot at backup,
    /// and then what the point counted.
    pub counts: Option<Vec<String>>,
    /// Freezing writes at the database: the application's login roles become read-only in the
    /// live database on `freeze`, until `unfreeze`.
    pub freeze: Option<DbFreezeConfig>,
    /// Restores to a time (`rollcall drill --to-time T`) of a self-hosted server: its data
    /// directory, replaced by one recovered from the repository's base backups and WAL.
    pub physical: Option<PhysicalConfig>,
    /// Restores to a time of a managed Postgres: the provider's own point-in-time restore,
    /// called through an adapter command, copied into the live server and swapped in.
    pub provider: Option<ProviderConfig>,
}

/// `[postgres.freeze]` in agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbFreezeConfig {
    /// The login roles the application connects as (not this agent's own connections, which
    /// opt out). Processes that must write while frozen connect with the startup option
    /// `default_transaction_read_only=off`.
    pub roles: Vec<String>,
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
    /// Which blobs preflight reads and hashes before anything is frozen: `delta` (default)
    /// those a restore into the live store would write; `full` every blob of the point.
    #[serde(default)]
    pub verify: VerifyMode,
    /// Where preflight keeps the blobs it read, one directory per run, for that run's restore
    /// (default: `rollcall-scratch-<agent name>` in the system temporary directory). Other
    /// runs' directories in it are removed at the next preflight; a restore that succeeded
    /// removes its own.
    pub scratch_dir: Option<PathBuf>,
    /// The most the scratch directory holds, in MiB (default 2048); never more than half the
    /// space free on its file system. Blobs past it are checked all the same and read again
    /// by the restore; 0 keeps none.
    #[serde(default = "default_scratch_limit_mib")]
    pub scratch_limit_mib: u64,
    /// Whether preflight keeps the blobs it proved for the restore: `auto` (default) when the
    /// repository is not a local directory (a second read from a bucket costs a transfer; a
    /// second read from a local disk costs less than writing the scratch: bench/README.md),
    /// `always`, or `never`.
    #[serde(default)]
    pub scratch: ScratchMode,
}

/// `[objects] scratch`: when preflight keeps the blobs it read for the restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScratchMode {
    /// For repositories that are not `file://` directories.
    #[default]
    Auto,
    Always,
    Never,
}

impl ScratchMode {
    /// Whether to keep the blobs read from the repository at `repository_url`.
    pub fn keeps_for(self, repository_url: &str) -> bool {
        match self {
            ScratchMode::Always => true,
            ScratchMode::Never => false,
            ScratchMode::Auto => !repository_url.starts_with("file:"),
        }
    }
}

/// `[objects] verify`: what preflight hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// The blobs a restore into the live store would write.
    #[default]
    Delta,
    /// Every blob of the point.
    Full,
}

fn default_parallelism() -> usize {
    64
}

fn default_scratch_limit_mib() -> u64 {
    2048
}

pub struct DataPlane {
    postgres: Option<Postgres>,
    /// Whether writes are frozen at the database (`[postgres.freeze]`), kept in the state
    /// directory ([`DataPlane::with_state_dir`]).
    frozen: Option<postgres::FrozenMemory>,
    objects: Option<ObjectsConfig>,
    /// The objects agent's scratch directory (holding one directory per run).
    scratch_root: PathBuf,
    environment: String,
    /// `[restore_test] teardown = true`: teardown commands are obeyed.
    teardown_allowed: bool,
    /// `[restore_test] another_server = true`: a database of the source's name is vouched to
    /// be on another server.
    another_server: bool,
}

struct Postgres {
    config: PostgresConfig,
    url_file: Option<PathBuf>,
    counts: CountSelection,
    /// `[postgres.provider]`, its program resolved against agent.toml.
    provider: Option<ProviderConfig>,
}

impl Postgres {
    /// What to count in a database to compare with a point that counted `at_point`: the
    /// configured tables, or, when every user table is counted, what the point counted (the
    /// live database may have gained or lost tables since).
    fn counts_for(&self, at_point: Option<&Counts>) -> CountSelection {
        match (&self.counts, at_point) {
            (CountSelection::AllTables, Some(counted)) => {
                CountSelection::Listed(CountSpec::for_keys(counted.keys()))
            }
            (selection, _) => selection.clone(),
        }
    }
}

impl DataPlane {
    pub fn from_config(
        file: &Path,
        agent: &str,
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
                if let Some(freeze) = &p.freeze
                    && (freeze.roles.is_empty() || freeze.roles.iter().any(|r| r.trim().is_empty()))
                {
                    bail!(ConfigError::new(
                        file,
                        "postgres.freeze.roles must name at least one role, none empty",
                        "list the login roles the application connects as, e.g. roles = [\"app\"]"
                    ));
                }
                if p.physical.is_some() && p.provider.is_some() {
                    bail!(ConfigError::new(
                        file,
                        "[postgres.physical] and [postgres.provider] are both set",
                        "keep [postgres.physical] for a self-hosted server whose WAL is archived \
                         into the repository, or [postgres.provider] for a managed Postgres \
                         restored by its provider; a server is one or the other"
                    ));
                }
                let provider = p.provider.as_ref().map(|c| c.validated(file)).transpose()?;
                let counts = match &p.counts {
                    None => CountSelection::AllTables,
                    Some(list) => CountSelection::Listed(
                        list.iter()
                            .map(|c| match c.split_once(':') {
                                Some((table, column)) => CountSpec::grouped(table, column),
                                None => CountSpec::table(c),
                            })
                            .collect(),
                    ),
                };
                Some(Postgres {
                    config: p.clone(),
                    url_file: p.url_file.as_ref().map(|f| resolve(file, f)),
                    counts,
                    provider,
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
        let scratch_root = match objects.and_then(|o| o.scratch_dir.as_ref()) {
            Some(dir) => resolve(file, dir),
            None => std::env::temp_dir().join(format!("rollcall-scratch-{agent}")),
        };
        Ok(DataPlane {
            postgres,
            frozen: None,
            objects: objects.cloned(),
            scratch_root,
            environment: environment.to_owned(),
            teardown_allowed: false,
            another_server: false,
        })
    }

    /// Whether this agent obeys a restore test's teardown (`[restore_test] teardown = true`).
    pub fn with_teardown(mut self, allowed: bool) -> DataPlane {
        self.teardown_allowed = allowed;
        self
    }

    /// Whether the operator vouches that this agent's database, named like the source's, is on
    /// another server (`[restore_test] another_server = true`).
    pub fn with_another_server(mut self, vouched: bool) -> DataPlane {
        self.another_server = vouched;
        self
    }

    /// Refuses a teardown unless this agent's own config allows it: a coordinator that sends
    /// one to the wrong agent (a live environment's) must not make it drop anything.
    fn check_teardown_allowed(&self, what: &str) -> Result<()> {
        if !self.teardown_allowed {
            bail!(
                "{what} refused: this agent does not allow restore-test teardowns; if it serves a \
                 restore-test environment (never a live one), add [restore_test] teardown = true \
                 to its agent.toml and restart it"
            );
        }
        Ok(())
    }

    /// Opens what this data plane remembers in the agent's state directory (whether writes
    /// are frozen at the database).
    pub fn with_state_dir(mut self, state_dir: &Path) -> Result<DataPlane> {
        self.frozen = Some(postgres::FrozenMemory::open(state_dir)?);
        Ok(self)
    }

    /// Whether this agent freezes writes at the database (`[postgres.freeze]`).
    pub fn freezes(&self) -> bool {
        self.postgres
            .as_ref()
            .is_some_and(|p| p.config.freeze.is_some())
    }

    pub fn capabilities(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.freezes() {
            out.extend(["freeze".to_owned(), "unfreeze".to_owned()]);
        }
        if self.postgres.is_some() {
            out.extend(
                [
                    "backup-postgres",
                    "restore-postgres",
                    "prepare-postgres",
                    "commit-postgres",
                    "undo-postgres",
                    "list-kept",
                    "prune-kept",
                ]
                .map(String::from),
            );
        }
        if self.objects.is_some() {
            out.extend(
                [
                    "snapshot-objects",
                    "restore-objects",
                    "check-objects",
                    "undo-objects",
                ]
                .map(String::from),
            );
        }
        if self
            .postgres
            .as_ref()
            .is_some_and(|p| p.config.physical.is_some())
        {
            out.push("base-backup".into());
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

    /// A point of another environment (a restore test) restored into the store it was taken
    /// from, or one overlapping it, would overwrite the source's live objects with no freeze:
    /// refused before anything is read or changed.
    async fn refuse_restoring_onto_the_source(
        &self,
        repo: &repository::Repository,
        id: &PointId,
        objects: &ObjectsConfig,
    ) -> Result<()> {
        let point = repo.read_point(id).await?;
        let Some(part) = &point.objects else {
            return Ok(());
        };
        if point.environment == self.environment {
            return Ok(());
        }
        let ours = repository::redact_url(&objects.url);
        if stores_overlap(&ours, &part.source) {
            bail!(
                "point {id} of environment {} was taken from object store {}, and this agent's \
                 store {ours} is that store or overlaps it: a restore test must restore into \
                 another bucket or a prefix outside the source's (fix [objects] url)",
                point.environment,
                part.source
            );
        }
        Ok(())
    }

    fn objects(&self) -> Result<&ObjectsConfig> {
        self.objects
            .as_ref()
            .context("this agent has no [objects] section; it is not an objects agent")
    }

    /// Checks the point this agent would restore from, and records the live system's counts
    /// (database agent) so the report can show before → point → after. An objects agent
    /// also proves every blob its restore would write, keeping them for run `run_id`.
    pub async fn preflight(
        &self,
        repo: &RepositoryRef,
        point: &str,
        run_id: &str,
    ) -> Result<PreflightOutput> {
        // Before anything else: a freeze that could not hold blocks here, nothing changed.
        if self.freezes() {
            self.check_database_freeze().await?;
        }
        let repo_ref = repo;
        let repo = repo.open().await?;
        let id = PointId::parse(point)?;
        if let Some(objects) = &self.objects {
            self.refuse_restoring_onto_the_source(&repo, &id, objects)
                .await?;
        }
        let options = VerifyOptions {
            full: false,
            restore_target: match &self.objects {
                Some(objects) => Some(
                    self.restore_target(objects, run_id, objects.scratch.keeps_for(&repo_ref.url))
                        .await?,
                ),
                None => None,
            },
        };
        let report = repo.verify_point_with(&id, &options).await?;
        if !report.is_ok() {
            bail!(
                "point {point} failed verification: {}",
                report.problems.join("; ")
            );
        }
        let (live_counts, checks) = match &self.postgres {
            Some(pg) => {
                let point = repo.read_point(&id).await?;
                if point.environment != self.environment {
                    postgres::refuse_the_source_database(&pg.url()?, &point, self.another_server)
                        .await?;
                }
                postgres::restorable_as_this_role(&pg.url()?).await?;
                let at_point = point.postgres.as_ref().map(|p| &p.columns);
                let counts = pg.counts_for(point.table_counts());
                let (counts, checks) = live_state(&pg.url()?, &counts, at_point).await?;
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

    /// Preflight of a run to a time (`--to-time`): the database agent checks that its
    /// environment's base backups and archived WAL reach the time (or, with
    /// `[postgres.provider]`, that the provider's window holds it) and records the live counts;
    /// the objects agent checks which rule brings its store there and that it can.
    pub async fn preflight_to_time(
        &self,
        repo: &RepositoryRef,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<PreflightOutput> {
        if self.freezes() {
            self.check_database_freeze().await?;
        }
        let mut out = match &self.postgres {
            Some(_) if self.pitr_by_provider() => self.preflight_provider(at).await?,
            Some(_) => self.preflight_physical(repo, at).await?,
            None => PreflightOutput {
                verify: None,
                live_counts: None,
                checks: Vec::new(),
            },
        };
        if self.objects.is_some() {
            out.checks.push(self.preflight_objects_at(repo, at).await?);
        }
        Ok(out)
    }

    /// Verification after a restore to a time: there are no counts recorded at a time, so no
    /// count parity (said in a check); invariants and reference queries run as usual.
    pub async fn verify_to_time(
        &self,
        at: chrono::DateTime<chrono::Utc>,
        invariants: &[crate::checks::Invariant],
        references: &[crate::checks::Reference],
    ) -> Result<Verified> {
        let mut verified = Verified::default();
        let shown = at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        if let Some(pg) = &self.postgres {
            let live = count_tables(&pg.url()?, &pg.counts).await?;
            verified.checks.push(Check {
                name: "count parity".into(),
                kind: CheckKind::Count,
                required: false,
                passed: true,
                detail: format!(
                    "restored to time {shown}; counts not recorded at a time, none compared \
                     (the restored counts are listed)"
                ),
            });
            verified
                .checks
                .extend(crate::checks::sql::run_invariants(&pg.url()?, invariants).await?);
            verified.references =
                crate::checks::sql::referenced_keys(&pg.url()?, references).await?;
            verified.counts = Some(live);
        }
        if self.objects.is_some() {
            verified.checks.push(Check {
                name: "objects match the point".into(),
                kind: CheckKind::Objects,
                required: false,
                passed: true,
                detail: format!(
                    "restored to time {shown}; no manifest to compare (check-references looks \
                     up what the restored rows refer to)"
                ),
            });
        }
        Ok(verified)
    }

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
            let live = count_tables(&pg.url()?, &pg.counts_for(recorded.table_counts())).await?;
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
            checks.extend(crate::checks::sql::run_invariants(&pg.url()?, invariants).await?);
            keys = crate::checks::sql::referenced_keys(&pg.url()?, references).await?;
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
}

/// What `verify` found: the checks, the live table counts (database agent) and the object
/// keys the restored rows refer to, for the objects agent to look up.
#[derive(Debug, Default)]
pub struct Verified {
    pub checks: Vec<Check>,
    pub counts: Option<Counts>,
    pub references: Vec<ObjectReferences>,
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

/// A short, stable tag for a run, fit for database names: `r` + 8 hex digits of its hash.
fn run_tag(run_id: &str) -> String {
    repository::run_tag(run_id)
}

/// Whether `name` has the shape of [`run_tag`]'s tags (so a directory so named is ours).
fn is_run_tag(name: &str) -> bool {
    name.len() == 9
        && name.starts_with('r')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether two store URLs name the same place or one lies inside the other.
fn stores_overlap(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('/');
    let b = b.trim_end_matches('/');
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_overlap_when_equal_or_nested() {
        assert!(stores_overlap("s3://b/app", "s3://b/app/"));
        assert!(stores_overlap("s3://b", "s3://b/app"));
        assert!(stores_overlap(
            "file:///srv/objects/app",
            "file:///srv/objects"
        ));
        assert!(!stores_overlap("s3://b/app", "s3://b/app2"));
        assert!(!stores_overlap("s3://b/app", "s3://other/app"));
        assert!(!stores_overlap("file:///srv/a", "file:///srv/b"));
    }

    fn postgres(counts: Option<&[&str]>) -> Postgres {
        let text = match counts {
            None => "url_env = \"DATABASE_URL\"".to_owned(),
            Some(list) => format!("url_env = \"DATABASE_URL\"\ncounts = {list:?}"),
        };
        let config: PostgresConfig = toml::from_str(&text).expect("parse [postgres]");
        let plane =
            DataPlane::from_config(Path::new("agent.toml"), "db-1", "prod", Some(&config), None)
                .expect("a valid [postgres]");
        plane.postgres.expect("a database agent")
    }

    #[test]
    fn without_a_list_every_user_table_is_counted_then_what_the_point_counted() {
        let pg = postgres(None);
        assert_eq!(pg.counts, CountSelection::AllTables);
        // Compared with a point: what the point counted, grouped keys by their column.
        let at_point: Counts = [
            ("orders", 3),
            ("audit.events", 2),
            ("jobs", 4),
            ("jobs[state=done]", 4),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
        assert_eq!(
            pg.counts_for(Some(&at_point)),
            CountSelection::Listed(vec![
                CountSpec::table("audit.events"),
                CountSpec::grouped("jobs", "state"),
                CountSpec::table("orders"),
            ])
        );
        // No point counts: every user table.
        assert_eq!(pg.counts_for(None), CountSelection::AllTables);

        // A list is kept as it is, point or not; [] counts nothing.
        let pg = postgres(Some(&["orders", "jobs:state"]));
        let listed = CountSelection::Listed(vec![
            CountSpec::table("orders"),
            CountSpec::grouped("jobs", "state"),
        ]);
        assert_eq!(pg.counts, listed);
        assert_eq!(pg.counts_for(Some(&at_point)), listed);
        assert_eq!(postgres(Some(&[])).counts, CountSelection::none());
    }

    #[test]
    fn blobs_are_kept_for_the_restore_when_a_second_read_would_be_a_transfer() {
        let parse =
            |text: &str| toml::from_str::<ObjectsConfig>(&format!("url = \"file:///x\"\n{text}"));
        let auto = parse("").expect("scratch defaults to auto");
        assert_eq!(auto.scratch, ScratchMode::Auto);
        for url in ["s3://bucket/repo", "gs://b/r", "az://c/r"] {
            assert!(auto.scratch.keeps_for(url), "{url}");
        }
        assert!(!auto.scratch.keeps_for("file:///var/backups/repo"));
        let always = parse("scratch = \"always\"").expect("always").scratch;
        assert!(always.keeps_for("file:///var/backups/repo"));
        let never = parse("scratch = \"never\"").expect("never").scratch;
        assert!(!never.keeps_for("s3://bucket/repo"));
        let err = parse("scratch = \"sometimes\"")
            .expect_err("not a mode")
            .to_string();
        assert!(err.contains("auto") && err.contains("never"), "{err}");
    }

    #[test]
    fn a_database_freeze_names_its_roles() {
        let plane = |freeze: &str| {
            let config: PostgresConfig =
                toml::from_str(&format!("url_env = \"DATABASE_URL\"\n[freeze]\n{freeze}"))
                    .expect("parse [postgres]");
            DataPlane::from_config(Path::new("agent.toml"), "db-1", "prod", Some(&config), None)
        };
        let ok = plane("roles = [\"app\"]").expect("a valid freeze");
        assert!(ok.freezes());
        assert!(ok.capabilities().contains(&"freeze".to_owned()));
        for bad in ["roles = []", "roles = [\"app\", \" \"]"] {
            let err = plane(bad).err().expect("refused").to_string();
            assert!(
                err.contains("agent.toml") && err.contains("postgres.freeze.roles"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_server_is_restored_to_a_time_by_its_provider_or_physically_not_both() {
        let plane = |extra: &str| {
            let config: PostgresConfig =
                toml::from_str(&format!("url_env = \"DATABASE_URL\"\n{extra}"))
                    .expect("parse [postgres]");
            DataPlane::from_config(Path::new("agent.toml"), "db-1", "prod", Some(&config), None)
        };
        let provider = plane("[provider]\ncommand = [\"/opt/pitr\"]").expect("a provider");
        assert!(provider.pitr_by_provider());
        let physical = plane("[physical]\ndata_dir = \"/var/lib/pg\"").expect("physical");
        assert!(!physical.pitr_by_provider());
        let err =
            plane("[physical]\ndata_dir = \"/var/lib/pg\"\n[provider]\ncommand = [\"/opt/pitr\"]")
                .err()
                .expect("refused")
                .to_string();
        assert!(
            err.contains("[postgres.physical] and [postgres.provider] are both set"),
            "{err}"
        );
    }

    #[test]
    fn run_tags_are_short_and_stable() {
        let tag = run_tag("drill-prod-20261125T101010-abcd");
        assert_eq!(tag.len(), 9);
        assert_eq!(tag, run_tag("drill-prod-20261125T101010-abcd"));
        assert!(is_run_tag(&tag));
        for other in [
            "r1234567",
            "r1234567g",
            "x12345678",
            "R12345678",
            "r12345678/",
        ] {
            assert!(!is_run_tag(other), "{other}");
        }
    }
}
