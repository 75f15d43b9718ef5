//! The `rollcall` binary: parse the command line, load config, start telemetry, and hand over
//! to the library that does the work.

/// `println!` for the operator's output: ends the command quietly when the reader has gone
/// away instead of panicking ([`output`]).
macro_rules! outln {
    () => {
        $crate::output::write(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), true)
    };
}

/// `println!` for a command that must run to its end whoever reads it (`rollcall demo`): a
/// write error only drops the line ([`output::write_or_drop`]).
macro_rules! outln_lossy {
    () => {
        $crate::output::write_or_drop(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::output::write_or_drop(format_args!($($arg)*), true)
    };
}

/// `print!` for the operator's output ([`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), false)
    };
}

mod demo;
mod kept;
mod operator;
mod output;
mod repo;
mod runs;
mod telemetry;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
// The same SIGINT/SIGTERM token as cowork-sim's roles (its doc says why it lives there).
use cowork_sim::cli::shutdown_signal;

#[derive(Debug, Parser)]
#[command(
    name = "rollcall",
    version,
    about = "Restore a whole service fleet to one point in time, in order, and prove it worked"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A whole drill on a throwaway local fleet: Postgres, object store, coordinator and seven
    /// agents with cowork-sim roles; exit 0 only when every required gate passed.
    Demo {
        /// Where the fleet lives (default: a temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the fleet running and print how to talk to it.
        #[arg(long)]
        keep: bool,
        /// Sessions to seed.
        #[arg(long, default_value_t = 40)]
        sessions: u64,
    },
    /// Run the coordinator.
    Coordinator {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run an agent beside one role instance.
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create development certificates for a local fleet.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// List agents: name, role, readiness, last heartbeat.
    Agents {
        /// Stable JSON for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Start a restore drill: the environment's plan against its fleet, to a recovery point.
    Drill {
        #[arg(long)]
        env: String,
        /// A recovery point id, or "latest".
        #[arg(long, conflicts_with = "to_time")]
        point: Option<String>,
        /// Restore to this time instead of a point (RFC 3339, e.g. 2026-12-06T08:00:00Z):
        /// Postgres from the environment's base backups and archived WAL, objects to the same
        /// time. Refused outside the recoverable window (`rollcall points --env ENV`).
        #[arg(long, value_name = "T")]
        to_time: Option<String>,
        /// A plan file instead of the environment's plan.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Print what would happen (the point, each phase, the agents it touches); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Data this run leaves out of the restore on purpose, for the drill report's "data
        /// intentionally excluded" (repeatable; added to the environment's
        /// `[environments.NAME.report] excluded`).
        #[arg(long = "exclude", value_name = "TEXT")]
        excluded: Vec<String>,
        /// Follow the run until it ends; exit 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Take a recovery point of an environment now; prints its id.
    Backup {
        #[arg(long)]
        env: String,
        /// Wait until the point is written (exit 1 if the backup fails).
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
        /// Take a physical base backup on the database agent (`[postgres.physical]`) instead
        /// of a recovery point: the start of a window `drill --to-time` restores into.
        #[arg(long)]
        base: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// List recovery points with age, sizes and the environment's RPO; prune or verify them.
    #[command(args_conflicts_with_subcommands = true)]
    Points {
        #[command(subcommand)]
        command: Option<PointsCommand>,
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// The databases (<db>_pre_<tag>, <db>_undone_<tag>) and repository quarantines restores
    /// and undos kept: list them with size, age and run, or prune old ones.
    Kept {
        #[command(subcommand)]
        command: KeptCommand,
    },
    /// Break-glass: the data plane by hand, without a coordinator.
    Repo(repo::RepoArgs),
    /// The drill report of a run, built from the journal (secrets redacted).
    Report {
        id: String,
        /// md (the runbook's restore-drill-report.md) or json.
        #[arg(long, default_value = "md")]
        format: String,
        /// Write it here (e.g. docs/runbooks/restore-drill-report.md) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A follow-up with its owner, as "text@owner" (repeatable).
        #[arg(long = "follow-up", value_name = "TEXT@OWNER")]
        follow_ups: Vec<String>,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// List runs, newest first.
    Runs {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Show, follow or decide about one run.
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Validate or show restore plans.
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PointsCommand {
    /// Delete points past the environment's retention window (never its newest point or one a
    /// run uses), then sweep blobs and dumps no remaining point references.
    Prune {
        #[arg(long)]
        env: String,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Check a point: the dump's checksum, the manifest, every blob; exit 1 on problems.
    Verify {
        id: String,
        /// Re-hash every blob body too.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
}

#[derive(Debug, Subcommand)]
enum KeptCommand {
    /// Every kept copy of the environment: kind, name, size, age (since the run that made it
    /// ended) and the run it belongs to.
    List {
        #[arg(long)]
        env: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Delete the kept copies of older restores. Never those of the newest finished restore,
    /// of an unfinished run, of a restore an undo could still take back, of a run the journal
    /// does not know, or a database with sessions; exit 1 if a chosen copy could not go.
    Prune {
        #[arg(long)]
        env: String,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep the copies of this many newest restores that changed live data.
        #[arg(long, value_name = "N", default_value_t = 2)]
        keep_last: u32,
        /// Delete only copies older than this (e.g. 7d, 36h), measured from the end of the run
        /// that made them.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
}

#[derive(Debug, Subcommand)]
enum RunCommand {
    /// The run, its phases with durations and details.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Follow the run's events until it ends or blocks; exit 0 only if it succeeded.
    Watch {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Continue a blocked run after fixing the cause: commands that already ran are not re-run.
    /// Follows the run like `run watch`; exits 0 only when it succeeds.
    Resume {
        id: String,
        /// Return once the run is resumed instead of following it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Re-run a blocked run's failed phases as a new attempt. Follows the run like `run
    /// watch`; exits 0 only when it succeeds.
    Retry {
        id: String,
        /// Return once the run is retried instead of following it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Stop a run. Nothing is undone: a frozen fleet stays frozen until you unfreeze it.
    Abort {
        id: String,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Start a run that takes a drill's or recovery's restore back (finished or blocked): the
    /// database it replaced is live again (the restored one kept as <db>_undone_<tag>), the
    /// objects it replaced or removed are back. Exit 0 only if the undo run succeeded (with
    /// --watch) or started.
    Undo {
        id: String,
        /// Follow the undo run until it ends or blocks.
        #[arg(long)]
        watch: bool,
        /// Undo a run that unfroze the fleet: writes made since then stay only in the kept
        /// copies.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Approve a run that waits at its approve phase (a protected environment's two-person
    /// rule). The operator who started the run cannot approve it.
    Approve {
        id: String,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Reject a run that waits for approval: it blocks at its approve phase, with nothing
    /// frozen or changed.
    Reject {
        id: String,
        /// Why, for the journal and the drill report.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        connection: operator::Connection,
    },
}

#[derive(Debug, Subcommand)]
enum PlanCommand {
    /// Validate a plan file: every problem with its line and what to do; exit 1 if any.
    Check {
        file: PathBuf,
        /// Check roles and gates against this environment's declared fleet (needs --config).
        #[arg(long)]
        env: Option<String>,
        /// The coordinator config that declares the environments.
        #[arg(long, env = "ROLLCALL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print a plan resolved: steps, phases, targets, gates, timeouts.
    Show {
        /// The environment whose plan and fleet to show (needs --config); without it, the
        /// default plan.
        #[arg(long)]
        env: Option<String>,
        #[arg(long, env = "ROLLCALL_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create (or extend) a development CA with coordinator, operator and agent certificates.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// An agent certificate to issue, as NAME:ROLE (repeatable).
        #[arg(long = "agent", value_name = "NAME:ROLE")]
        agents: Vec<String>,
        /// Another DNS name or IP the coordinator is reached at (repeatable).
        #[arg(long = "coordinator-host", value_name = "HOST")]
        coordinator_hosts: Vec<String>,
        /// NAME: the name in the operator certificate (operator.pem, an admin; default
        /// "operator"). NAME:ROLE (repeatable; roles: viewer, operator, admin): an operator
        /// certificate with that role in operators/NAME.pem, picked with `--operator NAME`.
        #[arg(long = "operator", value_name = "NAME[:ROLE]")]
        operators: Vec<String>,
    },
}

fn main() -> ExitCode {
    // `rollcall cowork-sim ...` runs the embedded miniature service (the demo's roles), so the
    // demo needs this one binary only.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "cowork-sim") {
        return cowork_sim::cli::main_with_args(args.into_iter().skip(1));
    }
    let cli = Cli::parse();
    // One crypto provider for the whole process: ring (builds without cmake).
    let _ = rustls::crypto::ring::default_provider().install_default();
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
            eprintln!("error: {}", api::errors::one_line(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo {
            dir,
            keep,
            sessions,
        } => {
            telemetry::init_quiet();
            demo::run(demo::DemoArgs {
                dir,
                keep,
                sessions,
            })
            .await
        }
        Command::Coordinator { config } => run_coordinator(&config).await,
        Command::Agent { config } => run_agent(&config).await,
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    agents,
                    coordinator_hosts,
                    operators,
                },
        } => {
            telemetry::init_quiet();
            certs_init(dir, &agents, coordinator_hosts, &operators)
        }
        Command::Agents { json, connection } => {
            telemetry::init_quiet();
            operator::agents(&connection, json).await
        }
        Command::Drill {
            env,
            point,
            to_time,
            plan,
            dry_run,
            excluded,
            watch,
            json,
            connection,
        } => {
            telemetry::init_quiet();
            let drill = runs::Drill {
                env,
                point,
                to_time,
                plan,
                dry_run,
                excluded,
                watch,
                json,
            };
            runs::drill(&connection, drill).await
        }
        Command::Backup {
            env,
            wait,
            json,
            base,
            connection,
        } => {
            telemetry::init_quiet();
            runs::backup(&connection, &env, wait, json, base).await
        }
        Command::Points {
            command,
            env,
            json,
            connection,
        } => {
            telemetry::init_quiet();
            match command {
                None => runs::points(&connection, env.as_deref(), json).await,
                Some(PointsCommand::Prune {
                    env,
                    dry_run,
                    connection,
                }) => runs::prune(&connection, &env, dry_run).await,
                Some(PointsCommand::Verify {
                    id,
                    full,
                    connection,
                }) => runs::verify(&connection, &id, full).await,
            }
        }
        Command::Kept { command } => {
            telemetry::init_quiet();
            match command {
                KeptCommand::List {
                    env,
                    json,
                    connection,
                } => kept::list(&connection, &env, json).await,
                KeptCommand::Prune {
                    env,
                    dry_run,
                    keep_last,
                    older_than,
                    json,
                    connection,
                } => {
                    let prune = kept::Prune {
                        env,
                        dry_run,
                        keep_last: Some(keep_last),
                        older_than,
                        json,
                    };
                    kept::prune(&connection, prune).await
                }
            }
        }
        Command::Repo(args) => {
            telemetry::init_quiet();
            repo::run(args).await
        }
        Command::Report {
            id,
            format,
            out,
            follow_ups,
            connection,
        } => {
            telemetry::init_quiet();
            runs::report(&connection, &id, &format, out.as_deref(), follow_ups).await
        }
        Command::Runs { json, connection } => {
            telemetry::init_quiet();
            runs::list(&connection, json).await
        }
        Command::Run { command } => {
            telemetry::init_quiet();
            use api::pb::operator::RunControl;
            match command {
                RunCommand::Show {
                    id,
                    json,
                    connection,
                } => runs::show(&connection, &id, json).await,
                RunCommand::Watch {
                    id,
                    json,
                    connection,
                } => runs::watch(&connection, &id, json).await,
                RunCommand::Resume {
                    id,
                    detach,
                    connection,
                } => runs::control(&connection, &id, RunControl::Resume, !detach).await,
                RunCommand::Retry {
                    id,
                    detach,
                    connection,
                } => runs::control(&connection, &id, RunControl::Retry, !detach).await,
                RunCommand::Abort { id, connection } => {
                    runs::control(&connection, &id, RunControl::Abort, false).await
                }
                RunCommand::Undo {
                    id,
                    watch,
                    force,
                    connection,
                } => runs::undo(&connection, &id, force, watch).await,
                RunCommand::Approve { id, connection } => {
                    runs::decide(&connection, &id, true, "").await
                }
                RunCommand::Reject {
                    id,
                    reason,
                    connection,
                } => runs::decide(&connection, &id, false, &reason).await,
            }
        }
        Command::Plan { command } => {
            telemetry::init_quiet();
            plan(command)
        }
    }
}

/// The environment `name` from the coordinator config, for commands that read it locally.
fn environment(
    config: Option<&std::path::Path>,
    name: &str,
) -> Result<coordinator::config::Environment> {
    let Some(config) = config else {
        anyhow::bail!(
            "--env {name} needs the coordinator config that declares it: pass --config \
             rollcall.toml or set ROLLCALL_CONFIG"
        );
    };
    let mut loaded = coordinator::config::load(config)?;
    let known: Vec<String> = loaded.environments.keys().cloned().collect();
    loaded.environments.remove(name).with_context(|| {
        format!(
            "{}: no environment {name:?} (declared: {}); add [environments.{name}] or pick \
             one of those",
            config.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )
    })
}

fn plan(command: PlanCommand) -> Result<()> {
    use coordinator::plan::Plan;
    match command {
        PlanCommand::Check { file, env, config } => {
            let fleet = match &env {
                Some(name) => {
                    let Some(config) = config.as_deref() else {
                        anyhow::bail!(
                            "--env {name} needs the coordinator config that declares it: pass \
                             --config rollcall.toml or set ROLLCALL_CONFIG"
                        );
                    };
                    Some(coordinator::config::declared_fleet(config, name)?)
                }
                None => None,
            };
            let plan = Plan::load(&file, fleet.as_ref()).map_err(|e| {
                let n = e.errors.len();
                anyhow::Error::new(api::errors::Problems::from(e)).context(format!(
                    "{} problem{} in {}",
                    n,
                    if n == 1 { "" } else { "s" },
                    file.display()
                ))
            })?;
            let against = match &env {
                Some(name) => format!("environment {name}"),
                None => "the standard roles".to_owned(),
            };
            outln!(
                "{}: plan {} is valid against {against} ({} phases in {} steps)",
                file.display(),
                plan.name,
                plan.phases.len(),
                plan.steps().len()
            );
            for s in &plan.skipped {
                outln!(
                    "  skipped: {} (the environment declares no {} agents)",
                    s.phase,
                    s.roles.join(" or ")
                );
            }
            if !plan.unchecked_roles.is_empty() {
                outln!(
                    "  not checked: role{} {} (not standard roles; pass --env ENV --config FILE \
                     to check the plan against the fleet that declares them)",
                    if plan.unchecked_roles.len() == 1 {
                        ""
                    } else {
                        "s"
                    },
                    plan.unchecked_roles.join(", ")
                );
            }
            Ok(())
        }
        PlanCommand::Show { env, config } => {
            match env {
                Some(name) => {
                    let env = environment(config.as_deref(), &name)?;
                    out!("{}", env.plan.render(Some(&env.fleet)));
                }
                None => out!("{}", Plan::default_plan(None)?.render(None)),
            }
            Ok(())
        }
    }
}

async fn run_coordinator(config: &std::path::Path) -> Result<()> {
    let loaded = coordinator::config::load(config)?;
    loaded.check_repositories()?;
    let telemetry = telemetry::init("rollcall-coordinator", None, &loaded.config.telemetry)?;
    let result = async {
        let tls = coordinator::tls::TlsMaterial::load(&loaded.tls)?;
        let store = coordinator::store::open(&loaded.state_url).await?;
        let listeners = coordinator::Listeners::bind(
            loaded.config.listen.agents,
            loaded.config.listen.operator,
            loaded.config.listen.metrics,
        )
        .await?;
        let settings = coordinator::Settings {
            tls,
            heartbeat_interval: loaded.config.agents.heartbeat_interval,
            agent_timeout: loaded.config.agents.timeout,
            operator_token_hashes: loaded.token_hashes.clone(),
            operator_tokens: loaded.tokens.clone(),
            environments: loaded.environments.clone(),
            limits: loaded.limits(),
            notify: loaded.notify.clone(),
            observe_interval: loaded.config.metrics.observe_interval,
        };
        let coordinator = coordinator::Coordinator::start(settings, listeners, store).await?;
        coordinator.run(shutdown_signal()).await
    }
    .await;
    telemetry.shutdown();
    result
}

async fn run_agent(config: &std::path::Path) -> Result<()> {
    let (settings, telemetry_config) = agent::config::load(config)?;
    let telemetry = telemetry::init(
        "rollcall-agent",
        Some(settings.name.as_str()),
        &telemetry_config,
    )?;
    let result = async {
        let agent = agent::Agent::build(settings)?;
        agent.run(shutdown_signal()).await
    }
    .await;
    telemetry.shutdown();
    result
}

fn certs_init(
    dir: PathBuf,
    agents: &[String],
    coordinator_hosts: Vec<String>,
    operator_specs: &[String],
) -> Result<()> {
    let agents = agents
        .iter()
        .map(|spec| coordinator::certs::parse_agent_spec(spec))
        .collect::<Result<Vec<_>>>()?;
    // A plain NAME names operator.pem's operator, as before roles; NAME:ROLE adds one.
    let (plain, with_role): (Vec<&String>, Vec<&String>) =
        operator_specs.iter().partition(|s| !s.contains(':'));
    let operator = match plain.as_slice() {
        [] => "operator".to_owned(),
        [name] => (*name).clone(),
        [..] => anyhow::bail!(
            "--operator without a role names operator.pem's operator and may be given once (got \
             {}); give the others as NAME:ROLE",
            plain
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let operators = with_role
        .iter()
        .map(|spec| coordinator::certs::parse_operator_spec(spec))
        .collect::<Result<Vec<_>>>()?;
    let report = coordinator::certs::init(&coordinator::certs::InitRequest {
        dir: dir.clone(),
        agents,
        coordinator_hosts,
        operator,
        operators,
    })
    .with_context(|| format!("create certificates in {}", dir.display()))?;
    for path in &report.created {
        outln!("created {}", path.display());
    }
    for path in &report.kept {
        outln!("kept    {}", path.display());
    }
    Ok(())
}
