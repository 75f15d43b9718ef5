//! Break-glass: `rollcall repo ...` runs the data-plane code by hand, without a coordinator,
//! for an operator whose coordinator is gone (and for the benchmarks). The same safety holds:
//! a Postgres restore swaps a new database in and keeps the old one; an object restore
//! quarantines what it replaces.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use repository::{
    PgBackupOptions, PointId, Repository, RepositoryOptions, S3Options, SnapshotOptions,
};

#[derive(Debug, Args)]
pub struct RepoArgs {
    /// The backup repository: file:///dir, s3://bucket/prefix, gs://..., az://...
    #[arg(long, env = "ROLLCALL_REPOSITORY")]
    repository: String,
    /// S3-compatible endpoint (credentials: AWS_* in the environment).
    #[arg(long)]
    s3_endpoint: Option<String>,
    #[arg(long)]
    s3_region: Option<String>,
    #[arg(long)]
    s3_path_style: bool,
    #[command(subcommand)]
    command: RepoCommand,
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Dump a database into the repository and commit a point holding it (and nothing else).
    BackupPostgres {
        #[arg(long)]
        env: String,
        /// The database URL (put the password in PGPASSWORD or the URL from a secret store).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Snapshot a live object store into the repository and commit a point holding it.
    Snapshot {
        #[arg(long)]
        env: String,
        /// The live object store URL.
        #[arg(long)]
        source: String,
    },
    /// Verify a point: dump checksum, manifest, blobs (--full: re-hash blob bodies).
    Verify {
        point: String,
        #[arg(long)]
        full: bool,
    },
    /// List the points of the repository.
    Points {
        #[arg(long)]
        env: Option<String>,
    },
    /// Restore a point's objects into a live store; displaced objects go to quarantine.
    RestoreObjects {
        point: String,
        #[arg(long)]
        target: String,
    },
    /// Restore a point's dump into a database (the runbook's `createdb` first: the target
    /// must be a new, empty database; nothing is dropped).
    RestorePostgres {
        point: String,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Create the target database first.
        #[arg(long)]
        create: bool,
    },
}

#[allow(clippy::print_stdout)]
pub async fn run(args: RepoArgs) -> Result<()> {
    let s3 = S3Options::connection(
        args.s3_endpoint.clone(),
        args.s3_region.clone(),
        args.s3_path_style,
    );
    let repo = Repository::open(
        &args.repository,
        RepositoryOptions {
            s3: s3.clone(),
            ..RepositoryOptions::default()
        },
    )
    .await?;
    let json =
        |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match args.command {
        RepoCommand::BackupPostgres { env, database_url } => {
            let id = PointId::new(&env, chrono::Utc::now())?;
            let part =
                repository::backup_postgres(&repo, &PgBackupOptions::new(id.clone(), database_url))
                    .await?;
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
        RepoCommand::Snapshot { env, source } => {
            let id = PointId::new(&env, chrono::Utc::now())?;
            let (store, prefix) = repository::store_from_url(&source, &s3)?;
            let store: std::sync::Arc<dyn object_store::ObjectStore> = if prefix.as_ref().is_empty()
            {
                store
            } else {
                std::sync::Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
            };
            let mut options = SnapshotOptions::new(repository::redact_url(&source));
            options.environment = Some(env);
            let part = repository::snapshot_objects(&repo, store, &options, None).await?;
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
        RepoCommand::Verify { point, full } => {
            let report = repo.verify_point(&PointId::parse(&point)?, full).await?;
            json(serde_json::to_value(&report)?);
            if !report.is_ok() {
                bail!("recovery point {point} failed verification; do not restore from it");
            }
        }
        RepoCommand::Points { env } => {
            let listing = repo.list_points(env.as_deref()).await?;
            for d in &listing.damaged {
                eprintln!("warning: damaged point file {}: {}", d.key, d.reason);
            }
            for p in &listing.points {
                println!(
                    "{}  {}  {} bytes",
                    p.id,
                    p.created_at.format("%Y-%m-%d %H:%M:%S"),
                    p.size_bytes()
                );
            }
        }
        RepoCommand::RestoreObjects { point, target } => {
            let id = PointId::parse(&point)?;
            let snapshot = repo
                .read_point(&id)
                .await?
                .objects
                .with_context(|| format!("point {point} has no object snapshot"))?
                .snapshot_id;
            let (store, prefix) = repository::store_from_url(&target, &s3)?;
            let mut options =
                repository::RestoreObjectsOptions::new(repository::redact_url(&target));
            if !prefix.as_ref().is_empty() {
                options.target_prefix = Some(prefix);
            }
            let report = repository::restore_objects(&repo, &snapshot, store, &options).await?;
            json(serde_json::to_value(&report)?);
        }
        RepoCommand::RestorePostgres {
            point,
            database_url,
            create,
        } => {
            let mut options = repository::PgRestoreOptions::new(database_url);
            options.create_database = create;
            let report =
                repository::restore_postgres(&repo, &PointId::parse(&point)?, &options).await?;
            json(serde_json::to_value(&report)?);
        }
    }
    Ok(())
}
