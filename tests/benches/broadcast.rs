//! Benchmark: one broadcast command round (send to all agents, collect all results) with N
//! agents attached over real mTLS on loopback, and the coordinator's memory per agent.
//!
//! The coordinator runs in this process; the agents run in a child "swarm" process (this
//! same binary with `--swarm`), so this process's RSS growth is the coordinator's alone.
//! Also measures the RSS of an idle `rollcall agent` process.
//!
//!     cargo bench -p e2e --bench broadcast              # N = 100, 1000, 10000
//!     cargo bench -p e2e --bench broadcast -- 100 1000  # chosen sizes
//!     BENCH_ROUNDS=500 cargo bench -p e2e --bench broadcast -- 1000  # more rounds
//!     BENCH_LOG=1 cargo bench -p e2e --bench broadcast  # with the processes' default log
//!                                                       # filter and fmt layer (to a sink)

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use api::model::{Action, AgentName, CommandId, Outcome};
use coordinator::link::{AgentLink, Outgoing};
use e2e::*;

/// Each swarm agent holds a socket and its state directory's lock file: 10,000 agents need
/// more than the usual 20,000 descriptors. Root may raise the hard limit too.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if setrlimit(Resource::RLIMIT_NOFILE, 65_536, 65_536).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

fn agent_name(i: usize) -> String {
    format!("a{i}")
}

fn main() {
    if std::env::var("BENCH_LOG").is_ok_and(|v| !v.is_empty() && v != "0") {
        // What `rollcall coordinator` and `rollcall agent` install by default, so the
        // per-command INFO spans are recorded as they are in production.
        use tracing_subscriber::prelude::*;
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(api::DEFAULT_LOG_FILTER))
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink))
            .try_init();
    }
    install_crypto();
    raise_fd_limit();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--swarm") {
        swarm(&args[1..]);
        return;
    }
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1_000, 10_000]
    } else {
        sizes
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "broadcast round over mTLS on loopback (2-core machine); agents in a separate process"
    );
    println!(
        "{:>7} {:>7} {:>10} {:>10} {:>10} {:>14} {:>12} {:>16}",
        "agents",
        "rounds",
        "p50 ms",
        "p99 ms",
        "max ms",
        "coord KiB/agent",
        "attach s",
        "CPU ms/round c+a"
    );
    for n in sizes {
        runtime.block_on(round(n));
    }
    idle_agent_rss();
}

async fn round(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<String> = (0..n).map(|i| format!("{}:bench", agent_name(i))).collect();
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let certs_dir = certs(dir.path(), &specs);
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    // The bench measures how fast the coordinator itself attaches a fleet, so the attach rate
    // limit (`agents.attach_rate`, 500 a second by default) is lifted out of its way.
    let limits = coordinator::layers::Limits {
        attaches: 1_000_000,
        ..coordinator::layers::Limits::default()
    };
    let coord = InProcessCoordinator::start_limited(
        &certs_dir,
        &state_url,
        Duration::from_secs(60),
        Duration::from_secs(20),
        BTreeMap::new(),
        "127.0.0.1:0".parse().unwrap(),
        limits,
    )
    .await;
    let before = rss_kib("self");

    let attach_started = Instant::now();
    // Each swarm agent holds a socket and a state-directory lock: at most 5,000 per process
    // keeps a swarm under the usual 20,000-descriptor limit.
    let mut swarms = Vec::new();
    for first in (0..n).step_by(SWARM_SIZE) {
        let count = SWARM_SIZE.min(n - first);
        swarms.push(
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--swarm",
                    &certs_dir.display().to_string(),
                    &dir.path().display().to_string(),
                    &coord.agents_url(),
                    &first.to_string(),
                    &count.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let handle = coord.handle.clone();
    eventually(
        &format!("{n} agents attached"),
        Duration::from_secs(600),
        async || (handle.agents().iter().filter(|a| a.ready).count() == n).then_some(()),
    )
    .await;
    let attach_secs = attach_started.elapsed().as_secs_f64();

    let names: Vec<AgentName> = (0..n)
        .map(|i| AgentName::parse(&agent_name(i)).unwrap())
        .collect();
    let link = coord.handle.link.clone();
    // `BENCH_ROUNDS=N` runs more rounds (to profile them, say).
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if n >= 10_000 { 15 } else { 40 });
    let mut times = Vec::with_capacity(rounds);
    let swarm_pids: Vec<String> = swarms.iter().map(|s| s.id().to_string()).collect();
    let swarm_cpu = || swarm_pids.iter().map(|p| cpu_time(p)).sum::<Duration>();
    let cpu_before = (cpu_time("self"), swarm_cpu());
    for r in 0..rounds + 2 {
        // As the engine fans a phase out: one task per agent on the runtime, joined by a
        // task of its own (not by the thread that drives `block_on`).
        let names = names.clone();
        let link = link.clone();
        let (elapsed, results) = tokio::spawn(async move {
            let started = Instant::now();
            let mut sends = tokio::task::JoinSet::new();
            for name in names {
                let link = link.clone();
                sends.spawn(async move {
                    let command = Outgoing {
                        id: CommandId::parse(&format!("bench/{r}/{name}")).unwrap(),
                        run_id: "bench".into(),
                        deadline: SystemTime::now() + Duration::from_secs(60),
                        action: Action::Ping {
                            hold: Duration::ZERO,
                        },
                    };
                    link.send(&name, command).await
                });
            }
            let mut results = Vec::with_capacity(n);
            while let Some(joined) = sends.join_next().await {
                results.push(joined.unwrap());
            }
            (started.elapsed(), results)
        })
        .await
        .unwrap();
        let ok = results
            .iter()
            .filter(|r| matches!(r, Ok(r) if r.outcome == Outcome::Succeeded))
            .count();
        assert_eq!(ok, n, "round {r}: {} of {n} succeeded", ok);
        if r >= 2 {
            // Two warm-up rounds.
            times.push(elapsed);
        }
    }
    let after = rss_kib("self");
    let per_round = |before: Duration, after: Duration| {
        (after - before).as_secs_f64() * 1000.0 / (rounds + 2) as f64
    };
    let cpu = (
        per_round(cpu_before.0, cpu_time("self")),
        per_round(cpu_before.1, swarm_cpu()),
    );
    times.sort();
    let pct =
        |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "{:>7} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>14.1} {:>12.1} {:>16}",
        n,
        rounds,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        after.saturating_sub(before) as f64 / n as f64,
        attach_secs,
        format!("{:.1}+{:.1}", cpu.0, cpu.1)
    );
    for mut swarm in swarms {
        let _ = swarm.kill();
        let _ = swarm.wait();
    }
    coord.stop().await;
}

const SWARM_SIZE: usize = 5_000;

/// A child process: agents `first..first + count` attached to the coordinator at `url`.
fn swarm(args: &[String]) {
    let [certs, dir, url, first, count] = args else {
        panic!("usage: --swarm CERTS DIR URL FIRST COUNT");
    };
    let first: usize = first.parse().unwrap();
    let count: usize = count.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut agents = Vec::with_capacity(count);
        for i in first..first + count {
            let mut settings = agent_settings(
                Path::new(certs),
                &PathBuf::from(dir).join("agents"),
                url,
                &agent_name(i),
                "bench",
            );
            settings.reconnect.max = Duration::from_secs(2);
            agents.push(InProcessAgent::start(settings));
            if i % 500 == 499 {
                // Agents of a real fleet do not start within one millisecond; pace the
                // handshakes a little so attach time measures the coordinator, not SYN drops.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        std::future::pending::<()>().await;
    });
}

/// RSS of a real, idle `rollcall agent` process (release build), attached to a coordinator.
fn idle_agent_rss() {
    let bin = rollcall_release_bin();
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["idle-1:web"]);
    let (agents, operator) = (free_addr(), free_addr());
    let config = write_coordinator_config(dir.path(), &certs, agents, operator, "");
    let mut c = Command::new(&bin);
    c.args(["coordinator", "--config", config.to_str().unwrap()]);
    let _coordinator = Proc::spawn("coordinator", dir.path(), c);
    let agent_cfg = write_agent_config(dir.path(), &certs, agents, "idle-1", "web", "");
    let mut a = Command::new(&bin);
    a.args(["agent", "--config", agent_cfg.to_str().unwrap()]);
    let agent = Proc::spawn("idle-1", dir.path(), a);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(eventually(
        "idle agent attached",
        Duration::from_secs(30),
        async || {
            let json = agents_json(operator, &certs).ok()?;
            (json["agents"][0]["ready"] == true).then_some(())
        },
    ));
    // Let it settle through a few heartbeats (300 ms each) before reading its memory.
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    println!(
        "idle `rollcall agent` process RSS: {} KiB",
        rss_kib(&agent.pid().to_string())
    );
}
