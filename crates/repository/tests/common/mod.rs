//! Shared test helpers: a request-counting, fault-injecting object store wrapper, datasets,
//! and a local S3 server (moto) started per test.

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use ephemeral_pg::Cluster;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use repository::{
    HttpStatus, NewPoint, PgBackupPart, PgRestoreOptions, Point, PointId, Repository,
    RepositoryOptions, RetryPolicy,
};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

/// Counts calls per kind and injects faults.
#[derive(Debug, Default)]
pub struct Counts {
    pub puts: AtomicU64,
    pub blob_puts: AtomicU64,
    pub multiparts: AtomicU64,
    pub gets: AtomicU64,
    /// GETs of blob bodies (`objects/blobs/...`), also counted in `gets`.
    pub blob_gets: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub copies: AtomicU64,
    /// Blob PUTs started and not yet finished or dropped.
    pub blob_puts_in_flight: AtomicU64,
    /// Every key written (PUT or multipart), in order.
    pub written: std::sync::Mutex<Vec<String>>,
}

/// Decrements a counter when dropped: counts a call in flight even if its future is dropped.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Counts {
    pub fn get(&self, which: &AtomicU64) -> u64 {
        which.load(Ordering::SeqCst)
    }

    pub fn written(&self) -> Vec<String> {
        self.written.lock().expect("written keys").clone()
    }

    fn record_write(&self, location: &Path) {
        self.written
            .lock()
            .expect("written keys")
            .push(location.to_string());
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    /// The next this-many blob PUTs fail with `status`.
    pub fail_blob_puts: AtomicU64,
    pub status: AtomicU64,
    /// After this many blob PUTs, notify `after_puts`.
    pub notify_after_blob_puts: AtomicU64,
    pub after_puts: Notify,
    /// Delay every GET by this many milliseconds.
    pub get_delay_ms: AtomicU64,
    /// Keys deleted just before they are read or copied (a role removing its scratch object
    /// while a restore looks at it).
    pub vanish_when_touched: std::sync::Mutex<Vec<Path>>,
    /// Create-only puts answer `NotImplemented` (a store without conditional puts).
    pub no_create_only: AtomicBool,
    /// The next this-many create-only puts are applied, then answered with a 503 (an
    /// acknowledgement lost on the way back).
    pub lose_create_answers: AtomicU64,
}

#[derive(Debug)]
pub struct CountingStore {
    pub inner: Arc<dyn ObjectStore>,
    pub counts: Arc<Counts>,
    pub faults: Arc<Faults>,
}

impl CountingStore {
    /// Deletes `location` now if a fault says it vanishes when touched.
    async fn vanish(&self, location: &Path) -> object_store::Result<()> {
        let vanish = self
            .faults
            .vanish_when_touched
            .lock()
            .expect("vanishing keys")
            .contains(location);
        if vanish {
            self.inner.delete(location).await?;
        }
        Ok(())
    }

    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<CountingStore> {
        Arc::new(CountingStore {
            inner,
            counts: Arc::new(Counts::default()),
            faults: Arc::new(Faults::default()),
        })
    }
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

fn is_blob(location: &Path) -> bool {
    location.as_ref().starts_with("objects/blobs/")
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.counts.puts.fetch_add(1, Ordering::SeqCst);
        self.counts.record_write(location);
        if matches!(opts.mode, PutMode::Create) {
            if self.faults.no_create_only.load(Ordering::SeqCst) {
                return Err(object_store::Error::NotImplemented {
                    operation: "put_opts with PutMode::Create".into(),
                    implementer: "fault".into(),
                });
            }
            let lose = self
                .faults
                .lose_create_answers
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok();
            if lose {
                self.inner.put_opts(location, payload, opts).await?;
                return Err(object_store::Error::Generic {
                    store: "fault",
                    source: Box::new(HttpStatus(503)),
                });
            }
        }
        if is_blob(location) {
            let _in_flight = InFlight::enter(&self.counts.blob_puts_in_flight);
            let n = self.counts.blob_puts.fetch_add(1, Ordering::SeqCst) + 1;
            let failing = self
                .faults
                .fail_blob_puts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok();
            if failing {
                let status = self.faults.status.load(Ordering::SeqCst) as u16;
                return Err(object_store::Error::Generic {
                    store: "fault",
                    source: Box::new(HttpStatus(status)),
                });
            }
            let result = self.inner.put_opts(location, payload, opts).await;
            let gate = self.faults.notify_after_blob_puts.load(Ordering::SeqCst);
            if gate > 0 && n >= gate {
                self.faults.after_puts.notify_one();
            }
            return result;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.counts.multiparts.fetch_add(1, Ordering::SeqCst);
        self.counts.record_write(location);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            self.counts.heads.fetch_add(1, Ordering::SeqCst);
        } else {
            self.counts.gets.fetch_add(1, Ordering::SeqCst);
            if is_blob(location) {
                self.counts.blob_gets.fetch_add(1, Ordering::SeqCst);
            }
        }
        let delay = self.faults.get_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.vanish(location).await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.counts.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let counts = self.counts.clone();
        let counted = locations
            .inspect_ok(move |_| {
                counts.deletes.fetch_add(1, Ordering::SeqCst);
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counts.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.counts.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.counts.copies.fetch_add(1, Ordering::SeqCst);
        self.vanish(from).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.counts.copies.fetch_add(1, Ordering::SeqCst);
        self.inner.rename_opts(from, to, options).await
    }
}

/// Fast test options: short backoffs and lock waits.
pub fn test_options() -> RepositoryOptions {
    RepositoryOptions {
        fsync: false,
        retry: RetryPolicy {
            attempts: 5,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
        },
        lock_wait: Duration::from_secs(2),
        ..RepositoryOptions::default()
    }
}

pub fn local_store(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
    std::fs::create_dir_all(dir).expect("create store dir");
    Arc::new(
        LocalFileSystem::new_with_prefix(dir)
            .expect("local store")
            .with_automatic_cleanup(true),
    )
}

/// A `file://` repository in `dir`, with the test options.
pub async fn file_repo(dir: &std::path::Path) -> Repository {
    Repository::open(&format!("file://{}", dir.display()), test_options())
        .await
        .expect("open")
}

/// A repository on a local directory, through a counting wrapper.
pub fn counting_repo(dir: &std::path::Path) -> (Repository, Arc<CountingStore>) {
    let counting = CountingStore::new(local_store(dir));
    let repo = Repository::from_store(
        counting.clone(),
        format!("file://{}", dir.display()),
        test_options(),
    );
    (repo, counting)
}

/// Writes point `id` holding only the Postgres dump `part`.
pub async fn write_pg_point(repo: &Repository, id: &PointId, part: &PgBackupPart) -> Point {
    repo.write_point(NewPoint {
        id: id.clone(),
        postgres: Some(part.clone()),
        objects: None,
        secrets: vec![],
    })
    .await
    .expect("point")
}

/// Options to restore into database `db` of `cluster`, with the cluster's own tools.
pub fn pg_restore_options(cluster: &Cluster, db: &str) -> PgRestoreOptions {
    let mut restore = PgRestoreOptions::new(cluster.url(db));
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore
}

/// Deterministic, distinct content for `key` (version `v`) of `size` bytes.
pub fn content(key: &str, v: u32, size: usize) -> Bytes {
    let mut out = Vec::with_capacity(size + 32);
    let mut block = Sha256::digest(format!("{key}#{v}").as_bytes());
    while out.len() < size {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(size);
    Bytes::from(out)
}

/// Writes `count` objects `prefix/NNNNN` of `size` bytes.
pub async fn fill(store: &Arc<dyn ObjectStore>, prefix: &str, count: usize, size: usize) {
    futures::stream::iter(0..count)
        .map(|i| {
            let key = format!("{prefix}/{i:05}");
            let store = store.clone();
            async move {
                store
                    .put(&Path::from(key.as_str()), content(&key, 0, size).into())
                    .await
                    .expect("fill object");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// Every object of a store: key → sha256 of body.
pub async fn digest_store(
    store: &Arc<dyn ObjectStore>,
) -> std::collections::BTreeMap<String, String> {
    let metas: Vec<ObjectMeta> = store.list(None).try_collect().await.expect("list");
    let mut out = std::collections::BTreeMap::new();
    for meta in metas {
        let body = store
            .get(&meta.location)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        out.insert(
            meta.location.to_string(),
            hex::encode(Sha256::digest(&body)),
        );
    }
    out
}

/// Every file under a directory, relative.
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Flips one byte in the middle of a file.
pub fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).expect("read file to damage");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x5a;
    std::fs::write(path, bytes).expect("write damaged file");
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A moto S3 server on a free loopback port, stopped on drop. Its request log (one line per
/// HTTP request) lets tests count requests by method and path.
pub struct Moto {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto, or returns `None` (after saying why) when `moto_server` is not installed.
    pub fn start() -> Option<Moto> {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("moto_server").is_file()))
            .unwrap_or(false);
        if !found {
            assert!(
                std::env::var_os("ROLLCALL_REQUIRE_EMULATORS")
                    .is_none_or(|v| v.is_empty() || v == "0"),
                "moto_server is not installed (pip install 'moto[server]') and \
                 ROLLCALL_REQUIRE_EMULATORS is set"
            );
            eprintln!(
                "SKIPPED: moto_server is not installed (pip install 'moto[server]'); \
                 the S3 tests did not run"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("moto.log");
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).expect("connect");
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "create bucket: {answer}"
        );
    }

    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_bucket_name(bucket)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .with_virtual_hosted_style_request(false)
                .build()
                .expect("s3 store"),
        )
    }

    /// Requests logged so far as (method, path) pairs.
    pub fn requests(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let quoted = line.split('"').nth(1)?;
                let mut parts = quoted.split_whitespace();
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            })
            .collect()
    }

    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(m, p)| m == method && p.starts_with(path_prefix))
            .count()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
