//! The versions of an S3 bucket's objects: whether the bucket keeps them (GetBucketVersioning),
//! every version of the keys under a prefix (ListObjectVersions, which object_store does not
//! offer: requests signed with its `AwsAuthorizer`), and the pure choice of the version a key
//! had at a time. [`crate::objects_at`] restores a prefix to a time from them.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::HttpRequestBody;
use serde::{Deserialize, Serialize};

use crate::redact::redact_url;
use crate::store::{HttpStatus, RetryPolicy, S3Options, retry};

/// Keys per ListObjectVersions page by default (S3's own maximum).
const PAGE: u32 = 1000;

/// One version of a key, or a delete marker, as ListObjectVersions reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectVersion {
    pub key: String,
    pub version_id: String,
    pub last_modified: DateTime<Utc>,
    /// Whether this is the key's current version (or current delete marker).
    pub is_latest: bool,
    /// A delete marker: the key did not exist from this version on.
    pub delete_marker: bool,
    /// Without the quotes S3 puts around it; none for a delete marker.
    pub etag: Option<String>,
    pub size: u64,
}

/// A bucket's versioning state (GetBucketVersioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Versioning {
    /// Every write adds a version: a prefix can be brought back to any time since.
    Enabled,
    /// Was enabled once; a write now replaces the `null` version, so it is not kept.
    Suspended,
    /// Never enabled.
    Off,
}

/// One page of ListObjectVersions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionPage {
    pub versions: Vec<ObjectVersion>,
    /// Where the next page starts (`key-marker`, `version-id-marker`), when truncated.
    pub next: Option<(String, Option<String>)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListVersionsResultXml {
    #[serde(default)]
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_version_id_marker: Option<String>,
    #[serde(default, rename = "Version")]
    versions: Vec<VersionXml>,
    #[serde(default, rename = "DeleteMarker")]
    delete_markers: Vec<VersionXml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersionXml {
    key: String,
    version_id: String,
    #[serde(default)]
    is_latest: bool,
    last_modified: String,
    #[serde(rename = "ETag")]
    etag: Option<String>,
    #[serde(default)]
    size: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersioningXml {
    status: Option<String>,
}

/// Parses a ListObjectVersions answer. Versions and delete markers come back in the order S3
/// lists them: by key, and newest first within a key.
pub(crate) fn parse_versions_page(xml: &str) -> Result<VersionPage> {
    let parsed: ListVersionsResultXml = quick_xml::de::from_str(xml)
        .context("parse the ListObjectVersions answer (ListVersionsResult XML)")?;
    let mut versions = Vec::with_capacity(parsed.versions.len() + parsed.delete_markers.len());
    for (list, delete_marker) in [(parsed.versions, false), (parsed.delete_markers, true)] {
        for v in list {
            let last_modified = DateTime::parse_from_rfc3339(&v.last_modified)
                .with_context(|| {
                    format!(
                        "parse LastModified {:?} of version {} of key {:?}",
                        v.last_modified, v.version_id, v.key
                    )
                })?
                .with_timezone(&Utc);
            versions.push(ObjectVersion {
                key: v.key,
                version_id: v.version_id,
                last_modified,
                is_latest: v.is_latest,
                delete_marker,
                etag: (!delete_marker)
                    .then(|| v.etag.map(|e| unquote(&e).to_owned()))
                    .flatten(),
                size: v.size,
            });
        }
    }
    // Delete markers were parsed apart from the versions, and not every server interleaves
    // them (moto lists all versions, then all delete markers): order each key's history
    // newest first by LastModified, the current one first, and two writes in one second (its
    // resolution) as the answer lists them.
    let order = document_order(xml)?;
    let position = |v: &ObjectVersion| {
        order
            .get(&(v.key.clone(), v.version_id.clone()))
            .copied()
            .unwrap_or(usize::MAX)
    };
    versions.sort_by(|a, b| {
        a.key
            .cmp(&b.key)
            .then_with(|| b.is_latest.cmp(&a.is_latest))
            .then_with(|| b.last_modified.cmp(&a.last_modified))
            .then_with(|| position(a).cmp(&position(b)))
    });
    let next = if parsed.is_truncated {
        let Some(key) = parsed.next_key_marker.filter(|k| !k.is_empty()) else {
            bail!("the ListObjectVersions answer is truncated but names no NextKeyMarker");
        };
        Some((key, parsed.next_version_id_marker.filter(|v| !v.is_empty())))
    } else {
        None
    };
    Ok(VersionPage { versions, next })
}

/// The position of each (key, version id) in the answer, Version and DeleteMarker elements
/// alike.
fn document_order(xml: &str) -> Result<std::collections::HashMap<(String, String), usize>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut order = std::collections::HashMap::new();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let (mut key, mut id) = (String::new(), String::new());
    loop {
        let event = reader
            .read_event()
            .context("read the ListObjectVersions answer (ListVersionsResult XML)")?;
        match event {
            Event::Start(e) => path.push(e.name().as_ref().to_vec()),
            Event::End(e) => {
                let name = e.name().as_ref().to_vec();
                if path.len() == 2 && (name == b"Version" || name == b"DeleteMarker") {
                    let at = order.len();
                    order.insert((std::mem::take(&mut key), std::mem::take(&mut id)), at);
                }
                path.pop();
            }
            Event::Text(t) if path.len() == 3 => {
                let text = t.decode().context("decode the ListObjectVersions answer")?;
                append_text(&mut key, &mut id, &path[2], &text);
            }
            Event::GeneralRef(r) if path.len() == 3 => {
                let text = match r.resolve_char_ref().context("read a character reference")? {
                    Some(c) => c.to_string(),
                    None => match r.decode().context("decode an entity")?.as_ref() {
                        "amp" => "&".to_owned(),
                        "lt" => "<".to_owned(),
                        "gt" => ">".to_owned(),
                        "quot" => "\"".to_owned(),
                        "apos" => "'".to_owned(),
                        other => bail!("unknown entity &{other}; in the ListObjectVersions answer"),
                    },
                };
                append_text(&mut key, &mut id, &path[2], &text);
            }
            Event::CData(c) if path.len() == 3 => {
                let text = c.decode().context("decode the ListObjectVersions answer")?;
                append_text(&mut key, &mut id, &path[2], &text);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(order)
}

fn append_text(key: &mut String, id: &mut String, element: &[u8], text: &str) {
    match element {
        b"Key" => key.push_str(text),
        b"VersionId" => id.push_str(text),
        _ => {}
    }
}

/// Parses a GetBucketVersioning answer.
pub(crate) fn parse_versioning(xml: &str) -> Result<Versioning> {
    let parsed: VersioningXml = quick_xml::de::from_str(xml)
        .context("parse the GetBucketVersioning answer (VersioningConfiguration XML)")?;
    Ok(match parsed.status.as_deref().map(str::trim) {
        Some("Enabled") => Versioning::Enabled,
        Some("Suspended") => Versioning::Suspended,
        None | Some("") => Versioning::Off,
        Some(other) => {
            bail!("the bucket's versioning status is {other:?}, which rollcall does not know")
        }
    })
}

pub(crate) fn unquote(etag: &str) -> &str {
    etag.trim().trim_matches('"')
}

/// The version `history` (one key's versions, newest first as S3 lists them) had at `at`: the
/// newest whose LastModified is at or before `at`. `None`: the key did not exist yet. A delete
/// marker: it had been deleted.
#[cfg(test)]
pub(crate) fn version_at(history: &[ObjectVersion], at: DateTime<Utc>) -> Option<&ObjectVersion> {
    history.iter().find(|v| v.last_modified <= at)
}

/// Whether `stamp` (a LastModified: S3 keeps whole seconds) falls in `at`'s own second, so the
/// change it stamps may have been made just after `at`.
pub(crate) fn in_second_of(stamp: DateTime<Utc>, at: DateTime<Utc>) -> bool {
    stamp.timestamp() == at.timestamp()
}

/// The version to restore for `at`: the newest at or before it, except that a delete marker stamped in
/// `at`'s own second is passed over for what came before it. The delete may have happened just
/// after `at`, and a row committed at `at` must not name an object the restore removed; an
/// object kept that was deleted a moment before `at` is only an extra. Keys with any version
/// in that second are reported as ambiguous ([`ambiguous_at`]).
pub(crate) fn version_to_restore(
    history: &[ObjectVersion],
    at: DateTime<Utc>,
) -> Option<&ObjectVersion> {
    history
        .iter()
        .filter(|v| v.last_modified <= at)
        .find(|v| !(v.delete_marker && in_second_of(v.last_modified, at)))
}

/// Whether one of the key's versions is stamped in `at`'s own second: what it held at `at`
/// cannot be told apart from what it held a moment later.
pub(crate) fn ambiguous_at(history: &[ObjectVersion], at: DateTime<Utc>) -> bool {
    history.iter().any(|v| in_second_of(v.last_modified, at))
}

/// The key's current version or delete marker (`None`: no version at all).
pub(crate) fn current(history: &[ObjectVersion]) -> Option<&ObjectVersion> {
    history.iter().find(|v| v.is_latest).or(history.first())
}

/// Groups a listing by key; each key's versions keep the listing's order (newest first).
pub(crate) fn by_key(versions: Vec<ObjectVersion>) -> BTreeMap<String, Vec<ObjectVersion>> {
    let mut keys: BTreeMap<String, Vec<ObjectVersion>> = BTreeMap::new();
    for v in versions {
        keys.entry(v.key.clone()).or_default().push(v);
    }
    keys
}

/// Percent-encodes a query value as SigV4 canonicalises it (everything but unreserved
/// characters), so the request carries exactly what was signed.
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An S3 bucket reached with the same settings as `store_from_url`: the object store for
/// objects, plus signed requests of our own for versions.
pub struct VersionedBucket {
    pub(crate) bucket: String,
    /// `endpoint/bucket` (path style) or the bucket's own host, without a trailing slash.
    endpoint: String,
    region: String,
    pub(crate) store: std::sync::Arc<AmazonS3>,
    http: reqwest::Client,
    /// The prefix inside the bucket (no leading or trailing slash; empty: the whole bucket).
    pub(crate) prefix: String,
    /// The store as messages name it (no credentials).
    pub(crate) label: String,
    retry: RetryPolicy,
    /// Keys per ListObjectVersions page.
    pub page_size: u32,
}

impl std::fmt::Debug for VersionedBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionedBucket")
            .field("label", &self.label)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl VersionedBucket {
    /// The bucket and prefix of an `s3://bucket/prefix` URL, with `S3Options` as
    /// `store_from_url` applies them.
    pub fn open(url: &str, s3: &S3Options) -> Result<VersionedBucket> {
        let parsed =
            url::Url::parse(url).with_context(|| format!("parse store URL {}", redact_url(url)))?;
        if !matches!(parsed.scheme(), "s3" | "s3a") {
            bail!(
                "{} is not an s3:// URL: object versions are read from S3 buckets only",
                redact_url(url)
            );
        }
        let bucket = crate::store::bucket_of(&parsed, url)?;
        let builder = crate::store::s3_builder(&bucket, s3)?;
        VersionedBucket::from_builder(builder, parsed.path(), &redact_url(url))
    }

    /// A bucket from a configured builder (its bucket name set), restoring keys under `prefix`.
    pub fn from_builder(
        builder: AmazonS3Builder,
        prefix: &str,
        label: &str,
    ) -> Result<VersionedBucket> {
        crate::store::install_crypto_provider();
        let get = |key| builder.get_config_value(&key);
        let Some(bucket) = get(AmazonS3ConfigKey::Bucket) else {
            bail!("no bucket configured for {label}");
        };
        let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".to_owned());
        let virtual_hosted = get(AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // As object_store places the bucket (AWS_ENDPOINT_URL_S3 first): an endpoint given
        // with virtual-hosted requests already names the bucket.
        let endpoint = get(AmazonS3ConfigKey::S3Endpoint).or(get(AmazonS3ConfigKey::Endpoint));
        let endpoint = match (endpoint, virtual_hosted) {
            (Some(endpoint), true) => endpoint.trim_end_matches('/').to_owned(),
            (Some(endpoint), false) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let allow_http = get(AmazonS3ConfigKey::Client(
            object_store::ClientConfigKey::AllowHttp,
        ))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if endpoint.starts_with("http://") && !allow_http {
            bail!("{label}: the endpoint {endpoint} is plain HTTP, which is not allowed");
        }
        let store = builder
            .build()
            .with_context(|| format!("configure S3 store for {label}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .context("build the HTTP client for S3 version requests")?;
        Ok(VersionedBucket {
            bucket,
            endpoint,
            region,
            store: std::sync::Arc::new(store),
            http,
            prefix: prefix.trim_matches('/').to_owned(),
            label: label.to_owned(),
            retry: RetryPolicy::default(),
            page_size: PAGE,
        })
    }

    /// One signed GET on the bucket with `query` (already encoded); the answer's body.
    async fn get_bucket(&self, query: &str, what: &str) -> Result<String> {
        let url = format!("{}/?{query}", self.endpoint);
        retry(&self.retry, what, || async {
            let credential =
                object_store::CredentialProvider::get_credential(self.store.credentials().as_ref())
                    .await
                    .with_context(|| format!("get credentials for {}", self.label))?;
            let mut request = http::Request::builder()
                .method(http::Method::GET)
                .uri(&url)
                .body(HttpRequestBody::empty())
                .with_context(|| format!("build the request {what}"))?;
            AwsAuthorizer::new(&credential, "s3", &self.region)
                .try_authorize(&mut request, None)
                .with_context(|| format!("sign the request {what}"))?;
            let mut call = self.http.get(&url);
            for (name, value) in request.headers() {
                call = call.header(name, value);
            }
            let answer = call.send().await.with_context(|| format!("{what}: send"))?;
            let status = answer.status();
            let body = answer
                .text()
                .await
                .with_context(|| format!("{what}: read the answer"))?;
            if !status.is_success() {
                let short: String = body.chars().take(400).collect();
                return Err(anyhow::Error::new(HttpStatus(status.as_u16()))
                    .context(format!("{what}: {short}")));
            }
            Ok(body)
        })
        .await
        .with_context(|| format!("{what} ({})", self.label))
    }

    /// The bucket's versioning state.
    pub async fn versioning(&self) -> Result<Versioning> {
        let body = self
            .get_bucket(
                "versioning=",
                "read the bucket's versioning (GetBucketVersioning)",
            )
            .await?;
        parse_versioning(&body)
    }

    /// Refuses a bucket that does not keep every version, naming it and what to do.
    pub async fn require_versioning(&self) -> Result<()> {
        match self.versioning().await? {
            Versioning::Enabled => Ok(()),
            state => Err(self.refusal(state)),
        }
    }

    /// Why a bucket in `state` cannot be restored to a time from its versions, and what to do.
    pub fn refusal(&self, state: Versioning) -> anyhow::Error {
        anyhow::anyhow!(
            "bucket {} has versioning {}: a restore to a time needs every version kept. \
             Enable it (aws s3api put-bucket-versioning --bucket {} \
             --versioning-configuration Status=Enabled; restores can then reach any time \
             after that), or restore from the repository's snapshots (--repo URL)",
            self.bucket,
            match state {
                Versioning::Enabled => "enabled",
                Versioning::Suspended => "suspended",
                Versioning::Off => "never enabled",
            },
            self.bucket
        )
    }

    /// Every version and delete marker of the keys under the prefix, page by page.
    pub async fn list_versions(&self) -> Result<Vec<ObjectVersion>> {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut all = Vec::new();
        let mut marker: Option<(String, Option<String>)> = None;
        loop {
            let mut query = format!(
                "versions=&max-keys={}&prefix={}",
                self.page_size.max(1),
                encode_query(&prefix)
            );
            if let Some((key, version)) = &marker {
                query.push_str(&format!("&key-marker={}", encode_query(key)));
                if let Some(version) = version {
                    query.push_str(&format!("&version-id-marker={}", encode_query(version)));
                }
            }
            let body = self
                .get_bucket(&query, "list object versions (ListObjectVersions)")
                .await?;
            let page = parse_versions_page(&body)?;
            all.extend(page.versions);
            match page.next {
                Some(next) if Some(&next) == marker.as_ref() => bail!(
                    "listing the versions of {} did not advance past key {:?}: the server's \
                     pagination is broken",
                    self.label,
                    next.0
                ),
                Some(next) => marker = Some(next),
                None => break,
            }
        }
        // Pages split one key's history at most between two pages, in order; grouping by key
        // keeps it newest first.
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    const PAGE_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>live</Name><Prefix>app/</Prefix><KeyMarker></KeyMarker><VersionIdMarker></VersionIdMarker>
  <NextKeyMarker>app/b &amp; c &lt;1&gt;.txt</NextKeyMarker>
  <NextVersionIdMarker>v-b1</NextVersionIdMarker>
  <MaxKeys>3</MaxKeys><IsTruncated>true</IsTruncated>
  <Version><Key>app/a.txt</Key><VersionId>v-a2</VersionId><IsLatest>true</IsLatest>
    <LastModified>2026-12-06T10:00:05.000Z</LastModified><ETag>"e-a2"</ETag><Size>12</Size>
    <StorageClass>STANDARD</StorageClass></Version>
  <DeleteMarker><Key>app/b &amp; c &lt;1&gt;.txt</Key><VersionId>v-b2</VersionId>
    <IsLatest>true</IsLatest><LastModified>2026-12-06T10:00:06.000Z</LastModified>
    <Owner><ID>x</ID></Owner></DeleteMarker>
  <Version><Key>app/a.txt</Key><VersionId>v-a1</VersionId><IsLatest>false</IsLatest>
    <LastModified>2026-12-06T10:00:01.000Z</LastModified><ETag>&quot;e-a1&quot;</ETag><Size>5</Size></Version>
  <Version><Key>app/b &amp; c &lt;1&gt;.txt</Key><VersionId>v-b1</VersionId><IsLatest>false</IsLatest>
    <LastModified>2026-12-06T10:00:01.000Z</LastModified><ETag>"e-b1"</ETag><Size>7</Size></Version>
</ListVersionsResult>"#;

    #[test]
    fn parses_versions_delete_markers_and_markers() {
        let page = parse_versions_page(PAGE_XML).expect("parse");
        let b = "app/b & c <1>.txt";
        assert_eq!(
            page.next,
            Some((b.to_owned(), Some("v-b1".to_owned()))),
            "escaped NextKeyMarker is unescaped"
        );
        let seen: Vec<(&str, &str, bool, Option<&str>, u64)> = page
            .versions
            .iter()
            .map(|v| {
                (
                    v.key.as_str(),
                    v.version_id.as_str(),
                    v.delete_marker,
                    v.etag.as_deref(),
                    v.size,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("app/a.txt", "v-a2", false, Some("e-a2"), 12),
                ("app/a.txt", "v-a1", false, Some("e-a1"), 5),
                (b, "v-b2", true, None, 0),
                (b, "v-b1", false, Some("e-b1"), 7),
            ]
        );
        assert!(page.versions[0].is_latest && !page.versions[1].is_latest);
        assert_eq!(page.versions[1].last_modified, at("2026-12-06T10:00:01Z"));
    }

    #[test]
    fn orders_delete_markers_listed_after_all_versions() {
        // moto's order: every version, then every delete marker.
        let xml = r#"<ListVersionsResult><IsTruncated>false</IsTruncated>
            <Version><Key>k</Key><VersionId>v3</VersionId><IsLatest>true</IsLatest>
            <LastModified>2026-12-06T10:00:07Z</LastModified><ETag>"e"</ETag><Size>1</Size></Version>
            <Version><Key>k</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest>
            <LastModified>2026-12-06T10:00:01Z</LastModified><ETag>"e"</ETag><Size>1</Size></Version>
            <DeleteMarker><Key>k</Key><VersionId>d2</VersionId><IsLatest>false</IsLatest>
            <LastModified>2026-12-06T10:00:02Z</LastModified></DeleteMarker>
            </ListVersionsResult>"#;
        let page = parse_versions_page(xml).expect("parse");
        let ids: Vec<&str> = page
            .versions
            .iter()
            .map(|v| v.version_id.as_str())
            .collect();
        assert_eq!(ids, ["v3", "d2", "v1"]);
        let chosen = version_at(&page.versions, at("2026-12-06T10:00:03Z")).expect("chosen");
        assert!(chosen.delete_marker, "deleted at that time");
    }

    #[test]
    fn parses_last_page_and_empty_listing() {
        let xml = r#"<ListVersionsResult><Name>live</Name><IsTruncated>false</IsTruncated>
            <Version><Key>k</Key><VersionId>null</VersionId><IsLatest>true</IsLatest>
            <LastModified>2026-12-06T10:00:01Z</LastModified><ETag>"abc-2"</ETag><Size>1</Size></Version>
            </ListVersionsResult>"#;
        let page = parse_versions_page(xml).expect("parse");
        assert_eq!(page.next, None);
        assert_eq!(page.versions.len(), 1);
        assert_eq!(page.versions[0].etag.as_deref(), Some("abc-2"));
        let empty = parse_versions_page(
            "<ListVersionsResult><IsTruncated>false</IsTruncated></ListVersionsResult>",
        )
        .expect("parse empty");
        assert!(empty.versions.is_empty() && empty.next.is_none());
        let err = parse_versions_page(
            "<ListVersionsResult><IsTruncated>true</IsTruncated></ListVersionsResult>",
        )
        .expect_err("truncated without a marker");
        assert!(err.to_string().contains("NextKeyMarker"), "{err}");
        let err =
            parse_versions_page("<Error><Code>AccessDenied</Code>").expect_err("not a listing");
        assert!(format!("{err:#}").contains("ListObjectVersions"), "{err:#}");
    }

    #[test]
    fn parses_versioning_states() {
        let xml = |body: &str| {
            format!(
                r#"<?xml version="1.0"?><VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{body}</VersioningConfiguration>"#
            )
        };
        assert_eq!(
            parse_versioning(&xml("<Status>Enabled</Status>")).expect("enabled"),
            Versioning::Enabled
        );
        assert_eq!(
            parse_versioning(&xml("<Status>Suspended</Status>")).expect("suspended"),
            Versioning::Suspended
        );
        assert_eq!(parse_versioning(&xml("")).expect("off"), Versioning::Off);
        assert_eq!(
            parse_versioning("<VersioningConfiguration/>").expect("off"),
            Versioning::Off
        );
        assert!(parse_versioning(&xml("<Status>Maybe</Status>")).is_err());
    }

    fn version(id: &str, time: &str, latest: bool, delete_marker: bool) -> ObjectVersion {
        ObjectVersion {
            key: "k".into(),
            version_id: id.into(),
            last_modified: at(time),
            is_latest: latest,
            delete_marker,
            etag: (!delete_marker).then(|| format!("e-{id}")),
            size: 1,
        }
    }

    #[test]
    fn chooses_the_newest_version_at_or_before_the_time() {
        // Newest first, as S3 lists one key; v2 and v1b share a second (S3's resolution).
        let history = vec![
            version("v3", "2026-12-06T10:00:09Z", true, false),
            version("d1", "2026-12-06T10:00:06Z", false, true),
            version("v2", "2026-12-06T10:00:03Z", false, false),
            version("v1b", "2026-12-06T10:00:03Z", false, false),
            version("v1", "2026-12-06T10:00:01Z", false, false),
        ];
        let chosen = |time: &str| version_at(&history, at(time)).map(|v| v.version_id.as_str());
        assert_eq!(
            chosen("2026-12-06T10:00:00Z"),
            None,
            "before the first version"
        );
        assert_eq!(
            chosen("2026-12-06T10:00:01Z"),
            Some("v1"),
            "at exactly LastModified"
        );
        assert_eq!(chosen("2026-12-06T10:00:02.5Z"), Some("v1"));
        assert_eq!(
            chosen("2026-12-06T10:00:03Z"),
            Some("v2"),
            "same second: the one S3 lists first is newer"
        );
        assert_eq!(chosen("2026-12-06T10:00:07Z"), Some("d1"), "deleted at T");
        assert_eq!(chosen("2026-12-06T11:00:00Z"), Some("v3"));
        assert_eq!(current(&history).map(|v| v.version_id.as_str()), Some("v3"));
    }

    #[test]
    fn encodes_query_values_as_sigv4_does() {
        assert_eq!(encode_query("app/a b+é~.txt"), "app%2Fa%20b%2B%C3%A9~.txt");
    }
}
