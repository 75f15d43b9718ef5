//! The object store of an encrypted repository: every object put through it is sealed
//! (`cipher`'s framing, the object's name as associated data), every object read through it is
//! opened as it streams, and sizes in listings and heads are plaintext sizes, so the rest of the
//! repository code reads and writes as it does in a plaintext repository.
//!
//! Names that objects are moved between must share their associated data: a blob's body is
//! uploaded under `objects/staging/` before its hash is known and renamed into
//! `objects/blobs/`, so both prefixes seal under one class name; every blob's content is
//! checked against its hash wherever it is read. Any other copy or rename is refused. Range
//! reads are refused (no repository code makes them).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

use crate::cipher::{CONFIG_KEY, DataKey, OpenError, Opener, Sealer, plain_size};
use crate::layout::{BLOBS, STAGING};

const STORE: &str = "rollcall-encryption";
/// Ciphertext gathered before it is sent as one part; S3 wants 5 MiB but for the last.
const PART_MIN: usize = 5 << 20;

/// An encrypting view of a repository's store.
#[derive(Debug)]
pub(crate) struct SealedStore {
    inner: Arc<dyn ObjectStore>,
    key: Arc<DataKey>,
    /// The repository, for error messages.
    label: Arc<str>,
}

impl std::fmt::Display for SealedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encrypted({})", self.inner)
    }
}

/// The associated data an object is sealed under: its name, or one class name for blobs and
/// their staging uploads.
fn aad_of(location: &Path) -> Vec<u8> {
    let name = location.as_ref();
    let under = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
    };
    if under(BLOBS) || under(STAGING) {
        BLOBS.as_bytes().to_vec()
    } else {
        name.as_bytes().to_vec()
    }
}

fn is_config(location: &Path) -> bool {
    location.as_ref() == CONFIG_KEY
}

fn refused(what: String) -> object_store::Error {
    object_store::Error::NotSupported {
        source: what.into(),
    }
}

impl SealedStore {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, key: Arc<DataKey>, label: Arc<str>) -> Self {
        SealedStore { inner, key, label }
    }

    fn chunk(&self) -> u64 {
        self.key.chunk_size() as u64
    }

    fn plain_meta(&self, meta: ObjectMeta) -> ObjectMeta {
        plain_meta(meta, self.chunk())
    }

    fn seal_error(&self, location: &Path, e: anyhow::Error) -> object_store::Error {
        object_store::Error::Generic {
            store: STORE,
            source: format!("seal {location} for repository {}: {e:#}", self.label).into(),
        }
    }

    fn sealer(&self, location: &Path) -> object_store::Result<(Sealer, Vec<u8>)> {
        if is_config(location) {
            return Err(refused(format!(
                "{CONFIG_KEY} is written only by `rollcall repo init` and `repo key rotate`"
            )));
        }
        self.key
            .sealer(aad_of(location))
            .map_err(|e| self.seal_error(location, e))
    }
}

#[async_trait]
impl ObjectStore for SealedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let (mut sealer, mut out) = self.sealer(location)?;
        out.reserve(payload.content_length() + 64);
        for piece in &payload {
            sealer
                .push(piece, &mut out)
                .map_err(|e| self.seal_error(location, e))?;
        }
        sealer
            .finish(&mut out)
            .map_err(|e| self.seal_error(location, e))?;
        self.inner
            .put_opts(location, PutPayload::from(out), opts)
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let (sealer, out) = self.sealer(location)?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(SealedUpload {
            inner,
            sealer: Some(sealer),
            out,
            location: location.clone(),
            label: self.label.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if is_config(location) {
            return self.inner.get_opts(location, options).await;
        }
        if options.range.is_some() {
            return Err(refused(format!(
                "a range read of {location}: objects of encrypted repository {} are read whole",
                self.label
            )));
        }
        let got = self.inner.get_opts(location, options).await?;
        let meta = self.plain_meta(got.meta.clone());
        let size = meta.size;
        let attributes = got.attributes.clone();
        let extensions = got.extensions.clone();
        let payload = GetResultPayload::Stream(open_stream(
            crate::body::body_stream(got),
            self.key.opener(aad_of(location)),
            location.clone(),
            self.label.clone(),
        ));
        Ok(GetResult {
            payload,
            meta,
            range: Range {
                start: 0,
                end: size,
            },
            attributes,
            extensions,
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let chunk = self.chunk();
        self.inner
            .list(prefix)
            .map(move |meta| meta.map(|m| plain_meta(m, chunk)))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let chunk = self.chunk();
        self.inner
            .list_with_offset(prefix, offset)
            .map(move |meta| meta.map(|m| plain_meta(m, chunk)))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        listed.objects = listed
            .objects
            .into_iter()
            .map(|m| self.plain_meta(m))
            .collect();
        Ok(listed)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        if is_config(to) || aad_of(from) != aad_of(to) {
            return Err(refused(format!(
                "copying {from} to {to} in encrypted repository {}: an object opens only under \
                 its own name",
                self.label
            )));
        }
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        if is_config(to) || aad_of(from) != aad_of(to) {
            return Err(refused(format!(
                "renaming {from} to {to} in encrypted repository {}: an object opens only under \
                 its own name",
                self.label
            )));
        }
        self.inner.rename_opts(from, to, options).await
    }
}

/// A listed or read object's metadata with its plaintext size. A size no object seals to (cut
/// or grown) is left as stored: it differs from what the repository recorded, and reading the
/// object fails naming it.
fn plain_meta(mut meta: ObjectMeta, chunk: u64) -> ObjectMeta {
    if !is_config(&meta.location)
        && let Some(size) = plain_size(meta.size, chunk)
    {
        meta.size = size;
    }
    meta
}

/// An object of an encrypted repository that does not open with the data key: a byte was
/// changed, it was cut short or grown, or it is stored under another object's name. It travels
/// inside `object_store::Error::Generic`; [`broken_seal`] finds it so readers report the object
/// as damaged (`RepoError::Damaged`) rather than failing as if the store had.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "object {location} of encrypted repository {repo} does not open: {reason}; it was modified \
     or damaged after it was written: do not restore from it"
)]
pub(crate) struct BrokenSeal {
    pub(crate) location: String,
    pub(crate) repo: String,
    pub(crate) reason: OpenError,
}

/// The [`BrokenSeal`] an error carries, however it was wrapped on the way (anyhow context,
/// `object_store::Error`, `std::io::Error` from a stream reader).
pub(crate) fn broken_seal(e: &anyhow::Error) -> Option<&BrokenSeal> {
    e.chain().find_map(|cause| {
        cause.downcast_ref::<BrokenSeal>().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<BrokenSeal>())
        })
    })
}

/// The plaintext of a sealed body, chunk by chunk; an error names the object.
fn open_stream(
    body: BoxStream<'static, object_store::Result<Bytes>>,
    opener: Opener,
    location: Path,
    label: Arc<str>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let fail = move |reason: OpenError| object_store::Error::Generic {
        store: STORE,
        source: Box::new(BrokenSeal {
            location: location.to_string(),
            repo: label.to_string(),
            reason,
        }),
    };
    futures::stream::unfold(
        (Some(body), Some(opener), fail),
        |(body, opener, fail)| async move {
            let (mut body, mut opener) = match (body, opener) {
                (Some(b), Some(o)) => (b, o),
                _ => return None,
            };
            let mut out = Vec::new();
            loop {
                match body.next().await {
                    Some(Ok(bytes)) => {
                        if let Err(e) = opener.push(&bytes, &mut out) {
                            return Some((Err(fail(e)), (None, None, fail)));
                        }
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), (Some(body), Some(opener), fail)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (None, None, fail))),
                    None => {
                        return match opener.finish(&mut out) {
                            Ok(()) => Some((Ok(Bytes::from(out)), (None, None, fail))),
                            Err(e) => Some((Err(fail(e)), (None, None, fail))),
                        };
                    }
                }
            }
        },
    )
    .boxed()
}

/// A multipart upload that seals as it goes and sends ciphertext in parts of at least
/// [`PART_MIN`] bytes (but the last).
#[derive(Debug)]
struct SealedUpload {
    inner: Box<dyn MultipartUpload>,
    sealer: Option<Sealer>,
    out: Vec<u8>,
    location: Path,
    label: Arc<str>,
}

impl SealedUpload {
    fn failed(&self, e: anyhow::Error) -> UploadPart {
        let err = object_store::Error::Generic {
            store: STORE,
            source: format!(
                "seal {} for repository {}: {e:#}",
                self.location, self.label
            )
            .into(),
        };
        Box::pin(async move { Err(err) })
    }
}

#[async_trait]
impl MultipartUpload for SealedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let Some(sealer) = self.sealer.as_mut() else {
            return self.failed(anyhow::anyhow!("the upload is already complete"));
        };
        for piece in &data {
            if let Err(e) = sealer.push(piece, &mut self.out) {
                return self.failed(e);
            }
        }
        if self.out.len() < PART_MIN {
            return Box::pin(async { Ok(()) });
        }
        let part = std::mem::replace(&mut self.out, Vec::with_capacity(PART_MIN * 2));
        self.inner.put_part(PutPayload::from(part))
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let Some(sealer) = self.sealer.take() else {
            return Err(object_store::Error::Generic {
                store: STORE,
                source: format!("the upload of {} was already completed", self.location).into(),
            });
        };
        let mut last = std::mem::take(&mut self.out);
        if let Err(e) = sealer.finish(&mut last) {
            return Err(object_store::Error::Generic {
                store: STORE,
                source: format!("seal {}: {e:#}", self.location).into(),
            });
        }
        self.inner.put_part(PutPayload::from(last)).await?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutMode, WriteMultipart};

    const CHUNK: usize = 1024;

    fn stores() -> (Arc<dyn ObjectStore>, SealedStore) {
        let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let sealed = SealedStore::new(raw.clone(), DataKey::for_tests(CHUNK), "memory://t".into());
        (raw, sealed)
    }

    #[tokio::test]
    async fn puts_are_sealed_and_reads_sizes_and_listings_are_plaintext() {
        let (raw, sealed) = stores();
        let body: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i % 256) as u8).collect();
        let key = Path::from("points/p.json");
        sealed
            .put(&key, PutPayload::from(body.clone()))
            .await
            .expect("put");
        let stored = raw
            .get(&key)
            .await
            .expect("raw")
            .bytes()
            .await
            .expect("raw");
        assert!(stored.starts_with(b"RCE1"));
        assert!(
            !stored.windows(64).any(|w| w == &body[..64]),
            "plaintext stored"
        );
        assert_eq!(
            sealed.head(&key).await.expect("head").size,
            body.len() as u64
        );
        let listed: Vec<ObjectMeta> = futures::TryStreamExt::try_collect(sealed.list(None))
            .await
            .expect("list");
        assert_eq!(listed[0].size, body.len() as u64);
        let got = sealed.get(&key).await.expect("get");
        assert_eq!(got.meta.size, body.len() as u64);
        assert_eq!(got.bytes().await.expect("bytes").as_ref(), &body[..]);

        // Create-only keeps its meaning.
        let again = sealed
            .put_opts(&key, PutPayload::from_static(b"x"), PutMode::Create.into())
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "{again:?}"
        );
        // Range reads, moves to another name and writes of the config object are refused.
        assert!(sealed.get_range(&key, 0..10).await.is_err());
        assert!(
            sealed
                .copy(&key, &Path::from("points/q.json"))
                .await
                .is_err()
        );
        assert!(
            sealed
                .put(&Path::from(CONFIG_KEY), PutPayload::from_static(b"{}"))
                .await
                .is_err()
        );

        // A body stored under another name does not open there.
        raw.put(&Path::from("points/q.json"), PutPayload::from(stored))
            .await
            .expect("raw put");
        let moved = sealed.get(&Path::from("points/q.json")).await.expect("get");
        let err = moved.bytes().await.expect_err("another name");
        assert!(err.to_string().contains("points/q.json"), "{err}");
        assert!(err.to_string().contains("memory://t"), "{err}");
    }

    #[tokio::test]
    async fn multipart_uploads_send_large_parts_and_read_back_whole() {
        let (raw, sealed) = stores();
        let staged = Path::from("objects/staging/s/1");
        let upload = sealed.put_multipart(&staged).await.expect("start");
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 << 20);
        let body: Vec<u8> = (0..(12 << 20) + 3).map(|i| (i % 253) as u8).collect();
        for piece in body.chunks(777_777) {
            writer.write(piece);
        }
        writer.finish().await.expect("finish");
        // Staged then moved into blobs/: one class name, so it still opens.
        let blob = Path::from("objects/blobs/ab/abcd");
        sealed.rename(&staged, &blob).await.expect("rename");
        let stored = raw.head(&blob).await.expect("raw head").size;
        assert_eq!(
            stored,
            crate::cipher::sealed_size(body.len() as u64, CHUNK as u64)
        );
        let got = sealed.get(&blob).await.expect("get");
        assert_eq!(got.meta.size, body.len() as u64);
        assert!(got.bytes().await.expect("bytes").as_ref() == &body[..]);
    }
}
