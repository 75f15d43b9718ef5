//! Benchmark of `seed`: 100k events (5,000 sessions x 20 events, 10,000 objects) into a
//! throwaway Postgres cluster and a LocalFileSystem object store, then the checks Rollcall runs
//! (counts, projections, every artifact's sha256). Prints figures; asserts nothing but success.
//!
//! `cargo bench -p cowork-sim --bench seed`; scale with COWORK_BENCH_SESSIONS and
//! COWORK_BENCH_EVENTS_PER_SESSION.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::{Context, Result};
use cowork_sim::seed::SeedConfig;
use cowork_sim::{Deps, ObjectStoreOptions};

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter that is not ours means "not this benchmark".
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"seed".contains(a.as_str()))
    {
        return Ok(());
    }
    let sessions = env_u64("COWORK_BENCH_SESSIONS", 5_000)?;
    let events_per_session = u32::try_from(env_u64("COWORK_BENCH_EVENTS_PER_SESSION", 20)?)
        .context("COWORK_BENCH_EVENTS_PER_SESSION is too large")?;
    let cluster = ephemeral_pg::Cluster::start()?;
    cluster.create_database("bench")?;
    let objects_dir = tempfile::tempdir().context("create the object store directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    runtime.block_on(async {
        let deps = Deps::connect(
            &cluster.url("bench"),
            &format!("file://{}", objects_dir.path().display()),
            &ObjectStoreOptions::default(),
            cowork_sim::Profile::Kind,
        )
        .await?;
        cowork_sim::schema::migrate(&deps.pool, deps.profile).await?;
        let mut config = SeedConfig::new(sessions);
        config.events_per_session = events_per_session;
        config.rng_seed = 42;

        let started = Instant::now();
        let seeded = cowork_sim::seed::run(&deps, &config).await?;
        let seed_secs = started.elapsed().as_secs_f64();
        let r = &seeded.report;

        let started = Instant::now();
        let counts = cowork_sim::counts(&deps.pool, deps.profile).await?;
        let counts_ms = started.elapsed().as_secs_f64() * 1000.0;
        let started = Instant::now();
        let projections = cowork_sim::store::verify_projections(&deps.pool, deps.profile).await?;
        let projections_ms = started.elapsed().as_secs_f64() * 1000.0;
        let started = Instant::now();
        let artifacts =
            cowork_sim::store::verify_artifacts(&deps.pool, deps.profile, deps.objects.as_ref(), None).await?;
        let verify_secs = started.elapsed().as_secs_f64();
        let db_bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&deps.pool)
            .await?;

        anyhow::ensure!(
            counts.session_events == i64::try_from(r.events)?,
            "seeded {} events but counted {}",
            r.events,
            counts.session_events
        );
        anyhow::ensure!(artifacts.ok(), "artifact check failed: {artifacts:?}");
        anyhow::ensure!(
            projections.consistent() && projections.lagging == 0,
            "projection check failed: {projections:?}"
        );

        println!("seed benchmark (LocalFileSystem, ephemeral Postgres, fsync off)");
        println!(
            "  seeded      {} sessions, {} events, {} commands, {} objects ({:.1} MiB), {} deliveries",
            r.sessions,
            r.events,
            r.commands,
            r.objects,
            r.object_bytes as f64 / 1_048_576.0,
            counts.as_pairs()
                .iter()
                .filter(|(k, _)| k.starts_with("channel_deliveries."))
                .map(|(_, v)| v)
                .sum::<i64>()
        );
        println!(
            "  seed        {seed_secs:.2} s  = {:.0} events/s, {:.0} objects/s",
            r.events as f64 / seed_secs,
            r.objects as f64 / seed_secs
        );
        println!(
            "  database    {:.1} MiB after seeding",
            db_bytes as f64 / 1_048_576.0
        );
        println!("  counts      {counts_ms:.1} ms");
        println!("  projections {projections_ms:.1} ms (verify_projections)");
        println!(
            "  artifacts   {verify_secs:.2} s to re-hash {} objects = {:.0} objects/s",
            artifacts.checked,
            artifacts.checked as f64 / verify_secs
        );
        Ok::<(), anyhow::Error>(())
    })?;
    drop(cluster);
    Ok(())
}
