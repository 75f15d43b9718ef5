//! Postgres backups and restores against a throwaway cluster: consistent counts, round trip of
//! parallel (multi-archive) dumps with exact rows, damaged archives, points of the older
//! single-archive layout, and the errors an operator meets (bad URL, missing pg_dump).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ephemeral_pg::Cluster;
use repository::*;
use sqlx::Connection;

const SCHEMA: &str = "
CREATE TABLE sessions (
    id bigint PRIMARY KEY, tenant text NOT NULL, title text NOT NULL, status text NOT NULL);
CREATE TABLE session_events (
    session_id bigint NOT NULL REFERENCES sessions (id), sequence bigint NOT NULL,
    kind text NOT NULL, payload jsonb NOT NULL, PRIMARY KEY (session_id, sequence));
CREATE TABLE artifact_index (
    id bigint PRIMARY KEY, session_id bigint NOT NULL REFERENCES sessions (id),
    object_key text NOT NULL, size_bytes bigint NOT NULL, sha256 text NOT NULL);
CREATE TABLE channel_deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, session_id bigint NOT NULL,
    status text NOT NULL, payload jsonb NOT NULL);
INSERT INTO sessions SELECT g, 'tenant-' || (g % 7), 'session ' || g,
    (ARRAY['idle','running','closed'])[1 + g % 3] FROM generate_series(1, 20000) g;
INSERT INTO session_events SELECT 1 + (g % 20000), g, 'message',
    jsonb_build_object('text', repeat('x', 40), 'n', g) FROM generate_series(1, 100000) g;
INSERT INTO artifact_index SELECT g, 1 + (g % 20000), 'artifacts/' || g,
    g * 10, md5(g::text) || md5(g::text) FROM generate_series(1, 10000) g;
INSERT INTO channel_deliveries (session_id, status, payload) SELECT 1 + (g % 20000),
    (ARRAY['pending','sent','failed','dead'])[1 + g % 4], '{}'::jsonb
    FROM generate_series(1, 30000) g;
";

fn counts() -> Vec<CountSpec> {
    vec![
        CountSpec::table("sessions"),
        CountSpec::table("session_events"),
        CountSpec::table("artifact_index"),
        CountSpec::grouped("channel_deliveries", "status"),
    ]
}

/// The same counts, taken by psql in another database.
fn live_counts(cluster: &Cluster, db: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for table in [
        "sessions",
        "session_events",
        "artifact_index",
        "channel_deliveries",
    ] {
        let n = cluster
            .psql(db, &format!("SELECT count(*) FROM {table}"))
            .expect("count");
        out.insert(table.to_owned(), n.trim().parse().expect("number"));
    }
    let rows = cluster
        .psql(
            db,
            "SELECT status || '|' || count(*) FROM channel_deliveries GROUP BY status",
        )
        .expect("grouped");
    for line in rows.lines().filter(|l| !l.is_empty()) {
        let (status, n) = line.split_once('|').expect("row");
        out.insert(
            format!("channel_deliveries[status={status}]"),
            n.parse().expect("number"),
        );
    }
    out
}

fn start_cluster() -> Cluster {
    let cluster = Cluster::start().expect("start a throwaway Postgres");
    cluster.create_database("app").expect("create app");
    cluster.psql("app", SCHEMA).expect("load schema");
    cluster
}

/// Split every table off (the test tables are small) over 3 data jobs.
fn backup_options(cluster: &Cluster, id: &PointId) -> PgBackupOptions {
    let mut options = PgBackupOptions::new(id.clone(), cluster.url("app"));
    options.bin_dir = Some(cluster.bin_dir().to_path_buf());
    options.counts = CountSelection::Listed(counts());
    options.jobs = 3;
    options.split_min_table_bytes = 0;
    options
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The md5 of every row of `table`, in order, as text: equal only for equal contents.
fn table_digest(cluster: &Cluster, db: &str, table: &str) -> String {
    cluster
        .psql(
            db,
            &format!("SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"),
        )
        .expect("digest")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_and_restore_round_trip_with_counts_from_the_dump_snapshot() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;

    // Writers keep inserting during the backup: counts taken outside the dump's snapshot
    // would not match what the dump holds.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let url = cluster.url("app");
        let stop = stop.clone();
        let written = written.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .expect("writer connects");
            let mut id = 1_000_000i64;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                sqlx::query("INSERT INTO sessions VALUES ($1, 't', 'live', 'idle')")
                    .bind(id)
                    .execute(&mut conn)
                    .await
                    .expect("insert session");
                sqlx::query(
                    "INSERT INTO channel_deliveries (session_id, status, payload) \
                     VALUES ($1, 'pending', '{}')",
                )
                .bind(id)
                .execute(&mut conn)
                .await
                .expect("insert delivery");
                written.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    while written.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    let part = backup_postgres(&repo, &backup_options(&cluster, &id))
        .await
        .expect("backup");
    let at_backup_end = written.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    assert!(at_backup_end > 20, "writes happened during the backup");
    assert_eq!(part.key, format!("postgres/{id}"));
    let names: Vec<&str> = part.files.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("postgres/{id}/schema.dump.zst"),
            format!("postgres/{id}/data.dump.zst"),
            format!("postgres/{id}/data-1.dump.zst"),
            format!("postgres/{id}/data-2.dump.zst"),
        ],
        "schema, the rest of the data, and two parts split off"
    );
    assert_eq!(part.files[0].content, DumpContent::Schema);
    assert_eq!(part.files[1].content, DumpContent::Data);
    let mut split: Vec<String> = part.files[2..]
        .iter()
        .flat_map(|f| match &f.content {
            DumpContent::Tables { tables } => tables.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    split.sort();
    // Every table is large enough (split_min_table_bytes = 0): the two largest get a part
    // each, the next goes to the then empty main archive, and the smallest joins it there.
    assert_eq!(split.len(), 2, "2 of the 4 tables split off: {split:?}");
    split.dedup();
    assert_eq!(split.len(), 2, "each table in one part only");
    assert_eq!(part.size, part.files.iter().map(|f| f.size).sum::<u64>());
    assert!(
        part.size < part.dump_size,
        "compressed {} of {}",
        part.size,
        part.dump_size
    );
    assert!(
        part.pg_dump_version.contains("pg_dump"),
        "{}",
        part.pg_dump_version
    );

    let point = write_pg_point(&repo, &id, &part).await;
    assert_eq!(point.table_counts(), Some(&part.table_counts));
    assert!(repo.verify_point(&id, true).await.expect("verify").is_ok());

    // Streamed restore into a database that does not exist yet.
    let mut restore = pg_restore_options(&cluster, "restored");
    restore.create_database = true;
    let report = restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore");
    assert!(report.streamed);
    assert_eq!(report.archive_bytes, part.dump_size);
    let restored = live_counts(&cluster, "restored");
    assert_eq!(&restored, point.table_counts().expect("counts"));
    assert!(
        live_counts(&cluster, "app")["sessions"] > restored["sessions"],
        "the live database moved on after the backup"
    );

    // Parallel restore, the schema archive in a scratch directory.
    let mut restore = pg_restore_options(&cluster, "restored_parallel");
    restore.create_database = true;
    restore.jobs = 2;
    restore.scratch_dir = Some(dir.path().join("scratch"));
    let report = restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore -j");
    assert!(report.streamed);
    for table in [
        "sessions",
        "session_events",
        "artifact_index",
        "channel_deliveries",
    ] {
        assert_eq!(
            table_digest(&cluster, "restored", table),
            table_digest(&cluster, "restored_parallel", table),
            "{table}"
        );
    }
    assert_eq!(
        &live_counts(&cluster, "restored_parallel"),
        point.table_counts().expect("counts")
    );
    assert!(
        files_under(&dir.path().join("scratch")).is_empty(),
        "scratch file removed"
    );

    // Restoring a parallel dump over a database that has tables is refused up front.
    let restore = pg_restore_options(&cluster, "restored");
    let err = restore_postgres(&repo, &id, &restore)
        .await
        .expect_err("not empty");
    assert!(
        format!("{err:#}").contains("already holds") && format!("{err:#}").contains("new"),
        "{err:#}"
    );

    // fetch_dump gives a directory of archives pg_restore reads as they are.
    let fetched = dir.path().join("fetched");
    let bytes = fetch_dump(&repo, &id, &fetched).await.expect("fetch");
    assert_eq!(bytes, part.dump_size);
    let mut listing = String::new();
    for name in ["schema.dump", "data.dump", "data-1.dump", "data-2.dump"] {
        let listed = std::process::Command::new(cluster.bin_dir().join("pg_restore"))
            .arg("--list")
            .arg(fetched.join(name))
            .output()
            .expect("pg_restore --list");
        assert!(listed.status.success(), "{name}");
        listing.push_str(&String::from_utf8_lossy(&listed.stdout));
    }
    assert!(listing.contains("TABLE DATA public session_events"));
    assert!(listing.contains("CONSTRAINT public sessions sessions_pkey"));
}

/// A database that is not cowork-sim's: tables in `public` and in another schema, a partitioned
/// table, an empty table, a quoted name, and relations that are not user tables.
const ANY_SERVICE: &str = r#"
CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL);
INSERT INTO orders SELECT g, (ARRAY['open','paid'])[1 + g % 2] FROM generate_series(1, 300) g;
CREATE TABLE "Line Items" (order_id bigint NOT NULL, sku text NOT NULL);
INSERT INTO "Line Items" SELECT 1 + g % 300, 'sku-' || g FROM generate_series(1, 750) g;
CREATE TABLE refunds (id bigint);
CREATE SCHEMA audit;
CREATE TABLE audit.events (at timestamptz NOT NULL, what text NOT NULL) PARTITION BY RANGE (at);
CREATE TABLE audit.events_2025 PARTITION OF audit.events
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE audit.events_2026 PARTITION OF audit.events
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO audit.events SELECT '2025-06-01'::timestamptz + g * interval '1 day', 'e'
    FROM generate_series(1, 400) g;
CREATE VIEW open_orders AS SELECT * FROM orders WHERE state = 'open';
CREATE MATERIALIZED VIEW order_states AS SELECT state, count(*) FROM orders GROUP BY state;
CREATE SEQUENCE invoice_numbers;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_a_backup_counts_every_user_table_of_any_schema() {
    let cluster = Cluster::start().expect("start a throwaway Postgres");
    cluster.create_database("shop").expect("create shop");
    cluster.psql("shop", ANY_SERVICE).expect("load schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;

    // The default: no list of tables, none of cowork-sim's names.
    let id = PointId::new("shop", chrono::Utc::now()).expect("id");
    let mut options = PgBackupOptions::new(id.clone(), cluster.url("shop"));
    options.bin_dir = Some(cluster.bin_dir().to_path_buf());
    assert_eq!(options.counts, CountSelection::AllTables);
    let part = backup_postgres(&repo, &options).await.expect("backup");
    // Public tables by name, others by schema; a partitioned table once, as its parent (its
    // partitions' rows are its own); no view, materialized view, sequence or catalog table.
    let want: BTreeMap<String, i64> = [
        ("Line Items", 750),
        ("audit.events", 400),
        ("orders", 300),
        ("refunds", 0),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(part.table_counts, want);

    // The counts describe what the dump holds: a restore has exactly those rows.
    write_pg_point(&repo, &id, &part).await;
    let mut restore = pg_restore_options(&cluster, "shop_restored");
    restore.create_database = true;
    restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore");
    let mut conn = sqlx::PgConnection::connect(&cluster.url("shop_restored"))
        .await
        .expect("connect to the restored copy");
    let specs = count_specs(&mut conn, &CountSelection::AllTables)
        .await
        .expect("list the restored tables");
    assert_eq!(
        specs.iter().find(|s| s.name == "audit.events"),
        Some(&CountSpec {
            name: "audit.events".to_owned(),
            table: "audit.events".to_owned(),
            group_by: None,
        })
    );
    let restored = count_rows(&mut conn, &specs).await.expect("count");
    assert_eq!(restored, want);
    conn.close().await.expect("close");

    // Rows written after the backup are not in its counts; a table created after it neither.
    cluster
        .psql(
            "shop",
            "INSERT INTO orders VALUES (1000, 'open'); CREATE TABLE later (id int);",
        )
        .expect("write after the backup");
    assert_eq!(part.table_counts["orders"], 300);
    assert!(!part.table_counts.contains_key("later"));

    // Counting nothing, or a list, when asked.
    let id = PointId::new("shop", chrono::Utc::now()).expect("id");
    let mut options = PgBackupOptions::new(id.clone(), cluster.url("shop"));
    options.bin_dir = Some(cluster.bin_dir().to_path_buf());
    options.counts = CountSelection::none();
    let part = backup_postgres(&repo, &options).await.expect("backup");
    assert!(part.table_counts.is_empty(), "{:?}", part.table_counts);
    options.point = PointId::new("shop", chrono::Utc::now()).expect("id");
    options.counts = CountSelection::Listed(vec![CountSpec::grouped("orders", "state")]);
    let part = backup_postgres(&repo, &options).await.expect("backup");
    assert_eq!(
        part.table_counts,
        [
            ("orders".to_owned(), 301),
            ("orders[state=open]".to_owned(), 151),
            ("orders[state=paid]".to_owned(), 150),
        ]
        .into_iter()
        .collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_dump_restores_every_row_sequence_view_and_large_object() {
    let cluster = start_cluster();
    cluster
        .psql(
            "app",
            "CREATE SEQUENCE ticket_seq START 1000;
             SELECT nextval('ticket_seq') FROM generate_series(1, 7);
             CREATE MATERIALIZED VIEW events_per_session AS
                 SELECT session_id, count(*) AS n FROM session_events GROUP BY session_id;
             SELECT lo_from_bytea(424242, 'large object body');
             CREATE TABLE \"Odd Name\" (id int PRIMARY KEY, \"Value\" text);
             INSERT INTO \"Odd Name\" SELECT g, 'v' || g FROM generate_series(1, 50) g;
             -- Post-data beyond one table's keys: a foreign key into a table of another
             -- archive, a commented expression index, a trigger, a partitioned table.
             CREATE TABLE notes (id int PRIMARY KEY, session_id bigint REFERENCES sessions (id),
                 body text);
             INSERT INTO notes SELECT row_number() OVER (), id, 'note ' || id
                 FROM (SELECT id FROM sessions ORDER BY id LIMIT 20) s;
             CREATE INDEX notes_body ON notes (lower(body));
             COMMENT ON INDEX notes_body IS 'by body';
             CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql
                 AS $$BEGIN RETURN NEW; END$$;
             CREATE TRIGGER notes_touch BEFORE INSERT ON notes
                 FOR EACH ROW EXECUTE FUNCTION touch();
             CREATE TABLE readings (id int, d date, PRIMARY KEY (id, d)) PARTITION BY RANGE (d);
             CREATE TABLE readings_2020 PARTITION OF readings
                 FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
             CREATE INDEX readings_d ON readings (d);
             INSERT INTO readings SELECT g, date '2020-01-01' + g FROM generate_series(1, 100) g;",
        )
        .expect("extra objects");
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    let mut options = backup_options(&cluster, &id);
    options.jobs = 4;
    let part = backup_postgres(&repo, &options).await.expect("backup");
    assert_eq!(part.files.len(), 5, "schema, rest, three parts split off");
    write_pg_point(&repo, &id, &part).await;
    assert!(repo.verify_point(&id, true).await.expect("verify").is_ok());

    let mut restore = pg_restore_options(&cluster, "restored");
    restore.create_database = true;
    restore.jobs = 3;
    restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore");

    for table in [
        "sessions",
        "session_events",
        "artifact_index",
        "channel_deliveries",
        "events_per_session",
        "\"Odd Name\"",
        "notes",
        "readings",
    ] {
        assert_eq!(
            table_digest(&cluster, "app", table),
            table_digest(&cluster, "restored", table),
            "{table}"
        );
    }
    assert_eq!(
        &live_counts(&cluster, "restored"),
        repo.read_point(&id)
            .await
            .expect("point")
            .table_counts()
            .expect("counts")
    );
    let probe = "SELECT (SELECT last_value FROM ticket_seq) || ' ' || \
                 (SELECT last_value FROM channel_deliveries_id_seq) || ' ' || \
                 convert_from(lo_get(424242), 'UTF8')";
    assert_eq!(
        cluster.psql("restored", probe).expect("probe"),
        cluster.psql("app", probe).expect("probe")
    );
    // Constraints and indexes came back (post-data): the schemas are the same.
    let schema = |db: &str| {
        let out = std::process::Command::new(cluster.bin_dir().join("pg_dump"))
            .arg(cluster.url(db))
            .args(["--schema-only", "--no-owner", "--no-acl"])
            .output()
            .expect("pg_dump --schema-only");
        assert!(out.status.success());
        // `\restrict` lines carry a random key per dump.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(schema("app"), schema("restored"));
}

/// A point of the single-archive layout (one `pg_dump -Fc` streamed through zstd into
/// `postgres/<point>.dump.zst`, no `files` in the point) restores, streamed and with -j.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_archive_point_still_restores() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = file_repo(&repo_dir).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    // Exactly what the earlier backup stored: pg_dump -Fc -Z0 compressed with zstd.
    let out = std::process::Command::new(cluster.bin_dir().join("pg_dump"))
        .arg(cluster.url("app"))
        .args(["--format=custom", "--no-owner", "--no-acl", "--compress=0"])
        .output()
        .expect("pg_dump");
    assert!(out.status.success());
    let stored = zstd::encode_all(&out.stdout[..], 3).expect("zstd");
    let key = format!("postgres/{id}.dump.zst");
    std::fs::create_dir_all(repo_dir.join("postgres")).expect("mkdir");
    std::fs::write(repo_dir.join(&key), &stored).expect("write dump");
    let mut counts = BTreeMap::new();
    for (table, n) in live_counts(&cluster, "app") {
        counts.insert(table, n);
    }
    let point = repo
        .write_point(NewPoint {
            id: id.clone(),
            postgres: Some(PgBackupPart {
                key: key.clone(),
                compression: Compression::Zstd {
                    level: 3,
                    workers: 2,
                },
                size: stored.len() as u64,
                sha256: sha256_hex(&stored),
                dump_size: out.stdout.len() as u64,
                files: vec![],
                database: "app".to_owned(),
                server_version: "15".to_owned(),
                pg_dump_version: "pg_dump (PostgreSQL) 15.0".to_owned(),
                snapshot: String::new(),
                started_at: chrono::Utc::now(),
                finished_at: chrono::Utc::now(),
                table_counts: counts,
                columns: Default::default(),
                server: None,
            }),
            objects: None,
            secrets: vec![],
        })
        .await
        .expect("point");
    let text = std::fs::read_to_string(repo_dir.join(format!("points/{id}.json"))).expect("read");
    assert!(!text.contains("\"files\""), "the old point shape: {text}");
    assert!(repo.verify_point(&id, true).await.expect("verify").is_ok());

    // With 2 jobs and no scratch directory to hold the one archive, it is streamed with 1.
    for (db, jobs, scratch) in [
        ("streamed", 1, false),
        ("parallel", 2, true),
        ("no_scratch", 2, false),
    ] {
        let mut restore = pg_restore_options(&cluster, db);
        restore.create_database = true;
        restore.jobs = jobs;
        if scratch {
            restore.scratch_dir = Some(dir.path().join("scratch"));
        }
        let report = restore_postgres(&repo, &id, &restore)
            .await
            .expect("restore");
        assert_eq!(report.streamed, !scratch);
        assert_eq!(report.archive_bytes, out.stdout.len() as u64);
        assert_eq!(
            &live_counts(&cluster, db),
            point.table_counts().expect("counts")
        );
        assert_eq!(
            table_digest(&cluster, "app", "session_events"),
            table_digest(&cluster, db, "session_events")
        );
    }
    let file = dir.path().join("fetched.dump");
    assert_eq!(
        fetch_dump(&repo, &id, &file).await.expect("fetch"),
        out.stdout.len() as u64
    );
    assert_eq!(std::fs::read(&file).expect("read"), out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_catches_a_flipped_byte_in_the_dump_and_restore_refuses_it() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = file_repo(&repo_dir).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    let part = backup_postgres(&repo, &backup_options(&cluster, &id))
        .await
        .expect("backup");
    write_pg_point(&repo, &id, &part).await;

    // Damage the archive holding session_events; the others stay sound.
    let damaged = part
        .files
        .iter()
        .find(|f| match &f.content {
            DumpContent::Tables { tables } => tables.iter().any(|t| t == "public.session_events"),
            _ => false,
        })
        .unwrap_or(&part.files[1]);
    flip_byte(&repo_dir.join(&damaged.key));
    let report = repo.verify_point(&id, false).await.expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains(&damaged.key) && report.problems[0].contains("is damaged"),
        "{:?}",
        report.problems
    );
    let report = repo.verify_point(&id, true).await.expect("verify --full");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains(&damaged.key),
        "{:?}",
        report.problems
    );

    let mut restore = pg_restore_options(&cluster, "restored");
    restore.create_database = true;
    let err = restore_postgres(&repo, &id, &restore)
        .await
        .expect_err("a damaged dump is not restored");
    let text = format!("{err:#}");
    assert!(
        text.contains(&damaged.key) && text.contains("damaged"),
        "{text}"
    );
    assert!(text.contains("partial restore"), "{text}");
    // The damaged archive's own transaction rolled back, and its table's indexes were never
    // built (those of the sound archives' tables may have been: each follows its own data).
    assert_eq!(
        cluster
            .psql("restored", "SELECT count(*) FROM session_events")
            .expect("count")
            .trim(),
        "0"
    );
    assert_eq!(
        cluster
            .psql(
                "restored",
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'session_events'"
            )
            .expect("indexes")
            .trim(),
        "0"
    );

    let fetched = dir.path().join("fetched");
    let err = fetch_dump(&repo, &id, &fetched).await.expect_err("damaged");
    assert!(!fetched.exists(), "no partial directory is left");
    assert!(!dir.path().join("fetched.partial").exists());
    assert!(format!("{err:#}").contains(&damaged.key), "{err:#}");

    // With two jobs a split-off archive's rows are dealt out over two connections, whose
    // transactions must all roll back when the archive turns out damaged at its end.
    flip_byte(&repo_dir.join(&damaged.key)); // sound again
    let split_off = part
        .files
        .iter()
        .find(|f| matches!(f.content, DumpContent::Tables { .. }))
        .expect("a split-off archive");
    let DumpContent::Tables { tables } = &split_off.content else {
        panic!("not a split-off archive");
    };
    flip_byte(&repo_dir.join(&split_off.key));
    let mut restore = pg_restore_options(&cluster, "restored_j2");
    restore.create_database = true;
    restore.jobs = 2;
    let err = restore_postgres(&repo, &id, &restore)
        .await
        .expect_err("a damaged dump is not restored");
    let text = format!("{err:#}");
    assert!(
        text.contains(&split_off.key)
            && text.contains("damaged")
            && text.contains("transactions were rolled back")
            && text.contains("partial restore"),
        "{text}"
    );
    for table in tables {
        let name = table.rsplit_once('.').map_or(table.as_str(), |(_, t)| t);
        let rows = cluster
            .psql("restored_j2", &format!("SELECT count(*) FROM {table}"))
            .expect("count");
        let indexes = cluster
            .psql(
                "restored_j2",
                &format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{name}'"),
            )
            .expect("indexes");
        assert_eq!((rows.trim(), indexes.trim()), ("0", "0"), "{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_urls_missing_tools_and_missing_tables_are_clear_errors() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");

    // A database that does not answer; the password must not leak into the message.
    let port = free_port();
    let mut options = backup_options(&cluster, &id);
    options.database_url = format!("postgres://app:hunter2@127.0.0.1:{port}/app");
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("no server");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}/app")) && text.contains("check"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // pg_dump missing from the configured directory.
    let empty = tempfile::tempdir().expect("tempdir");
    let mut options = backup_options(&cluster, &id);
    options.bin_dir = Some(empty.path().to_path_buf());
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("no pg_dump");
    let text = format!("{err:#}");
    assert!(
        text.contains("pg_dump was not found in") && text.contains("install"),
        "{text}"
    );

    // A table to count that does not exist.
    let mut options = backup_options(&cluster, &id);
    let mut listed = counts();
    listed.push(CountSpec::table("workflows"));
    options.counts = CountSelection::Listed(listed);
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("no such table");
    assert!(err.to_string().contains("table workflows"), "{err}");

    // No partial dump or point was left by any of these.
    assert!(files_under(&dir.path().join("repo").join("postgres")).is_empty());
    assert!(
        repo.list_points(None)
            .await
            .expect("list")
            .points
            .is_empty()
    );

    // Restore errors: no Postgres part, and a point that does not exist.
    let err = restore_postgres(&repo, &id, &PgRestoreOptions::new(cluster.url("x")))
        .await
        .expect_err("no such point");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_dump_failure_aborts_the_upload() {
    let cluster = start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let id = PointId::new("dev", chrono::Utc::now()).expect("id");
    // A fake pg_dump that writes half an archive and fails, as a dump cut off by the server.
    let tools = tempfile::tempdir().expect("tempdir");
    let fake = tools.path().join("pg_dump");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 99.0'; exit 0; fi\n\
         printf 'PGDMP partial'\necho 'pg_dump: error: connection lost' >&2\nexit 1\n",
    )
    .expect("write fake");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut options = backup_options(&cluster, &id);
    options.bin_dir = Some(tools.path().to_path_buf());
    let err = backup_postgres(&repo, &options)
        .await
        .expect_err("pg_dump fails");
    let text = format!("{err:#}");
    assert!(
        text.contains("pg_dump failed") && text.contains("connection lost"),
        "{text}"
    );
    assert!(
        files_under(&dir.path().join("repo").join("postgres")).is_empty(),
        "the aborted upload left nothing"
    );
}
