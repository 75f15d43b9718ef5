//! The `cowork-sim` binary: one subcommand per role of the miniature service, plus the tools
//! drills use around it (migrate, seed, load, token, counts, verify, sink).

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::gateway::{Gateway, GatewayConfig, SinkTarget};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::seed::SeedConfig;
use crate::sink::{SinkHandle, SinkServerConfig};
use crate::web::{WebConfig, WebState};
use crate::worker::{Worker, WorkerConfig, hostname};
use crate::{Deps, ObjectStoreOptions, Overlay, Profile};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "cowork-sim",
    version,
    about = "A miniature of the runbook's service (web, worker, scheduler, gateway) to back up, \
             break and restore"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Db {
    /// Postgres URL of the service database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Debug, Args)]
struct Store {
    /// Object store URL: file:///abs/dir or s3://bucket[/prefix].
    #[arg(long = "object-store", env = "OBJECT_STORE_URL")]
    object_store: String,
    /// Endpoint of an S3-compatible server, e.g. http://127.0.0.1:9000.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    /// S3 region (default us-east-1).
    #[arg(long, env = "AWS_REGION")]
    s3_region: Option<String>,
}

impl Store {
    fn options(&self) -> ObjectStoreOptions {
        ObjectStoreOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            ..ObjectStoreOptions::default()
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the schema migrations (ledger schema_migrations, or cloud_migrations in the real
    /// profile).
    Migrate {
        #[command(flatten)]
        db: Db,
    },
    /// Serve the HTTP API.
    Web {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        store: Store,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Start in maintenance mode: writes answer 503 until an operator lifts it (kind
        /// profile only: the real profile has no maintenance mode and refuses it).
        #[arg(long, env = "COWORK_MAINTENANCE")]
        maintenance: bool,
        /// Apply pending migrations before serving (default: true in the real profile, false
        /// in the kind one). Accepts true/false, 1/0, yes/no.
        #[arg(
            long,
            env = "COWORK_MIGRATE_ON_BOOT",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        migrate_on_boot: Option<bool>,
        #[arg(long)]
        instance_id: Option<String>,
        /// Exit (status 70) when the database ends the role's connection, as services whose
        /// database client treats a terminated connection as fatal do (a Node.js `pg` client
        /// without an error handler): a restore that terminates it crashes the role. Always on
        /// in the real profile.
        #[arg(long, env = "COWORK_EXIT_ON_DB_LOSS")]
        exit_on_db_loss: bool,
    },
    /// Process prompt commands into events, projections, artifacts and checkpoints.
    Worker {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        worker_id: Option<String>,
        /// Exit after this many commands (the bounded smoke prompt); non-zero if any failed.
        #[arg(long)]
        max_commands: Option<u64>,
        /// With --max-commands: fail if they are not processed within this time (e.g. 60s).
        #[arg(long, requires = "max_commands")]
        max_wait: Option<humantime::Duration>,
        #[arg(long, default_value = "100ms")]
        poll_interval: humantime::Duration,
        #[arg(long, default_value = "30s")]
        lease_ttl: humantime::Duration,
        #[arg(long, default_value_t = 3)]
        max_attempts: i32,
        #[arg(long, default_value_t = 4096)]
        artifact_bytes: usize,
    },
    /// Fire due workflows, one run per due time.
    Scheduler {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        scheduler_id: Option<String>,
        #[arg(long, default_value = "250ms")]
        tick: humantime::Duration,
    },
    /// Deliver channel deliveries to a sink, in order, with retries.
    Gateway {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        gateway_id: Option<String>,
        /// POST deliveries here (e.g. http://127.0.0.1:9100/deliveries).
        #[arg(
            long,
            conflicts_with = "sink_jsonl",
            required_unless_present = "sink_jsonl"
        )]
        sink_url: Option<String>,
        /// Append deliveries to this JSONL file instead.
        #[arg(long)]
        sink_jsonl: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        max_attempts: i32,
        #[arg(long, default_value = "500ms")]
        retry_base: humantime::Duration,
        #[arg(long, default_value = "30s")]
        retry_max: humantime::Duration,
        #[arg(long, default_value = "30s")]
        claim_ttl: humantime::Duration,
    },
    /// An HTTP delivery sink that counts duplicates (GET /stats).
    Sink {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        /// Log accepted deliveries here (JSONL), reloaded on start.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Refuse the first N attempts of every delivery (exercises retries).
        #[arg(long, default_value_t = 0)]
        fail_first: u32,
    },
    /// Print the tally of a JSONL sink file: received, unique, duplicates, out_of_order.
    SinkStats { path: PathBuf },
    /// Fill the database and object store with realistic data.
    Seed {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        sessions: u64,
        #[arg(long, default_value_t = 3)]
        tenants: u32,
        #[arg(long, default_value_t = 20)]
        events_per_session: u32,
        #[arg(long, default_value_t = 1)]
        artifacts_per_session: u32,
        #[arg(long, default_value_t = 2048)]
        artifact_bytes: usize,
        #[arg(long, default_value_t = 10)]
        workflows: u32,
        /// Bind every Nth session to a channel (0: none).
        #[arg(long, default_value_t = 4)]
        bind_every: u64,
        #[arg(long, default_value_t = 0)]
        pending_commands: u64,
        /// Same seed, same data; random when absent.
        #[arg(long)]
        rng_seed: Option<u64>,
        #[arg(long, default_value_t = 32)]
        object_concurrency: usize,
        /// Write the issued tokens (plaintext, shown once) to this file, mode 0600.
        #[arg(long)]
        tokens_out: Option<PathBuf>,
    },
    /// Keep creating sessions and prompts through the web role.
    Load {
        #[arg(long, env = "COWORK_WEB_URL")]
        web_url: String,
        /// A desktop token.
        #[arg(long, env = "COWORK_TOKEN", hide_env_values = true)]
        token: String,
        /// Writes per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Stop after this long (else on SIGTERM/SIGINT).
        #[arg(long)]
        duration: Option<humantime::Duration>,
    },
    /// Issue an API token (printed once; only its hash is stored).
    Token {
        #[command(flatten)]
        db: Db,
        /// desktop, operator or gateway.
        #[arg(long)]
        scope: String,
        /// Tenant id (required for desktop tokens).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// Print the row counts of the restore-relevant tables (JSON).
    Counts {
        #[command(flatten)]
        db: Db,
    },
    /// A bounded smoke check of one role after a restore; exit 1 when it fails.
    Smoke {
        #[command(subcommand)]
        role: SmokeRole,
    },
    /// Check artifacts against their sha256 and projections against events; exit 1 on problems.
    Verify {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        store: Store,
        /// Check only the first N artifacts (by key).
        #[arg(long)]
        limit: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
enum SmokeRole {
    /// One prompt end to end: created by web's smoke hook (kind profile) or directly in the
    /// database (real profile, --database-url: a URL that may write while web is frozen),
    /// processed by a worker, its projection read through web.
    Worker {
        /// The service database (real profile only; required there).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        #[arg(long, env = "COWORK_WEB_URL")]
        web_url: String,
        /// An operator token.
        #[arg(long, env = "COWORK_OPERATOR_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// No active workflow stays overdue; no due time ran twice.
    Scheduler {
        #[command(flatten)]
        db: Db,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        grace: Duration,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// No delivery stays due; none arrived at the sink out of order; none sent before the
    /// point (when given) arrived again.
    Gateway {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        sink_jsonl: PathBuf,
        /// When the restored point was taken (RFC 3339; Rollcall's smoke sets
        /// ROLLCALL_POINT_TIME): a delivery first received before it must not arrive again.
        #[arg(long, env = "ROLLCALL_POINT_TIME")]
        point_time: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// Runs the `cowork-sim` command line with `args` (the program name first). The `rollcall`
/// binary embeds it as `rollcall cowork-sim ...`, so the demo needs one binary only.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    crate::objects::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn deps(db: &Db, store: &Store, profile: Profile) -> Result<Deps> {
    Deps::connect(
        &db.database_url,
        &store.object_store,
        &store.options(),
        profile,
    )
    .await
}

fn default_id(role: &str) -> String {
    format!("{role}-{}-{}", hostname(), std::process::id())
}

async fn run(cli: Cli) -> Result<()> {
    let overlay = Overlay::load()?;
    let profile = overlay.profile;
    tracing::debug!(%profile, file = ?overlay.file, "profile");
    match cli.command {
        Command::Migrate { db } => {
            let pool = crate::connect(&db.database_url).await?;
            crate::schema::migrate(&pool, profile).await?;
            let status = crate::schema::status(&pool, profile).await?;
            tracing::info!(applied = ?status.applied, %profile, "schema is current");
            Ok(())
        }
        Command::Web {
            db,
            store,
            listen,
            maintenance,
            migrate_on_boot,
            instance_id,
            exit_on_db_loss,
        } => {
            overlay.require_for_role("web")?;
            if profile == Profile::Real && maintenance {
                anyhow::bail!(
                    "the real profile has no maintenance mode: drop --maintenance (and \
                     COWORK_MAINTENANCE); freeze writes from outside (the ingress, stopping web, \
                     or the database)"
                );
            }
            let deps = deps(&db, &store, profile).await?;
            if migrate_on_boot.unwrap_or(profile == Profile::Real) {
                migrate_on_boot_if_behind(&deps).await?;
            } else {
                tracing::info!(
                    "not migrating on boot (COWORK_MIGRATE_ON_BOOT / --migrate-on-boot)"
                );
            }
            if profile == Profile::Real {
                crate::web::exit_on_admin_shutdown();
            }
            if exit_on_db_loss || profile == Profile::Real {
                crate::web::exit_on_db_loss(&db.database_url).await?;
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listen on {listen}: is the port free? (--listen)"))?;
            let state = WebState::new(
                deps,
                WebConfig {
                    instance_id: instance_id.unwrap_or_else(|| default_id("web")),
                    maintenance,
                },
            );
            crate::web::run(listener, state, shutdown_signal()).await
        }
        Command::Worker {
            db,
            store,
            worker_id,
            max_commands,
            max_wait,
            poll_interval,
            lease_ttl,
            max_attempts,
            artifact_bytes,
        } => {
            overlay.require_for_role("worker")?;
            let deps = deps(&db, &store, profile).await?;
            let mut config = WorkerConfig::new(worker_id.unwrap_or_else(|| default_id("worker")));
            config.max_commands = max_commands;
            config.max_wait = max_wait.map(Into::into);
            config.poll_interval = poll_interval.into();
            config.lease_ttl = lease_ttl.into();
            config.max_attempts = max_attempts;
            config.artifact_bytes = artifact_bytes;
            let report = Worker::new(deps, config).run(shutdown_signal()).await?;
            if max_commands.is_some() {
                print_json(&report)?;
                if report.failed > 0 {
                    anyhow::bail!(
                        "{} of the smoke command(s) failed; the worker log and \
                         session_commands.last_error say why",
                        report.failed
                    );
                }
            }
            Ok(())
        }
        Command::Scheduler {
            db,
            store,
            scheduler_id,
            tick,
        } => {
            overlay.require_for_role("scheduler")?;
            let deps = deps(&db, &store, profile).await?;
            let mut config =
                SchedulerConfig::new(scheduler_id.unwrap_or_else(|| default_id("scheduler")));
            config.tick = tick.into();
            Scheduler::new(deps, config).run(shutdown_signal()).await?;
            Ok(())
        }
        Command::Gateway {
            db,
            store,
            gateway_id,
            sink_url,
            sink_jsonl,
            max_attempts,
            retry_base,
            retry_max,
            claim_ttl,
        } => {
            let sink = match (sink_url, sink_jsonl) {
                (Some(url), _) => SinkTarget::Http(url),
                (None, Some(path)) => SinkTarget::Jsonl(path),
                (None, None) => anyhow::bail!("pass --sink-url URL or --sink-jsonl FILE"),
            };
            overlay.require_for_role("gateway")?;
            let deps = deps(&db, &store, profile).await?;
            let mut config =
                GatewayConfig::new(gateway_id.unwrap_or_else(|| default_id("gateway")), sink);
            config.max_attempts = max_attempts;
            config.retry_base = retry_base.into();
            config.retry_max = retry_max.into();
            config.claim_ttl = claim_ttl.into();
            Gateway::new(deps, config).run(shutdown_signal()).await?;
            Ok(())
        }
        Command::Sink {
            listen,
            log,
            fail_first,
        } => {
            let handle = SinkHandle::new(&SinkServerConfig { log, fail_first })?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listen on {listen}: is the port free? (--listen)"))?;
            crate::sink::serve_sink(listener, handle.clone(), shutdown_signal()).await?;
            print_json(&handle.stats())
        }
        Command::SinkStats { path } => print_json(&crate::sink::jsonl_stats(&path)?),
        Command::Seed {
            db,
            store,
            sessions,
            tenants,
            events_per_session,
            artifacts_per_session,
            artifact_bytes,
            workflows,
            bind_every,
            pending_commands,
            rng_seed,
            object_concurrency,
            tokens_out,
        } => {
            let deps = deps(&db, &store, profile).await?;
            let mut config = SeedConfig::new(sessions);
            config.tenants = tenants;
            config.events_per_session = events_per_session;
            config.artifacts_per_session = artifacts_per_session;
            config.artifact_bytes = artifact_bytes;
            config.workflows = workflows;
            config.bind_every = bind_every;
            config.pending_commands = pending_commands;
            if let Some(seed) = rng_seed {
                config.rng_seed = seed;
            }
            config.object_concurrency = object_concurrency;
            let seeded = crate::seed::run(&deps, &config).await?;
            match &tokens_out {
                Some(path) => write_secret_json(path, &seeded.tokens)?,
                None => tracing::warn!(
                    "the seeded tokens were not saved (pass --tokens-out FILE); issue new ones \
                     with `cowork-sim token`"
                ),
            }
            print_json(&seeded.report)
        }
        Command::Load {
            web_url,
            token,
            rate,
            duration,
        } => {
            let mut config = crate::load::LoadConfig::new(web_url, token, rate);
            config.duration = duration.map(Into::into);
            let report = crate::load::run(config, shutdown_signal()).await?;
            print_json(&report)
        }
        Command::Token {
            db,
            scope,
            tenant,
            name,
        } => {
            let scope: crate::auth::Scope = scope.parse()?;
            let pool = crate::connect(&db.database_url).await?;
            let issued =
                crate::auth::issue_token(&pool, profile, scope, tenant.as_deref(), None, &name)
                    .await?;
            print_json(&issued)
        }
        Command::Smoke { role } => {
            let report = match role {
                SmokeRole::Worker {
                    database_url,
                    web_url,
                    token,
                    timeout,
                } => match profile {
                    Profile::Kind => crate::smoke::worker(&web_url, &token, timeout).await?,
                    Profile::Real => {
                        let url = database_url.context(
                            "the real profile's worker smoke writes its prompt to the database: \
                             pass --database-url (env DATABASE_URL), one that may write while \
                             web is frozen (e.g. ?options=-c%20default_transaction_read_only%3Doff)",
                        )?;
                        let pool = crate::connect(&url).await?;
                        crate::smoke::worker_direct(
                            &pool,
                            profile,
                            Some((&web_url, &token)),
                            timeout,
                        )
                        .await?
                    }
                },
                SmokeRole::Scheduler { db, grace, timeout } => {
                    let pool = crate::connect(&db.database_url).await?;
                    crate::smoke::scheduler(&pool, profile, grace, timeout).await?
                }
                SmokeRole::Gateway {
                    db,
                    sink_jsonl,
                    point_time,
                    timeout,
                } => {
                    let pool = crate::connect(&db.database_url).await?;
                    crate::smoke::gateway(&pool, profile, &sink_jsonl, point_time, timeout).await?
                }
            };
            print_json(&report)
        }
        Command::Counts { db } => {
            let pool = crate::connect(&db.database_url).await?;
            print_json(&crate::counts(&pool, profile).await?)
        }
        Command::Verify { db, store, limit } => {
            let deps = deps(&db, &store, profile).await?;
            let artifacts =
                crate::store::verify_artifacts(&deps.pool, profile, deps.objects.as_ref(), limit)
                    .await?;
            let projections = crate::store::verify_projections(&deps.pool, profile).await?;
            print_json(&serde_json::json!({
                "artifacts": artifacts,
                "projections": projections,
            }))?;
            if !artifacts.ok() || !projections.consistent() {
                anyhow::bail!(
                    "verification failed: {} missing and {} mismatched object(s), {} session(s) \
                     without projection, {} projection(s) ahead of their events, {} session(s) \
                     with event gaps; were Postgres and the object store restored to the same \
                     point?",
                    artifacts.missing,
                    artifacts.mismatched,
                    projections.missing,
                    projections.ahead,
                    projections.event_gaps
                );
            }
            Ok(())
        }
    }
}

/// Web's migrations on boot: applied only when the ledger is behind, so a web whose database
/// role is frozen read-only (which refuses the migrator's DDL) still starts when nothing is due.
async fn migrate_on_boot_if_behind(deps: &Deps) -> Result<()> {
    let status = crate::schema::status(&deps.pool, deps.profile).await?;
    if status.current {
        tracing::info!(applied = ?status.applied, "migrations on boot: none pending");
        return Ok(());
    }
    tracing::info!(applied = ?status.applied, expected = ?status.expected, "migrating on boot");
    crate::schema::migrate(&deps.pool, deps.profile).await
}

#[allow(clippy::print_stdout)]
fn print_json(value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("encode JSON output")?;
    println!("{text}");
    Ok(())
}

/// Writes a JSON file only the owner can read.
fn write_secret_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_vec_pretty(value).context("encode the tokens")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create the tokens file {}", path.display()))?;
    file.write_all(&text)
        .with_context(|| format!("write the tokens file {}", path.display()))
}

/// A token cancelled on SIGINT or SIGTERM: how a long-running process of either binary
/// (the cowork-sim roles, `rollcall coordinator`, `rollcall agent`) learns to stop.
///
/// The one copy lives here because cowork-sim stands in for a third-party service and depends
/// on no Rollcall crate, while the `rollcall` binary already links cowork-sim (`rollcall demo`
/// embeds it): a Rollcall crate could not serve both binaries, this module can.
pub fn shutdown_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        tracing::info!("shutting down");
        trigger.cancel();
    });
    cancel
}
