//! The roles on S3, through a local S3-compatible server (`moto_server`) the test starts on
//! 127.0.0.1. Skipped, with a note on stderr, when `moto_server` is not installed.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Moto, Web, fresh_db, http, run_bin};
use cowork_sim::Deps;
use cowork_sim::store;
use cowork_sim::worker::{Worker, WorkerConfig};
use object_store::ObjectStoreExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn seed_web_worker_and_verify_work_on_s3() {
    let Some(moto) = Moto::start("cowork").await else {
        return;
    };
    let db = fresh_db("s3");
    let url = format!("s3://{}/fleet-a", moto.bucket);
    let deps = Deps::connect(&db.url, &url, &moto.options(), cowork_sim::Profile::Kind)
        .await
        .unwrap();
    cowork_sim::schema::migrate(&deps.pool, deps.profile)
        .await
        .unwrap();

    let mut config = cowork_sim::seed::SeedConfig::new(6);
    config.bind_every = 2;
    config.rng_seed = 3;
    let seeded = cowork_sim::seed::run(&deps, &config).await.unwrap();
    let check = store::verify_artifacts(&deps.pool, deps.profile, deps.objects.as_ref(), None)
        .await
        .unwrap();
    assert!(check.ok() && check.checked == 12, "{check:?}");

    let web = Web::start(&deps).await;
    let client = http();
    let ready = client.get(web.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    let token = &seeded.tokens.desktop[0].token;
    let created: Value = client
        .post(web.url("/api/sessions"))
        .bearer_auth(token)
        .json(&json!({ "title": "on s3" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = created["id"].as_str().unwrap();
    let r = client
        .post(web.url(&format!("/api/sessions/{session}/prompt")))
        .bearer_auth(token)
        .json(&json!({ "text": "store this in the bucket" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut worker = WorkerConfig::new("w-s3");
    worker.max_commands = Some(1);
    worker.max_wait = Some(Duration::from_secs(60));
    let report = Worker::new(deps.clone(), worker)
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.acked, 1);
    web.stop().await;

    // The CLI opens the same bucket and prefix from its flags and the AWS_* environment.
    let s3_env = [
        ("DATABASE_URL", db.url.as_str()),
        ("OBJECT_STORE_URL", url.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    let (status, stdout, stderr) = run_bin(&["verify", "--s3-endpoint", &moto.endpoint], &s3_env);
    assert!(status.success(), "verify: {stdout} {stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["artifacts"]["checked"], 14);

    // An object lost from the bucket is reported, and verify exits non-zero.
    let key: String = sqlx::query_scalar(
        "SELECT object_key FROM artifact_index WHERE kind = 'checkpoint' ORDER BY object_key LIMIT 1",
    )
    .fetch_one(&deps.pool)
    .await
    .unwrap();
    deps.objects.delete(&key.as_str().into()).await.unwrap();
    let (status, stdout, stderr) = run_bin(&["verify", "--s3-endpoint", &moto.endpoint], &s3_env);
    assert!(!status.success());
    assert!(stderr.contains("1 missing"), "{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["artifacts"]["missing_keys"][0], key);
}
