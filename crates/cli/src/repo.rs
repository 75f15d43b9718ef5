//! Break-glass: `rollcall repo ...` runs the data-plane code by hand, without a coordinator,
//! for an operator whose coordinator is gone (and for the benchmarks). The same safety holds:
//! a Postgres restore swaps a new database in and keeps the old one; an object restore
//! quarantines what it replaces.
//!
//! The forms in DESIGN.md's "Operator CLI" are a stable contract (flags may come in any
//! order, after the subcommand); the older spellings (`--repository`, `--source`, `--target`,
//! a positional point) are kept as aliases so existing scripts keep working.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use object_store::ObjectStore;
use repository::{
    PgBackupOptions, PointId, Repository, RepositoryOptions, S3Options, Shard, SnapshotId,
    SnapshotOptions,
};

/// The environment a break-glass point is recorded under when `--env` is not given.
pub const DEFAULT_ENVIRONMENT: &str = "manual";

#[derive(Debug, Args)]
pub struct RepoArgs {
    /// The backup repository: file:///dir, s3://bucket/prefix, gs://..., az://...
    #[arg(
        long = "repo",
        visible_alias = "repository",
        value_name = "URL",
        env = "ROLLCALL_REPOSITORY",
        global = true
    )]
    repo: Option<String>,
    /// S3-compatible endpoint (credentials: AWS_* in the environment).
    #[arg(long, global = true)]
    s3_endpoint: Option<String>,
    #[arg(long, global = true)]
    s3_region: Option<String>,
    #[arg(long, global = true)]
    s3_path_style: bool,
    #[command(subcommand)]
    command: RepoCommand,
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Initialise a new, empty repository: write its config object (create-only). With
    /// --encrypt everything later written to it is encrypted under a random data key that the
    /// key in ROLLCALL_REPOSITORY_KEY (32 bytes, base64), ROLLCALL_REPOSITORY_KEY_FILE or
    /// ROLLCALL_REPOSITORY_KEY_COMMAND (a command printing it) wraps;
    /// every process using the repository then needs that key. Without --encrypt it records a
    /// plaintext repository (a repository with no config object works as before).
    Init {
        #[arg(long)]
        encrypt: bool,
    },
    /// The key of an encrypted repository.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Dump a database into the repository and commit a point holding it (and nothing else).
    BackupPostgres {
        /// Environment the point belongs to (default `manual`: a break-glass point that no
        /// environment's retention or `--point latest` picks up by accident).
        #[arg(long, default_value = DEFAULT_ENVIRONMENT)]
        env: String,
        /// The database URL (put the password in PGPASSWORD or the URL from a secret store).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// A table to count in the dump's snapshot (repeat it; TABLE:COLUMN counts rows per
        /// value of COLUMN; SCHEMA.TABLE outside public). Default: every user table (ordinary
        /// and partitioned tables outside the system schemas), counted in the dump's snapshot.
        #[arg(long = "count", value_name = "TABLE[:COLUMN]")]
        counts: Vec<String>,
        /// Count no tables (the point then records no counts to verify a restore against).
        #[arg(long, conflicts_with = "counts")]
        no_counts: bool,
    },
    /// Snapshot a live object store into the repository and commit a point holding it; prints
    /// the point and its snapshot id.
    Snapshot {
        /// Environment the point belongs to (default `manual`, as for backup-postgres).
        #[arg(long, default_value = DEFAULT_ENVIRONMENT)]
        env: String,
        /// The live object store URL.
        #[arg(long, visible_alias = "source", value_name = "URL")]
        store: String,
    },
    /// Verify a point (dump checksum, manifest, blobs; --full re-hashes blob bodies), or
    /// every point of the repository without --point. Exit 1 if any is damaged.
    Verify {
        #[arg(long = "point", value_name = "ID")]
        point: Option<String>,
        /// The point, positionally (older form of --point).
        #[arg(hide = true, conflicts_with = "point")]
        point_arg: Option<String>,
        #[arg(long)]
        full: bool,
    },
    /// List the points of the repository in commit order, oldest first; a point stamped in
    /// the future (a clock ran fast) is marked.
    Points {
        #[arg(long)]
        env: Option<String>,
        /// One JSON document instead of one line per point.
        #[arg(long)]
        json: bool,
    },
    /// Restore an object snapshot (--snapshot ID, or the one of --point ID) into a live
    /// store; displaced objects go to quarantine.
    RestoreObjects {
        /// The object snapshot to restore.
        #[arg(long, value_name = "ID", conflicts_with_all = ["point", "point_arg"])]
        snapshot: Option<String>,
        /// Restore the object snapshot of this recovery point.
        #[arg(long, value_name = "ID", conflicts_with = "point_arg")]
        point: Option<String>,
        /// The point, positionally (older form of --point).
        #[arg(hide = true)]
        point_arg: Option<String>,
        /// The live object store to restore into.
        #[arg(long, visible_alias = "target", value_name = "URL")]
        store: String,
        /// Restore only shard I of N of the keys (by key hash), e.g. 0/2 and 1/2 on two
        /// machines; together the shards do what one whole restore does.
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Objects in flight (default 64).
        #[arg(long)]
        parallelism: Option<usize>,
        /// Keep displaced objects under rollcall-quarantine/NAME in the store (default: the
        /// UTC time and the snapshot id). Give every shard of one restore the same NAME.
        #[arg(long, value_name = "NAME")]
        quarantine: Option<String>,
        /// Bring the store to this time (RFC 3339), the same T as `restore-postgres
        /// --to-time`: from an s3:// bucket with versioning, each key's newest version at or
        /// before it (no --repo needed); from any other store, the newest snapshot in --repo
        /// finished at or before it, with the uncertainty window reported.
        #[arg(
            long,
            value_name = "RFC3339",
            conflicts_with_all = ["snapshot", "point", "point_arg"]
        )]
        to_time: Option<String>,
        /// With --to-time: print what would change, change nothing.
        #[arg(long, requires = "to_time")]
        dry_run: bool,
        /// With --to-time: print the summary as JSON.
        #[arg(long, requires = "to_time")]
        json: bool,
    },
    /// Archive one WAL file into the repository, as Postgres' archive_command:
    /// `archive_command = 'rollcall repo wal-push --repo URL %p'`. The same file pushed again
    /// succeeds; other contents under a name already archived are refused (exit 1).
    WalPush {
        /// The WAL file (`%p`, relative to the data directory, where Postgres runs it).
        path: std::path::PathBuf,
    },
    /// Write an archived WAL file to DEST, as Postgres' restore_command:
    /// `restore_command = 'rollcall repo wal-fetch --repo URL %f %p'`. Exit 1 when the
    /// repository does not hold it (recovery ends there) or its body is damaged.
    WalFetch {
        /// The WAL file's name (`%f`).
        name: String,
        /// Where to write it (`%p`).
        dest: std::path::PathBuf,
    },
    /// Take a physical base backup (pg_basebackup's tar, streamed) for point-in-time
    /// recovery; committed once the WAL it needs is archived (`wal-push`). The role needs
    /// REPLICATION. Prints the base backup's record as JSON.
    BaseBackup {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The environment it is recorded under.
        #[arg(long)]
        env: Option<String>,
        /// How long to wait for the server to archive the WAL the backup needs.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        wal_timeout: u64,
    },
    /// List the base backups and the window Postgres can be restored to (`--json`).
    BaseBackups {
        #[arg(long)]
        json: bool,
    },
    /// Restore a point's dump into a database (the runbook's `createdb` first: the target
    /// must be a new, empty database; nothing is dropped). With --to-time and --data-dir:
    /// write a new data directory recovered to that time from a base backup and the archived
    /// WAL (point-in-time recovery); the directory starts on any port.
    RestorePostgres {
        #[arg(long = "point", value_name = "ID", conflicts_with = "to_time")]
        point: Option<String>,
        /// The point, positionally (older form of --point).
        #[arg(hide = true, conflicts_with_all = ["point", "to_time"])]
        point_arg: Option<String>,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Point-in-time recovery to this time (RFC 3339, e.g. 2026-12-06T08:00:00Z).
        #[arg(long, value_name = "RFC3339", requires = "data_dir")]
        to_time: Option<String>,
        /// The data directory to write (must not exist, or be empty).
        #[arg(long, value_name = "DIR", requires = "to_time")]
        data_dir: Option<std::path::PathBuf>,
        /// The base backup to start from (default: the newest consistent before --to-time).
        #[arg(long, value_name = "ID", requires = "to_time")]
        base: Option<String>,
        /// Only write the directory and its recovery settings; it recovers when first started.
        #[arg(long, requires = "to_time")]
        no_recover: bool,
        /// The user the recovery's server runs as when rollcall runs as root (default: the
        /// owner of the data directory's parent, else `postgres`).
        #[arg(long, value_name = "USER", requires = "to_time")]
        run_as: Option<String>,
        /// The longest the recovery may take.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 3600,
            requires = "to_time"
        )]
        recovery_timeout: u64,
        /// Create the target database first.
        #[arg(long, conflicts_with = "swap")]
        create: bool,
        /// Replace the live database the URL names, keeping it: restore into
        /// `<db>_restore_<tag>`, check its counts against the point, then swap it in, the live
        /// one renamed `<db>_pre_<tag>` (never dropped). Run again after a crash, it finishes.
        #[arg(long)]
        swap: bool,
        /// The tag of the databases a --swap makes (default: from the point id, so a second
        /// --swap of the same point needs another tag). Lowercase letters and digits.
        #[arg(long, requires = "swap", value_name = "TAG")]
        tag: Option<String>,
        /// Data archives restored at once, and jobs for building indexes (default: the
        /// number of cores, as the runbook's `pg_restore -j <cores>`).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        jobs: Option<u32>,
        /// Connections that may share one large table's rows (default: --jobs); 1 loads
        /// each table with one COPY, as pg_restore does.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        copy_streams: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Rewrap the data key from the current key (ROLLCALL_REPOSITORY_KEY[_FILE|_COMMAND]) to a
    /// new one (ROLLCALL_REPOSITORY_NEW_KEY[_FILE|_COMMAND]); no data is rewritten. The old key
    /// is refused afterwards: give every agent, coordinator and archive_command the new one.
    Rotate,
}

/// A key from the environment, or an error naming what to set.
fn key_from_env(vars: &repository::KeyVars, what: &str) -> Result<repository::RepositoryKey> {
    match repository::RepositoryKey::from_env(vars)? {
        Some((key, _)) => Ok(key),
        None => bail!(
            "{what}: set {} (32 random bytes in base64, e.g. from `openssl rand -base64 32`), {} \
             (a file holding it) or {} (a command printing it, e.g. a KMS or Vault CLI)",
            vars.value,
            vars.file,
            vars.command
        ),
    }
}

/// `repo init` and `repo key rotate`: they work on the repository's config object, before
/// (or instead of) opening it.
async fn configure(
    repo_url: &str,
    options: RepositoryOptions,
    command: &RepoCommand,
) -> Result<()> {
    let label = repository::redact_url(repo_url);
    match command {
        RepoCommand::Init { encrypt } => {
            let key = if *encrypt {
                Some(key_from_env(
                    &repository::KEY_VARS,
                    "rollcall repo init --encrypt needs the repository key",
                )?)
            } else {
                None
            };
            let config = Repository::init(repo_url, options, key.as_ref()).await?;
            match &config.encryption {
                Some(e) => outln!(
                    "initialised encrypted repository {label} (key {}); keep the key: without it \
                     nothing in the repository can be read",
                    e.key_id
                ),
                None => outln!("initialised repository {label} (not encrypted)"),
            }
        }
        RepoCommand::Key {
            command: KeyCommand::Rotate,
        } => {
            let old = key_from_env(
                &repository::KEY_VARS,
                "rollcall repo key rotate needs the current key",
            )?;
            let new = key_from_env(
                &repository::NEW_KEY_VARS,
                "rollcall repo key rotate needs the new key",
            )?;
            if old.id() == new.id() {
                bail!(
                    "the new key is the current key (key {}): nothing to rotate",
                    old.id()
                );
            }
            let s3 = options.s3.clone();
            let config = Repository::rotate_key(repo_url, options, &old, &new).await?;
            let id = config
                .encryption
                .as_ref()
                .map_or("?", |e| e.key_id.as_str());
            outln!(
                "repository {label} is now encrypted with key {id} (was {}); give the new key to \
                 every process that uses it",
                old.id()
            );
            if let Some(note) = old_config_versions_note(repo_url, &s3).await {
                outln!("{note}");
            }
        }
        _ => {}
    }
    Ok(())
}

/// After a rotation on an S3 bucket that keeps versions: the bucket still holds the config
/// object as it was, whose wrapped data key the old key opens, so rotating does not retire a
/// leaked old key there. `None` for other stores and buckets without versioning.
async fn old_config_versions_note(repo_url: &str, s3: &repository::S3Options) -> Option<String> {
    if !(repo_url.starts_with("s3://") || repo_url.starts_with("s3a://")) {
        return None;
    }
    let kept = "so the old key still opens the data key through the earlier version of \
                rollcall-repository.json, and with it everything in the repository: rotation \
                retires a key that is lost, not one that leaked. Delete the config object's \
                noncurrent versions (or let a lifecycle rule expire them) if the old key may have \
                leaked; the data key itself only changes with a new repository";
    let checked = match repository::VersionedBucket::open(repo_url, s3) {
        Ok(bucket) => bucket.versioning().await,
        Err(e) => Err(e),
    };
    match checked {
        Ok(repository::Versioning::Enabled) => {
            Some(format!("note: the bucket keeps versions, {kept}"))
        }
        Ok(repository::Versioning::Suspended) => Some(format!(
            "note: the bucket's versioning is suspended but may hold versions from before, {kept}"
        )),
        Ok(repository::Versioning::Off) => None,
        Err(e) => Some(format!(
            "note: could not read the bucket's versioning ({}); if it keeps versions, {kept}",
            api::errors::one_line(&*e)
        )),
    }
}

/// The point of a subcommand that takes it as `--point ID` or (older form) positionally.
fn point_of(flag: Option<String>, positional: Option<String>, command: &str) -> Result<PointId> {
    let Some(text) = flag.or(positional) else {
        bail!("--point ID is required for `rollcall repo {command}` (see `rollcall points`)");
    };
    PointId::parse(&text).with_context(|| format!("--point {text}"))
}

/// Postgres' restore_command for a point-in-time recovery: this very binary's `repo wal-fetch`
/// on the same repository (the server runs it through the shell, as its own user: that user
/// needs the repository's credentials in its environment for a cloud repository).
fn wal_fetch_command(repo_url: &str, flags: &[String]) -> Result<String> {
    let exe = std::env::current_exe().context("find the rollcall binary for restore_command")?;
    let quote = |word: &str| format!("'{}'", word.replace('\'', "'\\''"));
    let mut words = vec![
        quote(&exe.to_string_lossy()),
        "repo".to_owned(),
        "wal-fetch".to_owned(),
        "--repo".to_owned(),
        quote(repo_url),
    ];
    words.extend(flags.iter().map(|f| quote(f)));
    words.extend(["%f".to_owned(), "%p".to_owned()]);
    Ok(words.join(" "))
}

/// `store_from_url`, with a URL's path prefix applied.
fn live_store(url: &str, s3: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    let (store, prefix) = repository::store_from_url(url, s3)?;
    Ok(if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    })
}

pub async fn run(args: RepoArgs) -> Result<()> {
    if let RepoCommand::RestoreObjects {
        to_time: Some(_), ..
    } = &args.command
    {
        // Needs no repository for a versioned bucket.
        return restore_objects_to_time(args).await;
    }
    let Some(repo_url) = args.repo.as_deref() else {
        bail!("--repo URL is required (or set ROLLCALL_REPOSITORY)");
    };
    // The same connection flags for the wal-fetch a point-in-time recovery's server runs.
    let mut s3_flags = Vec::new();
    if let Some(endpoint) = &args.s3_endpoint {
        s3_flags.extend(["--s3-endpoint".to_owned(), endpoint.clone()]);
    }
    if let Some(region) = &args.s3_region {
        s3_flags.extend(["--s3-region".to_owned(), region.clone()]);
    }
    if args.s3_path_style {
        s3_flags.push("--s3-path-style".to_owned());
    }
    let s3 = S3Options::connection(
        args.s3_endpoint.clone(),
        args.s3_region.clone(),
        args.s3_path_style,
    );
    // Check what the operator typed before opening (and perhaps creating) the repository.
    let shard = match &args.command {
        RepoCommand::RestoreObjects {
            shard: Some(text), ..
        } => Some(
            text.parse::<Shard>()
                .with_context(|| format!("--shard {text}"))?,
        ),
        _ => None,
    };
    let options = RepositoryOptions {
        s3: s3.clone(),
        ..RepositoryOptions::default()
    };
    if matches!(
        args.command,
        RepoCommand::Init { .. } | RepoCommand::Key { .. }
    ) {
        return configure(repo_url, options, &args.command).await;
    }
    let repo = Repository::open(repo_url, options).await?;
    let json =
        |v: serde_json::Value| outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match args.command {
        RepoCommand::BackupPostgres {
            env,
            database_url,
            counts,
            no_counts,
        } => {
            let id = PointId::new(&env, chrono::Utc::now())?;
            let mut options = PgBackupOptions::new(id.clone(), database_url);
            if no_counts {
                options.counts = repository::CountSelection::none();
            } else if !counts.is_empty() {
                options.counts = repository::CountSelection::Listed(
                    counts
                        .iter()
                        .map(|c| count_spec(c))
                        .collect::<Result<_>>()?,
                );
            }
            let part = repository::backup_postgres(&repo, &options).await?;
            let point = repo
                .write_point(repository::NewPoint {
                    id,
                    postgres: Some(part),
                    objects: None,
                    secrets: Vec::new(),
                })
                .await?;
            json(serde_json::json!({ "point": point.id.to_string(), "postgres": point.postgres }));
        }
        RepoCommand::Snapshot { env, store } => {
            let id = PointId::new(&env, chrono::Utc::now())?;
            let live = live_store(&store, &s3)?;
            let mut options = SnapshotOptions::new(repository::redact_url(&store));
            options.environment = Some(env);
            options.local_root = repository::local_dir(&store);
            let part = repository::snapshot_objects(&repo, live, &options, None).await?;
            let point = repo
                .write_point(repository::NewPoint {
                    id,
                    postgres: None,
                    objects: Some(part),
                    secrets: Vec::new(),
                })
                .await?;
            json(serde_json::json!({ "point": point.id.to_string(), "objects": point.objects }));
        }
        RepoCommand::Verify {
            point,
            point_arg,
            full,
        } => match point.or(point_arg) {
            Some(text) => {
                let id = PointId::parse(&text).with_context(|| format!("--point {text}"))?;
                let report = repo.verify_point(&id, full).await?;
                json(serde_json::to_value(&report)?);
                if !report.is_ok() {
                    bail!("recovery point {id} failed verification; do not restore from it");
                }
            }
            None => verify_all(&repo, full, &repository::redact_url(repo_url)).await?,
        },
        RepoCommand::Init { .. } | RepoCommand::Key { .. } => {
            // `configure` ran them before the repository was opened.
            bail!("repo init and repo key work on the config object before opening")
        }
        RepoCommand::WalPush { path } => {
            let pushed = repository::wal_push(&repo, &path).await?;
            outln!(
                "{} {}",
                match pushed {
                    repository::Pushed::Archived => "archived",
                    repository::Pushed::AlreadyArchived => "already archived",
                },
                path.display()
            );
        }
        RepoCommand::WalFetch { name, dest } => {
            let record = repository::wal_fetch(&repo, &name, &dest).await?;
            outln!("fetched {} ({} bytes)", record.name, record.size);
        }
        RepoCommand::Points { env, json: as_json } => {
            let listing = repo.list_points(env.as_deref()).await?;
            list_points(&listing, as_json, chrono::Utc::now())?;
        }
        RepoCommand::RestoreObjects {
            snapshot,
            point,
            point_arg,
            store,
            shard: _,
            parallelism,
            quarantine,
            ..
        } => {
            // From a point: the manifest must be the very one the point recorded (its
            // sha256), checked by `restore_point_objects` before anything is written.
            let source = match (snapshot, point.or(point_arg)) {
                (Some(text), _) => ObjectsSource::Snapshot(
                    SnapshotId::parse(&text).with_context(|| format!("--snapshot {text}"))?,
                ),
                (None, Some(text)) => ObjectsSource::Point(
                    PointId::parse(&text).with_context(|| format!("--point {text}"))?,
                ),
                (None, None) => bail!(
                    "--snapshot ID or --point ID is required for `rollcall repo \
                     restore-objects` (see `rollcall repo points`), or --to-time T"
                ),
            };
            let (target, options) = restore_target(&store, &s3, shard, parallelism, quarantine)?;
            let report = match source {
                ObjectsSource::Point(point) => {
                    repository::restore_point_objects(&repo, &point, target, &options).await?
                }
                ObjectsSource::Snapshot(snapshot) => {
                    repository::restore_objects(&repo, &snapshot, target, &options).await?
                }
            };
            json(serde_json::to_value(&report)?);
        }
        RepoCommand::BaseBackup {
            database_url,
            env,
            wal_timeout,
        } => {
            if let Some(env) = &env {
                repository::validate_environment(env).with_context(|| format!("--env {env}"))?;
            }
            let mut options = repository::BaseBackupOptions::new(database_url);
            options.env = env;
            options.wal_timeout = std::time::Duration::from_secs(wal_timeout);
            let backup = repository::base_backup(&repo, &options).await?;
            json(serde_json::to_value(&backup)?);
        }
        RepoCommand::BaseBackups { json: as_json } => {
            let bases = repository::list_base_backups(&repo).await?;
            let window = repository::recovery_window(&repo, &bases).await?;
            if as_json {
                json(serde_json::json!({ "base_backups": bases, "window": window }));
            } else {
                for b in &bases {
                    outln!(
                        "{}  consistent {}  timeline {}  WAL {}..{}  {} bytes",
                        b.id,
                        b.consistent_at.to_rfc3339(),
                        b.timeline,
                        b.start_wal,
                        b.end_wal,
                        b.size
                    );
                }
                match window {
                    Some(w) => outln!(
                        "restorable from {} to {} (newest segment {}{})",
                        w.earliest.to_rfc3339(),
                        w.latest.to_rfc3339(),
                        w.newest_segment,
                        w.gap_at
                            .map(|g| format!("; WAL gap at {g}"))
                            .unwrap_or_default()
                    ),
                    None => outln!(
                        "no base backups: take one with `rollcall repo base-backup --repo URL \
                         --database-url URL`"
                    ),
                }
            }
        }
        RepoCommand::RestorePostgres {
            to_time: Some(to_time),
            data_dir: Some(data_dir),
            base,
            no_recover,
            run_as,
            recovery_timeout,
            ..
        } => {
            let at = chrono::DateTime::parse_from_rfc3339(&to_time)
                .with_context(|| {
                    format!("--to-time {to_time}: write it as RFC 3339, e.g. 2026-12-06T08:00:00Z")
                })?
                .with_timezone(&chrono::Utc);
            let options = repository::PitrOptions {
                to_time: at,
                data_dir,
                base,
                restore_command: wal_fetch_command(repo_url, &s3_flags)?,
                recover: !no_recover,
                run_as,
                bin_dir: None,
                timeout: std::time::Duration::from_secs(recovery_timeout),
            };
            let report = repository::restore_to_time(&repo, &options).await?;
            json(serde_json::to_value(&report)?);
        }
        RepoCommand::RestorePostgres {
            point,
            point_arg,
            database_url,
            create,
            swap,
            tag,
            jobs,
            copy_streams,
            ..
        } => {
            let id = point_of(point, point_arg, "restore-postgres")?;
            let Some(database_url) = database_url else {
                bail!(
                    "--database-url URL (or DATABASE_URL) is required for `rollcall repo \
                     restore-postgres --point ID`"
                );
            };
            let mut options = repository::PgRestoreOptions::new(database_url.clone());
            options.create_database = create;
            options.jobs = jobs.unwrap_or_else(repository::default_restore_jobs);
            options.copy_streams = copy_streams;
            if swap {
                json(swap_in(&repo, &id, &database_url, tag.as_deref(), &options).await?);
            } else {
                let report = repository::restore_postgres(&repo, &id, &options).await?;
                json(serde_json::to_value(&report)?);
            }
        }
    }
    Ok(())
}

/// The live store of `repo restore-objects` and the restore's options from its flags.
fn restore_target(
    store: &str,
    s3: &S3Options,
    shard: Option<Shard>,
    parallelism: Option<usize>,
    quarantine: Option<String>,
) -> Result<(Arc<dyn ObjectStore>, repository::RestoreObjectsOptions)> {
    let (target, prefix) = repository::store_from_url(store, s3)?;
    let mut options = repository::RestoreObjectsOptions::new(repository::redact_url(store));
    options.local_root = repository::local_dir(store);
    if !prefix.as_ref().is_empty() {
        options.target_prefix = Some(prefix);
    }
    if let Some(parallelism) = parallelism {
        if parallelism == 0 {
            bail!("--parallelism 0: at least one object must be in flight");
        }
        options.parallelism = parallelism;
    }
    options.shard = shard;
    if let Some(name) = quarantine {
        let valid = !name.is_empty()
            && name
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !valid {
            bail!(
                "--quarantine {name:?}: give a name such as \"restore-2026-11-26\" \
                 (path segments, no empty, '.' or '..' ones)"
            );
        }
        options.quarantine_prefix = Some(
            object_store::path::Path::parse(format!("{}/{name}", repository::QUARANTINE_ROOT))
                .with_context(|| format!("--quarantine {name:?}"))?,
        );
    }
    Ok((target, options))
}

/// `repo restore-objects --to-time T`: from the bucket's versions when it keeps them, else
/// from the newest snapshot in the repository finished at or before T.
/// Whether URL `inner` names `outer` or a prefix under it (trailing slashes ignored).
fn url_within(inner: &str, outer: &str) -> bool {
    let inner = inner.trim_end_matches('/');
    let outer = outer.trim_end_matches('/');
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

async fn restore_objects_to_time(args: RepoArgs) -> Result<()> {
    let RepoCommand::RestoreObjects {
        store,
        shard,
        parallelism,
        quarantine,
        to_time: Some(to_time),
        dry_run,
        json,
        ..
    } = args.command
    else {
        bail!("restore_objects_to_time called for another command");
    };
    let at = chrono::DateTime::parse_from_rfc3339(&to_time)
        .with_context(|| {
            format!("--to-time {to_time}: write it as RFC 3339, e.g. 2026-12-06T08:00:00Z")
        })?
        .with_timezone(&chrono::Utc);
    let shard = shard
        .map(|text| {
            text.parse::<Shard>()
                .with_context(|| format!("--shard {text}"))
        })
        .transpose()?;
    let s3 = S3Options::connection(args.s3_endpoint, args.s3_region, args.s3_path_style);
    let print = |value: serde_json::Value| {
        outln!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    };
    // A repository kept inside the store would be taken back to the time with it: the WAL
    // and points written since would be removed from under the restores that need them.
    if let Some(repo_url) = args.repo.as_deref()
        && url_within(repo_url, &store)
    {
        bail!(
            "repository {} lies inside store {store}: restoring the store to a time would \
             take the repository back with it; keep the repository outside the service's \
             store (another bucket or prefix)",
            repository::redact_url(repo_url)
        );
    }
    // Why the snapshot rule is used, when the store is a bucket that could have had versions.
    let mut no_versions = None;
    if store.starts_with("s3://") || store.starts_with("s3a://") {
        let bucket = repository::VersionedBucket::open(&store, &s3)?;
        match bucket.versioning().await? {
            repository::Versioning::Enabled => {
                if shard.is_some() || quarantine.is_some() {
                    bail!(
                        "--shard and --quarantine are for restores from snapshots: bucket {} \
                         keeps every version, so a restore to a time from its versions \
                         displaces nothing and runs whole; drop them",
                        store
                    );
                }
                let mut options = repository::VersionsRestoreOptions::new(at);
                options.dry_run = dry_run;
                if let Some(parallelism) = parallelism {
                    if parallelism == 0 {
                        bail!("--parallelism 0: at least one object must be in flight");
                    }
                    options.parallelism = parallelism;
                }
                let report = repository::restore_versions_to_time(&bucket, &options).await?;
                if json {
                    print(serde_json::to_value(&report)?);
                } else {
                    print_versions_report(&report);
                }
                return Ok(());
            }
            state => {
                if args.repo.is_none() {
                    return Err(bucket.refusal(state));
                }
                no_versions = Some(format!(
                    "bucket versioning {}",
                    match state {
                        repository::Versioning::Suspended => "suspended",
                        _ => "never enabled",
                    }
                ));
            }
        }
    }
    let Some(repo_url) = args.repo.as_deref() else {
        bail!(
            "--repo URL is required for `restore-objects --to-time` on {}: only an s3:// bucket \
             with versioning can be restored to a time without the repository's snapshots",
            repository::redact_url(&store)
        );
    };
    let repo = Repository::open(
        repo_url,
        RepositoryOptions {
            s3: s3.clone(),
            ..RepositoryOptions::default()
        },
    )
    .await?;
    let (target, options) = restore_target(&store, &s3, shard, parallelism, quarantine)?;
    let report = repository::restore_snapshot_to_time(&repo, target, &options, at, dry_run).await?;
    let why = no_versions.unwrap_or_else(|| "the store keeps no versions".to_owned());
    if json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("rule_reason".to_owned(), serde_json::Value::String(why));
        }
        print(value);
    } else {
        print_snapshot_report(&report, &why);
    }
    Ok(())
}

fn print_versions_report(report: &repository::VersionsRestoreReport) {
    outln!(
        "rule: versions (each key's newest version at or before {}; the bucket keeps every \
         version)",
        report.to_time.to_rfc3339()
    );
    outln!(
        "{}{}: bring back {}, remove {}, unchanged {} ({} keys, {} versions listed)",
        if report.dry_run {
            "dry run, nothing changed; "
        } else {
            ""
        },
        report.store,
        report.brought_back.len(),
        report.removed.len(),
        report.unchanged,
        report.keys,
        report.versions
    );
    for b in &report.brought_back {
        outln!(
            "  bring back {:?} (version {} of {}, {} bytes)",
            b.key,
            b.version_id,
            b.last_modified.to_rfc3339(),
            b.size
        );
    }
    for key in &report.removed {
        outln!("  remove {key:?} (a delete marker; its versions stay)");
    }
    if !report.ambiguous.is_empty() {
        outln!(
            "{} key(s) changed within the second of {} (S3 keeps whole seconds), so their \
             state at that instant is uncertain; a delete there was not applied: {}",
            report.ambiguous.len(),
            report.to_time.to_rfc3339(),
            report
                .ambiguous
                .iter()
                .take(10)
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn print_snapshot_report(report: &repository::SnapshotRestoreReport, why: &str) {
    outln!(
        "rule: snapshot ({why}: the newest snapshot of {} finished at or before {})",
        report.store,
        report.to_time.to_rfc3339()
    );
    outln!(
        "snapshot {} taken {} to {} ({} objects)",
        report.snapshot_id,
        report.snapshot_started_at.to_rfc3339(),
        report.snapshot_finished_at.to_rfc3339(),
        report.objects
    );
    outln!(
        "uncertainty window: {} to {} ({:.1} s): objects changed in it are not restored",
        report.uncertainty.from.to_rfc3339(),
        report.uncertainty.to.to_rfc3339(),
        report.uncertainty.seconds
    );
    match &report.restore {
        None => outln!("dry run: nothing restored"),
        Some(r) => outln!(
            "restored {} ({} bytes), unchanged {}, replaced {}, removed {} (displaced objects \
             in {})",
            r.restored,
            r.restored_bytes,
            r.unchanged,
            r.replaced.len(),
            r.removed.len(),
            r.quarantine_prefix
        ),
    }
}

/// `repo restore-postgres --swap`: prepare the copy (unless an earlier run got further), then
/// swap it in; what the agents' prepare-postgres and commit-postgres do.
async fn swap_in(
    repo: &Repository,
    id: &repository::PointId,
    database_url: &str,
    tag: Option<&str>,
    options: &repository::PgRestoreOptions,
) -> Result<serde_json::Value> {
    let tag = match tag {
        Some(t)
            if !t.is_empty()
                && t.len() <= 16
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) =>
        {
            t.to_owned()
        }
        Some(t) => anyhow::bail!(
            "--tag {t:?} must be 1 to 16 lowercase letters and digits (it names databases)"
        ),
        // A point id ends in 8 random hex digits: the tag of its by-hand swaps.
        None => format!("m{}", id.as_str().rsplit('-').next().unwrap_or_default()),
    };
    let mut swap =
        repository::DatabaseSwap::connect(database_url, &tag, std::time::Duration::from_secs(15))
            .await?;
    let prepared = match swap.state().await? {
        repository::SwapState::Swapped | repository::SwapState::Interrupted => None,
        _ => Some(repository::prepare_swap(repo, id, &mut swap, options, &[]).await?),
    };
    let committed = repository::commit_swap(&mut swap, id).await;
    let names = swap.names().clone();
    swap.close().await;
    let committed = committed?;
    Ok(serde_json::json!({
        "point": id.as_str(),
        "database": names.live,
        "pre_restore_database": names.pre,
        "archive_bytes": prepared.as_ref().map_or(0, |p| p.archive_bytes),
        "counts": prepared.map(|p| p.counts),
        "resumed": committed.resumed(),
    }))
}

/// `repo points`: one line per point in commit order (its number after `#`), or one JSON
/// document; a point stamped ahead of `now` carries the marker instead of passing for new.
fn list_points(
    listing: &repository::PointListing,
    as_json: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    for d in &listing.damaged {
        eprintln!("warning: damaged point file {}: {}", d.key, d.reason);
    }
    if as_json {
        let points: Vec<_> = listing
            .points
            .iter()
            .map(|p| {
                let ahead = p.stamped_ahead(now);
                serde_json::json!({
                    "id": p.id, "environment": p.environment, "created_at": p.created_at,
                    "sequence": p.sequence, "size_bytes": p.size_bytes(),
                    "stamped_in_future": ahead.is_some(),
                    "stamped_ahead_seconds": ahead.map_or(0, |d| d.as_secs()),
                })
            })
            .collect();
        let damaged: Vec<_> = listing
            .damaged
            .iter()
            .map(|d| format!("{}: {}", d.key, d.reason))
            .collect();
        let out = serde_json::json!({ "points": points, "damaged": damaged });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for p in &listing.points {
        let sequence = p
            .sequence
            .map_or_else(|| "#-".to_owned(), |n| format!("#{n}"));
        let marker = p
            .stamped_ahead(now)
            .map(|ahead| format!("  {}", crate::runs::stamped_ahead(ahead)))
            .unwrap_or_default();
        outln!(
            "{}  {}  {} bytes  {sequence}{marker}",
            p.id,
            p.created_at.format("%Y-%m-%d %H:%M:%S"),
            p.size_bytes()
        );
    }
    Ok(())
}

/// What `repo restore-objects` restores: a snapshot by id, or a point's (checked against it).
enum ObjectsSource {
    Snapshot(SnapshotId),
    Point(PointId),
}

/// `repo verify` without `--point`: every point, one line each; fails if any is damaged.
async fn verify_all(repo: &Repository, full: bool, label: &str) -> Result<()> {
    let listing = repo.list_points(None).await?;
    let mut damaged = listing.damaged.len();
    for d in &listing.damaged {
        outln!("damaged  {}: {}", d.key, d.reason);
    }
    for point in &listing.points {
        match repo.verify_point(&point.id, full).await {
            Ok(report) if report.is_ok() => outln!(
                "ok       {}  ({} objects checked, {} dump bytes hashed)",
                point.id,
                report.objects_checked,
                report.dump_bytes
            ),
            Ok(report) => {
                damaged += 1;
                outln!("damaged  {}: {}", point.id, report.problems.join("; "));
            }
            Err(e) => {
                damaged += 1;
                outln!("damaged  {}: {}", point.id, api::errors::one_line(&*e));
            }
        }
    }
    // Base backups: each body present with its size (--full: its sha256).
    let mut damaged_bases = 0;
    let bases = repository::verify_base_backups(repo, full).await?;
    for (base, problem) in &bases {
        match problem {
            None => outln!(
                "ok       base backup {}  (consistent {})",
                base.id,
                base.consistent_at.to_rfc3339()
            ),
            Some(problem) => {
                damaged_bases += 1;
                outln!("damaged  base backup {}: {problem}", base.id);
            }
        }
    }
    let total = listing.points.len() + listing.damaged.len();
    // The archived WAL, when there is any: a gap or a damaged file stops recovery there.
    let wal = repository::wal_verify(repo, full).await?;
    for (first, last) in &wal.ranges {
        outln!("wal      {first} .. {last}");
    }
    for (first, last) in &wal.gaps {
        outln!("wal gap  {first} .. {last}: recovery cannot pass it");
    }
    for problem in &wal.damaged {
        outln!("damaged  wal {problem}");
    }
    if !wal.is_ok() {
        bail!(
            "the archived WAL has {} gap(s) and {} damaged file(s): a recovery to a time \
             after the first problem stops there (the lines above name each)",
            wal.gaps.len(),
            wal.damaged.len()
        );
    }
    if damaged > 0 {
        bail!(
            "{damaged} of {total} recovery points failed verification; do not restore from \
             them (the lines above name each problem)"
        );
    }
    if damaged_bases > 0 {
        bail!(
            "{damaged_bases} of {} base backups failed verification; do not restore from them \
             (the lines above name each problem)",
            bases.len()
        );
    }
    if total == 0 && bases.is_empty() {
        outln!("no recovery points in {label}");
    }
    Ok(())
}

/// `--count TABLE` or `--count TABLE:COLUMN`.
fn count_spec(text: &str) -> Result<repository::CountSpec> {
    let valid = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
    };
    match text.split_once(':') {
        None if valid(text) => Ok(repository::CountSpec::table(text)),
        Some((table, column)) if valid(table) && valid(column) => {
            Ok(repository::CountSpec::grouped(table, column))
        }
        _ => bail!(
            "--count {text:?}: write TABLE or TABLE:COLUMN (letters, digits, '_', and '.' for a \
             schema), e.g. --count orders or --count deliveries:status"
        ),
    }
}
