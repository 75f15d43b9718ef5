//! The real profile: `cloud_` names everywhere and no kind table, no maintenance mode or
//! `/healthz`, roles that need their overlay file, web that migrates on boot and exits when
//! Postgres terminates its connection, and a worker smoke that passes while web's database role
//! is frozen read-only.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Proc, Web, env_with, eventually, free_addr, http, run_bin_in, token};
use cowork_sim::auth::Scope;
use cowork_sim::profile::{OVERLAY_FILE, TABLES};
use cowork_sim::seed::SeedConfig;
use cowork_sim::{Profile, store};
use reqwest::StatusCode;
use serde_json::Value;

/// A directory holding the real profile's overlay file, for roles to start in.
fn overlay_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(OVERLAY_FILE), "profile = \"real\"\n").unwrap();
    dir
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn migrates_seeds_counts_and_verifies_with_cloud_names_only() {
    let env = env_with("real_names", Profile::Real).await;
    let pool = &env.deps.pool;
    let mut config = SeedConfig::new(12);
    config.rng_seed = 3;
    config.bind_every = 2;
    cowork_sim::seed::run(&env.deps, &config).await.unwrap();

    let relations: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let bare: Vec<&String> = relations
        .iter()
        .filter(|r| !r.starts_with("cloud_"))
        .collect();
    assert!(bare.is_empty(), "relations without the prefix: {bare:?}");
    for table in TABLES {
        assert!(
            relations.contains(&format!("cloud_{table}")),
            "cloud_{table} is missing"
        );
    }
    assert!(relations.contains(&"cloud_migrations".to_owned()));
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(functions, ["cloud_channel_cursor_moves_forward_only"]);

    let status = cowork_sim::schema::status(pool, Profile::Real)
        .await
        .unwrap();
    assert!(status.current, "{status:?}");
    assert!(
        cowork_sim::schema::status(pool, Profile::Kind)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    assert!(cowork_sim::counts(pool, Profile::Kind).await.is_err());

    let counts = cowork_sim::counts(pool, Profile::Real).await.unwrap();
    assert_eq!(counts.sessions, 12);
    assert_eq!(counts.session_projections, 12);
    assert!(counts.channel_bindings > 0 && counts.artifact_index >= 12);
    let artifacts = store::verify_artifacts(pool, Profile::Real, env.deps.objects.as_ref(), None)
        .await
        .unwrap();
    assert!(artifacts.ok() && artifacts.checked > 0, "{artifacts:?}");
    let projections = store::verify_projections(pool, Profile::Real)
        .await
        .unwrap();
    assert!(projections.consistent(), "{projections:?}");

    // The command line picks the profile from COWORK_PROFILE (no overlay needed for tools).
    let objects_url = env.objects_url.as_str();
    let envs = [
        ("DATABASE_URL", env.db.url.as_str()),
        ("OBJECT_STORE_URL", objects_url),
        ("COWORK_PROFILE", "real"),
    ];
    let (status, stdout, stderr) = run_bin_in(env.dir.path(), &["counts"], &envs);
    assert!(status.success(), "counts: {stderr}");
    let printed: cowork_sim::RestoreCounts = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed, counts);
    let (status, _, stderr) = run_bin_in(env.dir.path(), &["verify"], &envs);
    assert!(status.success(), "verify: {stderr}");

    // Checkpoints are private files on a file:// store, as the real service writes them.
    let checkpoints: Vec<PathBuf> = files_under(&env.objects_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/checkpoints/"))
        .collect();
    assert!(!checkpoints.is_empty());
    for path in checkpoints {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
}

#[tokio::test]
async fn web_has_no_maintenance_mode_and_probes_readiness_under_health() {
    let env = env_with("real_web", Profile::Real).await;
    let operator = token(&env.deps, Scope::Operator).await;
    let web = Web::start(&env.deps).await;
    let client = http();
    for path in ["/healthz", "/admin/maintenance"] {
        let r = client.get(web.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "GET {path}");
    }
    for path in ["/admin/maintenance", "/admin/smoke"] {
        let r = client
            .post(web.url(path))
            .bearer_auth(&operator.token)
            .json(&serde_json::json!({ "enabled": true }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "POST {path}");
    }
    let r = client.get(web.url("/livez")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client.get(web.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    let names: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["postgres", "migrations", "object_store"]);
    assert!(body.get("maintenance").is_none());
    // The probe object went under health/readiness/<date>/ and was deleted again.
    let leftovers = files_under(&env.objects_dir);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(env.objects_dir.join("health/readiness").is_dir());

    let r = client
        .get(web.url("/api/workspace"))
        .bearer_auth(&operator.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    web.stop().await;
}

#[tokio::test]
async fn roles_refuse_to_start_without_their_overlay_and_web_refuses_maintenance() {
    let db = common::fresh_db("real_overlay");
    let elsewhere = tempfile::tempdir().unwrap();
    let objects_url = format!("file://{}/objects", elsewhere.path().display());
    let addr = free_addr().to_string();
    let envs = [
        ("DATABASE_URL", db.url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
        ("COWORK_PROFILE", "real"),
    ];
    for args in [
        vec!["web", "--listen", addr.as_str()],
        vec!["worker"],
        vec!["scheduler"],
    ] {
        let (status, _, stderr) = run_bin_in(elsewhere.path(), &args, &envs);
        assert!(!status.success(), "{args:?} started without its overlay");
        assert!(
            stderr.contains(OVERLAY_FILE) && stderr.contains("working directory"),
            "{args:?}: {stderr}"
        );
    }
    let overlay = overlay_dir();
    let (status, _, stderr) = run_bin_in(
        overlay.path(),
        &["web", "--listen", &addr, "--maintenance"],
        &envs[..2],
    );
    assert!(!status.success());
    assert!(stderr.contains("no maintenance mode"), "{stderr}");
}

#[tokio::test]
async fn web_migrates_on_boot_unless_told_not_to_and_exits_when_postgres_ends_its_connection() {
    let db = common::fresh_db("real_exit");
    let logs = tempfile::tempdir().unwrap();
    let overlay = overlay_dir();
    let objects_url = format!("file://{}/objects", logs.path().display());
    let addr = free_addr().to_string();
    let web_url = format!("http://{addr}");
    let envs = [
        ("DATABASE_URL", db.url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
    ];
    let client = http();
    let readyz = async |client: &reqwest::Client| {
        let r = client.get(format!("{web_url}/readyz")).send().await.ok()?;
        Some(r.status())
    };

    // Told not to migrate (the first start after a restore), web serves and is not ready.
    let mut no_migrate = Proc::spawn_in(
        "web-no-migrate",
        logs.path(),
        overlay.path(),
        &["web", "--listen", &addr],
        &[envs[0], envs[1], ("COWORK_MIGRATE_ON_BOOT", "false")],
    );
    let status = eventually("web to answer", Duration::from_secs(30), async || {
        readyz(&client).await
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(no_migrate.terminate(Duration::from_secs(10)).success());
    let pool = cowork_sim::connect(&db.url).await.unwrap();
    assert!(
        !cowork_sim::schema::status(&pool, Profile::Real)
            .await
            .unwrap()
            .current
    );

    // By default it migrates on boot.
    let mut web = Proc::spawn_in(
        "web",
        logs.path(),
        overlay.path(),
        &["web", "--listen", &addr],
        &envs,
    );
    eventually("web to be ready", Duration::from_secs(30), async || {
        (readyz(&client).await? == StatusCode::OK).then_some(())
    })
    .await;
    assert!(
        cowork_sim::schema::status(&pool, Profile::Real)
            .await
            .unwrap()
            .current
    );
    pool.close().await;

    db.cluster
        .psql(
            "postgres",
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                db.name
            ),
        )
        .unwrap();
    let status = web.wait(Duration::from_secs(20));
    assert!(!status.success(), "web survived: {}", web.log_text());
    assert!(
        web.log_text().contains("terminat"),
        "the log does not say why: {}",
        web.log_text()
    );
}

#[tokio::test]
async fn worker_smoke_passes_while_webs_role_is_frozen_read_only() {
    let db = common::fresh_db("real_frozen");
    let role = format!("cowork_app_{}", std::process::id());
    db.cluster
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE {role} LOGIN CREATEDB; ALTER DATABASE \"{}\" OWNER TO {role}",
                db.name
            ),
        )
        .unwrap();
    let port = db.cluster.port();
    let app_url = format!("postgres://{role}@127.0.0.1:{port}/{}", db.name);
    let writer_url = format!("{app_url}?options=-c%20default_transaction_read_only%3Doff");
    let dir = tempfile::tempdir().unwrap();
    let overlay = overlay_dir();
    let objects_url = format!("file://{}/objects", dir.path().display());
    let tokens = dir.path().join("tokens.json");
    let tools = [
        ("DATABASE_URL", app_url.as_str()),
        ("OBJECT_STORE_URL", objects_url.as_str()),
        ("COWORK_PROFILE", "real"),
    ];
    let (status, _, stderr) = run_bin_in(dir.path(), &["migrate"], &tools);
    assert!(status.success(), "migrate: {stderr}");
    let (status, _, stderr) = run_bin_in(
        dir.path(),
        &[
            "seed",
            "--sessions",
            "6",
            "--rng-seed",
            "9",
            "--tokens-out",
            &tokens.display().to_string(),
        ],
        &tools,
    );
    assert!(status.success(), "seed: {stderr}");
    let tokens: Value = serde_json::from_str(&std::fs::read_to_string(&tokens).unwrap()).unwrap();
    let operator = tokens["operator"]["token"].as_str().unwrap().to_owned();
    let desktop = tokens["desktop"][0]["token"].as_str().unwrap().to_owned();

    // The freeze Rollcall's database agent applies to a service without a maintenance mode.
    db.cluster
        .psql(
            "postgres",
            &format!(
                "ALTER ROLE {role} IN DATABASE \"{}\" SET default_transaction_read_only = on",
                db.name
            ),
        )
        .unwrap();

    let addr = free_addr().to_string();
    let web_url = format!("http://{addr}");
    let _web = Proc::spawn_in(
        "web",
        dir.path(),
        overlay.path(),
        &["web", "--listen", &addr],
        &tools[..2],
    );
    let client = http();
    eventually("web to be ready", Duration::from_secs(30), async || {
        let r = client.get(format!("{web_url}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // Web serves reads only.
    let r = client
        .post(format!("{web_url}/api/sessions"))
        .bearer_auth(&desktop)
        .json(&serde_json::json!({ "title": "while frozen" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = client
        .get(format!("{web_url}/api/sessions"))
        .bearer_auth(&desktop)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Without the opt-out the smoke cannot write its prompt.
    let smoke = |url: &str| {
        run_bin_in(
            dir.path(),
            &[
                "smoke",
                "worker",
                "--web-url",
                &web_url,
                "--token",
                &operator,
                "--timeout",
                "60s",
            ],
            &[("DATABASE_URL", url), ("COWORK_PROFILE", "real")],
        )
    };
    let (status, _, stderr) = smoke(&app_url);
    assert!(!status.success());
    assert!(stderr.contains("read-only"), "{stderr}");

    // The worker and the smoke opt out of the freeze with their connection's startup option.
    let _worker = Proc::spawn_in(
        "worker",
        dir.path(),
        overlay.path(),
        &["worker"],
        &[
            ("DATABASE_URL", writer_url.as_str()),
            ("OBJECT_STORE_URL", objects_url.as_str()),
        ],
    );
    let (status, stdout, stderr) = smoke(&writer_url);
    assert!(status.success(), "smoke: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["detail"]["command_status"], "acked", "{report}");
    assert_eq!(report["detail"]["read_through"], "web");
    assert_eq!(report["detail"]["projection"]["lag"], 0);
}
