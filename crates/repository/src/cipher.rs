//! Client-side encryption of a repository: the keys, the repository's config object that holds
//! the wrapped data key, and the chunked framing every stored object is sealed in.
//!
//! * The **key-encryption key** (KEK) is 32 random bytes the operator keeps
//!   (`ROLLCALL_REPOSITORY_KEY`, base64, or a file holding that text, or a command printing it:
//!   [`KeyVars`]). Its id is a fingerprint
//!   (the first 16 hex digits of a sha256 over a label and the key), so a wrong key is named as
//!   such instead of failing as "damaged".
//! * The **data key** is 32 random bytes drawn at `repo init --encrypt`, stored only sealed by
//!   the KEK (AES-256-GCM) in [`CONFIG_KEY`], the wrap's associated data binding the key id,
//!   the cipher and the chunk size ([`WRAP_VERSION`]). Rotating the KEK rewraps it; no data
//!   changes.
//! * Every object is sealed under its own key, HMAC-SHA256(data key, "object" ‖ 32-byte random
//!   salt): the salt opens the object (the header), so nonces never repeat across objects and
//!   a nonce is just the chunk counter and a final-chunk flag. The plaintext is cut into
//!   fixed-size chunks (1 MiB; the size is in the config), each sealed with AES-256-GCM with the
//!   object's name as associated data, so a chunk moved, dropped, reordered, cut off at the end
//!   or put under another name does not open.
//! * Blob names are HMAC-SHA256(name key, content sha256) instead of the sha256, the name key
//!   derived from the data key ([`DataKey::blob_id`]); objects quarantined in the repository
//!   are named likewise by their live key ([`DataKey::quarantine_name`]).
//!
//! ```text
//! object  = "RCE1" salt[32] chunk*            chunk = AES-256-GCM(plaintext[≤ chunk_size]) tag[16]
//! nonce   = 0[3] counter[8, big-endian] final[1]
//! ```

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The repository's config object, at its root. Written once by `repo init`; an unencrypted
/// repository made before `repo init` existed has none.
pub const CONFIG_KEY: &str = "rollcall-repository.json";

/// The key-encryption key, base64 of 32 bytes.
pub const KEY_ENV: &str = "ROLLCALL_REPOSITORY_KEY";
/// A file holding [`KEY_ENV`]'s text.
pub const KEY_FILE_ENV: &str = "ROLLCALL_REPOSITORY_KEY_FILE";
/// A command printing [`KEY_ENV`]'s text on stdout (a KMS, Vault or secret-manager CLI).
pub const KEY_COMMAND_ENV: &str = "ROLLCALL_REPOSITORY_KEY_COMMAND";
/// The new key of `repo key rotate`.
pub const NEW_KEY_ENV: &str = "ROLLCALL_REPOSITORY_NEW_KEY";
/// A file holding [`NEW_KEY_ENV`]'s text.
pub const NEW_KEY_FILE_ENV: &str = "ROLLCALL_REPOSITORY_NEW_KEY_FILE";
/// A command printing [`NEW_KEY_ENV`]'s text.
pub const NEW_KEY_COMMAND_ENV: &str = "ROLLCALL_REPOSITORY_NEW_KEY_COMMAND";

/// The environment variables one key may come from, in order of precedence: the first one set
/// (and not empty) is used, the others are not looked at.
#[derive(Debug, Clone, Copy)]
pub struct KeyVars {
    /// The key's text.
    pub value: &'static str,
    /// A file holding it.
    pub file: &'static str,
    /// A command printing it: the program and its arguments split at whitespace, run without
    /// a shell (no quoting, no expansion; point it at a script for anything more).
    pub command: &'static str,
}

/// Where the repository key comes from.
pub const KEY_VARS: KeyVars = KeyVars {
    value: KEY_ENV,
    file: KEY_FILE_ENV,
    command: KEY_COMMAND_ENV,
};

/// Where `repo key rotate`'s new key comes from.
pub const NEW_KEY_VARS: KeyVars = KeyVars {
    value: NEW_KEY_ENV,
    file: NEW_KEY_FILE_ENV,
    command: NEW_KEY_COMMAND_ENV,
};

impl KeyVars {
    /// "A, B or C", for messages.
    pub fn names(&self) -> String {
        format!("{}, {} or {}", self.value, self.file, self.command)
    }
}

/// How long a key command may run.
const KEY_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

const CONFIG_FORMAT: &str = "rollcall.repository.v1";
const CIPHER: &str = "aes-256-gcm-chunked.v1";
/// Plaintext bytes per sealed chunk.
pub(crate) const CHUNK_SIZE: usize = 1 << 20;
const MAGIC: &[u8; 4] = b"RCE1";
const SALT_LEN: usize = 32;
/// Bytes before the first chunk.
pub(crate) const HEADER_LEN: usize = MAGIC.len() + SALT_LEN;
const TAG_LEN: usize = 16;
const WRAP_AAD: &[u8] = b"rollcall repository data key v1";
/// How the data key's wrap is bound to the config: 1 binds the key id only (repositories
/// made before version 2; still read, and rewrapped as 2 by the next rotation), 2 binds the
/// key id, the cipher and the chunk size, so editing either is refused as damage.
const WRAP_VERSION: u32 = 2;

/// 32 secret bytes; never printed.
#[derive(Clone)]
struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// A key-encryption key: what the operator keeps.
#[derive(Clone, Debug)]
pub struct RepositoryKey(Secret);

impl RepositoryKey {
    /// A key from its text form (base64 of 32 bytes; surrounding whitespace ignored). `what`
    /// names where the text came from, for the error.
    pub fn from_base64(text: &str, what: &str) -> Result<RepositoryKey> {
        let bytes = BASE64.decode(text.trim()).map_err(|_| {
            anyhow::anyhow!(
                "{what} is not base64: it must hold 32 random bytes in base64 (e.g. from \
                 `openssl rand -base64 32`)"
            )
        })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            anyhow::anyhow!(
                "{what} holds {} bytes, a repository key is 32 (e.g. `openssl rand -base64 32`)",
                b.len()
            )
        })?;
        Ok(RepositoryKey(Secret(bytes)))
    }

    /// A fresh random key (tests, benchmarks).
    pub fn generate() -> Result<RepositoryKey> {
        Ok(RepositoryKey(Secret(random_bytes()?)))
    }

    /// The key's text form.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.0)
    }

    /// The key from the process environment (see [`KeyVars`]), with where it came from;
    /// `None` when none of the variables is set. A key command blocks while it runs.
    pub fn from_env(vars: &KeyVars) -> Result<Option<(RepositoryKey, String)>> {
        RepositoryKey::from_vars(vars, |name| std::env::var_os(name))
    }

    /// [`RepositoryKey::from_env`] with the variables read through `lookup`.
    fn from_vars(
        vars: &KeyVars,
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Option<(RepositoryKey, String)>> {
        let set = |name: &str| lookup(name).filter(|v| !v.to_string_lossy().trim().is_empty());
        if let Some(text) = set(vars.value) {
            let var = vars.value;
            let text = text
                .into_string()
                .map_err(|_| anyhow::anyhow!("environment variable {var} is not UTF-8 text"))?;
            let source = format!("environment variable {var}");
            return RepositoryKey::from_base64(&text, &source).map(|k| Some((k, source)));
        }
        if let Some(path) = set(vars.file) {
            let file_var = vars.file;
            let path = std::path::PathBuf::from(path);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "read the repository key from {} ({file_var}): check the path and its \
                     permissions",
                    path.display()
                )
            })?;
            let source = format!("the key file {} ({file_var})", path.display());
            return RepositoryKey::from_base64(&text, &source).map(|k| Some((k, source)));
        }
        if let Some(line) = set(vars.command) {
            return run_key_command(vars.command, &line.to_string_lossy(), KEY_COMMAND_TIMEOUT)
                .map(Some);
        }
        Ok(None)
    }

    /// A short public fingerprint naming the key in the config object and in errors.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"rollcall repository key id\0");
        h.update(self.0.0);
        hex::encode(h.finalize())[..16].to_owned()
    }

    fn aead(&self) -> Result<LessSafeKey> {
        let unbound = UnboundKey::new(&AES_256_GCM, &self.0.0)
            .map_err(|_| anyhow::anyhow!("build the key-encryption cipher"))?;
        Ok(LessSafeKey::new(unbound))
    }
}

/// Runs the key command `line` (from variable `var`): split at whitespace, no shell, stdin
/// empty, stderr passed through to ours (a KMS CLI's own explanation), stdout the key's text.
/// Messages name the variable, the program and the exit status, never what it printed.
fn run_key_command(
    var: &str,
    line: &str,
    timeout: std::time::Duration,
) -> Result<(RepositoryKey, String)> {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let mut words = line.split_whitespace();
    let Some(program) = words.next() else {
        bail!("{var} is empty: set it to a command that prints the repository key");
    };
    let source = format!("the output of {var} (`{program}`)");
    // The command gets no key of ours: during a rotation the other key may be in a variable.
    let mut command = Command::new(program);
    for held in [KEY_ENV, NEW_KEY_ENV] {
        command.env_remove(held);
    }
    let mut child = command
        .args(words)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "run the repository key command `{program}` ({var}): check that it exists and is \
                 executable (it runs without a shell: program and arguments split at spaces)"
            )
        })?;
    let mut stdout = child
        .stdout
        .take()
        .context("take the key command's stdout")?;
    // Read on a thread so a command that prints much cannot block on a full pipe while we wait;
    // its answer comes through a channel so a process the command left holding stdout open
    // cannot hold us past the deadline either.
    let (sent, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = sent.send(stdout.read_to_end(&mut out).map(|_| out));
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the repository key command `{program}` ({var}) did not finish within {} s: \
                     it was stopped; check that it does not wait for input",
                    timeout.as_secs()
                );
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "wait for the repository key command `{program}` ({var})"
                )));
            }
        }
    };
    let out = output
        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        .map_err(|_| {
            anyhow::anyhow!(
                "the repository key command `{program}` ({var}) exited but its output did not \
                 end within {} s: a process it started still holds its stdout",
                timeout.as_secs()
            )
        })?
        .with_context(|| format!("read the output of {var}"))?;
    if !status.success() {
        bail!(
            "the repository key command `{program}` ({var}) failed ({status}): its own message, if \
             any, is above; it must print the repository key (32 bytes in base64) on stdout and \
             exit 0"
        );
    }
    let text = String::from_utf8(out)
        .map_err(|_| anyhow::anyhow!("{source} is not text: it must be the key in base64"))?;
    if text.trim().is_empty() {
        bail!("{source} is empty: it must print the repository key (32 bytes in base64)");
    }
    RepositoryKey::from_base64(&text, &source).map(|k| (k, source))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| anyhow::anyhow!("read random bytes from the operating system"))?;
    Ok(out)
}

/// The repository's config object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub format: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Absent: the repository is stored in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

/// How an encrypted repository is sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    pub cipher: String,
    /// Plaintext bytes per chunk.
    pub chunk_size: u64,
    /// [`RepositoryKey::id`] of the key that wraps the data key.
    pub key_id: String,
    /// base64 of nonce ‖ AES-256-GCM(KEK, data key) ‖ tag.
    pub wrapped_key: String,
    /// When the data key was last wrapped (`repo init`, `repo key rotate`).
    pub wrapped_at: chrono::DateTime<chrono::Utc>,
    /// What the wrap's associated data binds ([`WRAP_VERSION`]); absent in configs written
    /// before it existed, which are version 1.
    #[serde(default = "wrap_version_1")]
    pub wrap_version: u32,
}

fn wrap_version_1() -> u32 {
    1
}

impl RepositoryConfig {
    /// A plaintext repository's config.
    pub fn plain() -> RepositoryConfig {
        RepositoryConfig {
            format: CONFIG_FORMAT.into(),
            created_at: chrono::Utc::now(),
            encryption: None,
        }
    }

    /// An encrypted repository's config: a fresh data key wrapped by `kek`.
    pub fn encrypted(kek: &RepositoryKey) -> Result<RepositoryConfig> {
        let data: [u8; 32] = random_bytes()?;
        Ok(RepositoryConfig {
            format: CONFIG_FORMAT.into(),
            created_at: chrono::Utc::now(),
            encryption: Some(EncryptionConfig::wrap(
                &data,
                kek,
                CHUNK_SIZE as u64,
                WRAP_VERSION,
            )?),
        })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = serde_json::to_vec_pretty(self).context("encode the repository config")?;
        out.push(b'\n');
        Ok(out)
    }

    /// Reads a config object; `repo` names the repository in the error.
    pub fn from_bytes(bytes: &[u8], repo: &str) -> Result<RepositoryConfig> {
        let config: RepositoryConfig = serde_json::from_slice(bytes).with_context(|| {
            format!(
                "repository {repo}: its config object {CONFIG_KEY} does not read (written by a \
                 newer rollcall, or damaged): restore the file from a copy"
            )
        })?;
        if config.format != CONFIG_FORMAT {
            bail!(
                "repository {repo}: its config object {CONFIG_KEY} has format {:?}, this \
                 rollcall reads {CONFIG_FORMAT:?}: upgrade rollcall",
                config.format
            );
        }
        if let Some(e) = &config.encryption {
            if e.cipher != CIPHER {
                bail!(
                    "repository {repo} is encrypted with {:?}, this rollcall knows {CIPHER:?}: \
                     upgrade rollcall",
                    e.cipher
                );
            }
            if e.wrap_version == 0 || e.wrap_version > WRAP_VERSION {
                bail!(
                    "repository {repo}: its config object {CONFIG_KEY} has wrap version {}, this \
                     rollcall reads 1 to {WRAP_VERSION}: upgrade rollcall",
                    e.wrap_version
                );
            }
            if e.chunk_size == 0 || e.chunk_size > 64 << 20 {
                bail!(
                    "repository {repo}: its config object {CONFIG_KEY} names a chunk size of {} \
                     bytes (damaged?): restore the file from a copy",
                    e.chunk_size
                );
            }
        }
        Ok(config)
    }
}

impl EncryptionConfig {
    fn wrap(
        data: &[u8; 32],
        kek: &RepositoryKey,
        chunk_size: u64,
        wrap_version: u32,
    ) -> Result<EncryptionConfig> {
        let nonce: [u8; NONCE_LEN] = random_bytes()?;
        let mut sealed = data.to_vec();
        let mut config = EncryptionConfig {
            cipher: CIPHER.into(),
            chunk_size,
            key_id: kek.id(),
            wrapped_key: String::new(),
            wrapped_at: chrono::Utc::now(),
            wrap_version,
        };
        kek.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(config.wrap_aad()),
                &mut sealed,
            )
            .map_err(|_| anyhow::anyhow!("seal the data key"))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&sealed);
        config.wrapped_key = BASE64.encode(wrapped);
        Ok(config)
    }

    /// The associated data of the data key's wrap: what it binds.
    fn wrap_aad(&self) -> Vec<u8> {
        let mut aad = WRAP_AAD.to_vec();
        aad.extend_from_slice(self.key_id.as_bytes());
        if self.wrap_version >= 2 {
            aad.extend_from_slice(b"\0v2\0");
            aad.extend_from_slice(self.cipher.as_bytes());
            aad.push(0);
            aad.extend_from_slice(&self.chunk_size.to_be_bytes());
        }
        aad
    }

    /// The data key, opened with `kek`. A key that is not the repository's is named as such.
    pub fn unwrap_key(&self, kek: &RepositoryKey, repo: &str, source: &str) -> Result<DataKey> {
        let given = kek.id();
        if given != self.key_id {
            bail!(
                "repository {repo} is encrypted with key {}, but {source} holds key {given}: give \
                 the repository's key ({})",
                self.key_id,
                KEY_VARS.names()
            );
        }
        let damaged = || {
            anyhow::anyhow!(
                "repository {repo}: the wrapped data key in {CONFIG_KEY} does not open with key \
                 {given} (the config object was modified or damaged: its key, cipher and chunk \
                 size are checked together): restore it from a copy"
            )
        };
        let wrapped = BASE64.decode(&self.wrapped_key).map_err(|_| damaged())?;
        if wrapped.len() != NONCE_LEN + 32 + TAG_LEN {
            return Err(damaged());
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged())?;
        let mut sealed = sealed.to_vec();
        let data = kek
            .aead()?
            .open_in_place(nonce, Aad::from(self.wrap_aad()), &mut sealed)
            .map_err(|_| damaged())?;
        let data: [u8; 32] = data.try_into().map_err(|_| damaged())?;
        let chunk = usize::try_from(self.chunk_size).map_err(|_| damaged())?;
        Ok(DataKey::new(&data, chunk))
    }

    /// The same data key wrapped by `new` instead (key rotation), bound as this rollcall
    /// binds (a version 1 wrap becomes version 2).
    pub fn rewrap(&self, old: &RepositoryKey, new: &RepositoryKey, repo: &str) -> Result<Self> {
        let data = self.unwrap_key(old, repo, "the current key")?;
        EncryptionConfig::wrap(&data.secret.0, new, self.chunk_size, WRAP_VERSION)
    }
}

/// An open repository's data key: seals and opens objects, and names blobs.
pub struct DataKey {
    secret: Secret,
    /// HMAC key every per-object key is derived from.
    derive: hmac::Key,
    /// HMAC key of blob names.
    names: hmac::Key,
    /// HMAC key of the names of objects quarantined in the repository.
    quarantine_names: hmac::Key,
    chunk: usize,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

impl DataKey {
    fn new(secret: &[u8; 32], chunk: usize) -> DataKey {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let sub =
            |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&root, label).as_ref());
        DataKey {
            secret: Secret(*secret),
            derive: sub(b"rollcall object keys v1"),
            names: sub(b"rollcall blob names v1"),
            quarantine_names: sub(b"rollcall quarantine names v1"),
            chunk,
        }
    }

    /// A data key for unit tests and benchmarks, with its chunk size.
    #[cfg(test)]
    pub(crate) fn for_tests(chunk: usize) -> Arc<DataKey> {
        Arc::new(DataKey::new(&[7u8; 32], chunk))
    }

    pub(crate) fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// The name a blob whose content has `sha256` is stored under: a keyed hash, so the
    /// repository's file names say nothing about contents.
    pub(crate) fn blob_id(&self, sha256: &str) -> String {
        hex::encode(hmac::sign(&self.names, sha256.as_bytes()).as_ref())
    }

    /// The name a live store's object `key` is quarantined under in the repository: a keyed
    /// hash, so the repository's names do not list the live store's keys (the sealed restore
    /// records say which key each one was).
    pub(crate) fn quarantine_name(&self, key: &str) -> String {
        hex::encode(hmac::sign(&self.quarantine_names, key.as_bytes()).as_ref())
    }

    fn object_key(&self, salt: &[u8]) -> LessSafeKey {
        let tag = hmac::sign(&self.derive, salt);
        // A 32-byte HMAC-SHA256 output is always a valid AES-256 key.
        let unbound = UnboundKey::new(&AES_256_GCM, tag.as_ref()).expect("32-byte AES-256 key");
        LessSafeKey::new(unbound)
    }

    /// Starts sealing an object whose associated data is `aad`; returns its header too.
    pub(crate) fn sealer(&self, aad: Vec<u8>) -> Result<(Sealer, Vec<u8>)> {
        let salt: [u8; SALT_LEN] = random_bytes()?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&salt);
        Ok((
            Sealer {
                key: self.object_key(&salt),
                aad,
                counter: 0,
                pending: Vec::with_capacity(self.chunk),
                chunk: self.chunk,
            },
            header,
        ))
    }

    /// Starts opening an object whose associated data is `aad`.
    pub(crate) fn opener(self: &Arc<Self>, aad: Vec<u8>) -> Opener {
        Opener {
            data: self.clone(),
            key: None,
            aad,
            counter: 0,
            buf: Vec::new(),
            chunk: self.chunk,
        }
    }
}

fn nonce(counter: u64, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[3..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Why an object does not open. The caller names the object and the repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("it is not an encrypted object of this repository (no header)")]
    NoHeader,
    #[error("chunk {0} does not authenticate: it was modified, moved or reordered")]
    Chunk(u64),
    #[error("it ends early, after chunk {0}: it was truncated")]
    Truncated(u64),
    #[error("it has bytes after its final chunk")]
    Trailing,
}

/// Seals one object's plaintext as it arrives. A full chunk is kept until more data comes,
/// so the last chunk is always the one sealed with the final flag.
pub(crate) struct Sealer {
    key: LessSafeKey,
    aad: Vec<u8>,
    counter: u64,
    pending: Vec<u8>,
    chunk: usize,
}

impl Sealer {
    /// Adds plaintext; appends the chunks it completes to `out`.
    pub(crate) fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        while !data.is_empty() {
            if self.pending.len() == self.chunk {
                self.seal_pending(false, out)?;
            }
            let take = (self.chunk - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seals the final chunk into `out`.
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) -> Result<()> {
        self.seal_pending(true, out)
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        out.extend_from_slice(&self.pending);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce(self.counter, last),
                Aad::from(&self.aad),
                &mut out[start..],
            )
            .map_err(|_| anyhow::anyhow!("seal chunk {}", self.counter))?;
        out.extend_from_slice(tag.as_ref());
        self.pending.clear();
        self.counter += 1;
        Ok(())
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

/// Opens one object's ciphertext as it arrives; everything it returns has authenticated.
pub(crate) struct Opener {
    data: Arc<DataKey>,
    key: Option<LessSafeKey>,
    aad: Vec<u8>,
    counter: u64,
    buf: Vec<u8>,
    chunk: usize,
}

impl Opener {
    /// Adds ciphertext; appends the plaintext of every chunk known not to be the last to `out`.
    pub(crate) fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), OpenError> {
        self.buf.extend_from_slice(data);
        if self.key.is_none() {
            if self.buf.len() < HEADER_LEN {
                return Ok(());
            }
            if &self.buf[..MAGIC.len()] != MAGIC {
                return Err(OpenError::NoHeader);
            }
            self.key = Some(self.data.object_key(&self.buf[MAGIC.len()..HEADER_LEN]));
            self.buf.drain(..HEADER_LEN);
        }
        let sealed = self.chunk + TAG_LEN;
        let mut at = 0;
        // A chunk is opened as not-final only when more bytes follow it.
        while self.buf.len() - at > sealed {
            self.open_chunk(at, sealed, false, out)?;
            at += sealed;
        }
        self.buf.drain(..at);
        Ok(())
    }

    /// Opens the final chunk.
    pub(crate) fn finish(mut self, out: &mut Vec<u8>) -> Result<(), OpenError> {
        if self.key.is_none() {
            return Err(OpenError::NoHeader);
        }
        let len = self.buf.len();
        if len < TAG_LEN {
            return Err(OpenError::Truncated(self.counter));
        }
        if len > self.chunk + TAG_LEN {
            return Err(OpenError::Trailing);
        }
        self.open_chunk(0, len, true, out).map_err(|e| match e {
            // A non-final chunk where the final one should be: chunks were cut off the end.
            OpenError::Chunk(n) if len == self.chunk + TAG_LEN => OpenError::Truncated(n),
            e => e,
        })
    }

    fn open_chunk(
        &mut self,
        at: usize,
        len: usize,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), OpenError> {
        let Some(key) = &self.key else {
            return Err(OpenError::NoHeader);
        };
        let n = self.counter;
        let plain = key
            .open_in_place(
                nonce(n, last),
                Aad::from(&self.aad),
                &mut self.buf[at..at + len],
            )
            .map_err(|_| OpenError::Chunk(n))?;
        out.extend_from_slice(plain);
        self.counter += 1;
        Ok(())
    }
}

/// The sealed size of `plain` bytes.
pub(crate) fn sealed_size(plain: u64, chunk: u64) -> u64 {
    let chunks = plain.div_ceil(chunk).max(1);
    HEADER_LEN as u64 + chunks * TAG_LEN as u64 + plain
}

/// The plaintext size of a sealed object of `sealed` bytes; `None` when no object seals to
/// that size (it was cut or grown).
pub(crate) fn plain_size(sealed: u64, chunk: u64) -> Option<u64> {
    let body = sealed.checked_sub(HEADER_LEN as u64)?;
    let full = chunk + TAG_LEN as u64;
    let (whole, rest) = (body / full, body % full);
    let plain = match rest {
        0 if whole > 0 => whole * chunk,
        0 => return None,
        r if r >= TAG_LEN as u64 => whole * chunk + r - TAG_LEN as u64,
        _ => return None,
    };
    (sealed_size(plain, chunk) == sealed).then_some(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 64;

    fn seal(key: &DataKey, aad: &[u8], plain: &[u8], pieces: usize) -> Vec<u8> {
        let (mut sealer, mut out) = key.sealer(aad.to_vec()).expect("sealer");
        for piece in plain.chunks(pieces.max(1)) {
            sealer.push(piece, &mut out).expect("push");
        }
        sealer.finish(&mut out).expect("finish");
        out
    }

    fn open(
        key: &Arc<DataKey>,
        aad: &[u8],
        sealed: &[u8],
        pieces: usize,
    ) -> Result<Vec<u8>, OpenError> {
        let mut opener = key.opener(aad.to_vec());
        let mut out = Vec::new();
        for piece in sealed.chunks(pieces.max(1)) {
            opener.push(piece, &mut out)?;
        }
        opener.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_chunk_boundaries_whatever_the_pieces() {
        let key = DataKey::for_tests(CHUNK);
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            for pieces in [1, 7, CHUNK, CHUNK + 16, 1000] {
                let sealed = seal(&key, b"points/a.json", &plain, pieces);
                assert_eq!(sealed.len() as u64, sealed_size(len as u64, CHUNK as u64));
                assert_eq!(
                    plain_size(sealed.len() as u64, CHUNK as u64),
                    Some(len as u64),
                    "len {len}"
                );
                for read in [1, 5, CHUNK + 16, 4096] {
                    assert_eq!(
                        open(&key, b"points/a.json", &sealed, read).as_deref(),
                        Ok(&plain[..]),
                        "len {len} pieces {pieces} read {read}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_truncation_reordering_flips_and_another_name() {
        let key = DataKey::for_tests(CHUNK);
        let plain = vec![42u8; 3 * CHUNK + 10];
        let sealed = seal(&key, b"postgres/p.dump.zst", &plain, 100);
        let chunk = CHUNK + TAG_LEN;
        let aad = b"postgres/p.dump.zst";

        // Cut at a chunk boundary: the last chunk left is not a final one.
        let cut = &sealed[..HEADER_LEN + 2 * chunk];
        assert_eq!(open(&key, aad, cut, 4096), Err(OpenError::Truncated(1)));
        assert_eq!(
            plain_size(cut.len() as u64, CHUNK as u64),
            Some(2 * CHUNK as u64)
        );
        // Cut inside a chunk.
        let cut = &sealed[..sealed.len() - 3];
        assert!(open(&key, aad, cut, 4096).is_err());
        // Only the header, or less.
        assert_eq!(
            open(&key, aad, &sealed[..HEADER_LEN], 4096),
            Err(OpenError::Truncated(0))
        );
        assert_eq!(
            open(&key, aad, &sealed[..10], 4096),
            Err(OpenError::NoHeader)
        );

        // Two chunks swapped.
        let mut swapped = sealed.clone();
        let (a, b) = (HEADER_LEN, HEADER_LEN + chunk);
        let first = sealed[a..a + chunk].to_vec();
        swapped.copy_within(b..b + chunk, a);
        swapped[b..b + chunk].copy_from_slice(&first);
        assert_eq!(open(&key, aad, &swapped, 4096), Err(OpenError::Chunk(0)));

        // Any one flipped byte, header included.
        for at in [0, 5, HEADER_LEN, HEADER_LEN + CHUNK + 3, sealed.len() - 1] {
            let mut flipped = sealed.clone();
            flipped[at] ^= 0x01;
            assert!(open(&key, aad, &flipped, 4096).is_err(), "flip at {at}");
        }

        // Another name, another key.
        assert_eq!(
            open(&key, b"postgres/q.dump.zst", &sealed, 4096),
            Err(OpenError::Chunk(0))
        );
        let other = Arc::new(DataKey::new(&[8u8; 32], CHUNK));
        assert_eq!(open(&other, aad, &sealed, 4096), Err(OpenError::Chunk(0)));

        // Bytes appended after the final chunk.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&[0u8; CHUNK + TAG_LEN + 1]);
        assert!(open(&key, aad, &longer, 4096).is_err());
    }

    #[test]
    fn sizes_that_no_object_seals_to_are_refused() {
        let c = CHUNK as u64;
        assert_eq!(plain_size(0, c), None);
        assert_eq!(plain_size(HEADER_LEN as u64, c), None);
        assert_eq!(plain_size(HEADER_LEN as u64 + 15, c), None);
        assert_eq!(plain_size(HEADER_LEN as u64 + 16, c), Some(0));
        // A full chunk followed by an empty one is never written.
        assert_eq!(plain_size(HEADER_LEN as u64 + (c + 16) + 16, c), None);
    }

    #[test]
    fn the_data_key_is_wrapped_and_opens_only_with_its_key() {
        let kek = RepositoryKey::generate().expect("key");
        let config = RepositoryConfig::encrypted(&kek).expect("config");
        let text = config.to_bytes().expect("encode");
        let read = RepositoryConfig::from_bytes(&text, "file:///r").expect("decode");
        let enc = read.encryption.expect("encrypted");
        let data = Arc::new(enc.unwrap_key(&kek, "file:///r", "env").expect("opens"));
        let other = RepositoryKey::generate().expect("key");
        let err = enc
            .unwrap_key(&other, "file:///r", "environment variable X")
            .expect_err("wrong key");
        assert!(err.to_string().contains(&enc.key_id), "{err}");
        assert!(err.to_string().contains("file:///r"), "{err}");

        // Rotation keeps the data key: what one seals the other opens; the old key is refused.
        let rotated = enc.rewrap(&kek, &other, "file:///r").expect("rewrap");
        let data2 = Arc::new(
            rotated
                .unwrap_key(&other, "file:///r", "env")
                .expect("new key"),
        );
        assert!(rotated.unwrap_key(&kek, "file:///r", "env").is_err());
        let sealed = seal(&data, b"x", b"hello", 3);
        assert_eq!(open(&data2, b"x", &sealed, 2).as_deref(), Ok(&b"hello"[..]));
        assert_eq!(data.blob_id("ab"), data2.blob_id("ab"));

        // A tampered wrapped key is damage, not a wrong key.
        let mut tampered = rotated.clone();
        let mut raw = BASE64.decode(&tampered.wrapped_key).expect("b64");
        raw[20] ^= 1;
        tampered.wrapped_key = BASE64.encode(raw);
        let err = tampered
            .unwrap_key(&other, "file:///r", "env")
            .expect_err("damaged");
        assert!(err.to_string().contains("modified or damaged"), "{err}");
    }

    #[test]
    fn the_cipher_and_chunk_size_are_bound_to_the_wrap_and_version_1_still_opens() {
        let kek = RepositoryKey::generate().expect("key");
        let config = RepositoryConfig::encrypted(&kek).expect("config");
        let enc = config.encryption.clone().expect("encrypted");
        assert_eq!(enc.wrap_version, WRAP_VERSION);
        let mut json: serde_json::Value =
            serde_json::from_slice(&config.to_bytes().expect("encode")).expect("json");
        json["encryption"]["chunk_size"] = serde_json::json!(4096);
        let edited = RepositoryConfig::from_bytes(json.to_string().as_bytes(), "file:///r")
            .expect("an edited chunk size still parses");
        let err = edited
            .encryption
            .expect("encrypted")
            .unwrap_key(&kek, "file:///r", "env")
            .expect_err("an edited chunk size must not open");
        assert!(err.to_string().contains("modified or damaged"), "{err}");
        // Dropping the version field (a downgrade to version 1's binding) is refused too.
        let mut downgraded = enc.clone();
        downgraded.wrap_version = 1;
        assert!(downgraded.unwrap_key(&kek, "file:///r", "env").is_err());

        // A config written before the binding (no wrap_version: version 1) still opens,
        // and rotation rewraps it as version 2.
        let data = [9u8; 32];
        let old = EncryptionConfig::wrap(&data, &kek, CHUNK_SIZE as u64, 1).expect("v1");
        let mut json = serde_json::to_value(&old).expect("json");
        json.as_object_mut().expect("object").remove("wrap_version");
        let read: EncryptionConfig = serde_json::from_value(json).expect("v1 reads");
        assert_eq!(read.wrap_version, 1);
        let opened = read.unwrap_key(&kek, "file:///r", "env").expect("v1 opens");
        assert_eq!(opened.secret.0, data);
        let other = RepositoryKey::generate().expect("key");
        let rotated = read.rewrap(&kek, &other, "file:///r").expect("rewrap");
        assert_eq!(rotated.wrap_version, WRAP_VERSION);
        let again = rotated.unwrap_key(&other, "file:///r", "env").expect("v2");
        assert_eq!(again.secret.0, data);
    }

    /// A stand-in for a KMS CLI: a script printing `body` and exiting with `status`.
    fn key_script(dir: &std::path::Path, name: &str, body: &str, status: i32) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nprintf '%s' '{body}'\nexit {status}\n"),
        )
        .expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.display().to_string()
    }

    fn lookup(
        vars: &[(&'static str, String)],
    ) -> impl Fn(&str) -> Option<std::ffi::OsString> + use<> {
        let vars: Vec<(&'static str, String)> = vars.to_vec();
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.into())
    }

    #[test]
    fn a_key_command_is_run_without_a_shell_and_its_failures_name_the_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = RepositoryKey::generate().expect("key");
        let good = key_script(dir.path(), "kms", &key.to_base64(), 0);
        // Arguments are split at whitespace and passed as they are (no shell: `$HOME` stays).
        let (got, source) = RepositoryKey::from_vars(
            &KEY_VARS,
            lookup(&[(KEY_COMMAND_ENV, format!("  {good} get  $HOME "))]),
        )
        .expect("runs")
        .expect("a key");
        assert_eq!(got.id(), key.id());
        assert!(source.contains(KEY_COMMAND_ENV), "{source}");
        // What the command received, word for word: nothing a shell would have expanded or run.
        let seen = dir.path().join("argv");
        let marker = dir.path().join("marker");
        let recording = dir.path().join("recording-kms");
        std::fs::write(
            &recording,
            format!(
                "#!/bin/sh\nprintf '%s|' \"$@\" > '{}'\nprintf '%s' '{}'\n",
                seen.display(),
                key.to_base64()
            ),
        )
        .expect("write script");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&recording, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let line = format!(
            "{} $HOME $(touch {}) ;echo",
            recording.display(),
            marker.display()
        );
        let (got, _) = run_key_command(KEY_COMMAND_ENV, &line, std::time::Duration::from_secs(20))
            .expect("runs");
        assert_eq!(got.id(), key.id());
        assert_eq!(
            std::fs::read_to_string(&seen).expect("argv recorded"),
            format!("$HOME|$(touch|{})|;echo|", marker.display())
        );
        assert!(!marker.exists(), "no shell ran the substitution");
        // A command that exits while a process it started holds its stdout: the deadline holds.
        let lingering = key_script(dir.path(), "lingering", "", 0);
        std::fs::write(
            &lingering,
            format!(
                "#!/bin/sh\n(sleep 30) &\nprintf '%s' '{}'\n",
                key.to_base64()
            ),
        )
        .expect("write script");
        let started = std::time::Instant::now();
        let err = run_key_command(
            KEY_COMMAND_ENV,
            &lingering,
            std::time::Duration::from_secs(1),
        )
        .expect_err("the output never ends");
        assert!(
            format!("{err:#}").contains("still holds its stdout"),
            "{err:#}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));

        // Precedence: the value, then the file, then the command.
        let other = RepositoryKey::generate().expect("key");
        let (got, _) = RepositoryKey::from_vars(
            &KEY_VARS,
            lookup(&[
                (KEY_COMMAND_ENV, good.clone()),
                (KEY_ENV, other.to_base64()),
            ]),
        )
        .expect("value")
        .expect("a key");
        assert_eq!(got.id(), other.id());
        let file = dir.path().join("key.txt");
        std::fs::write(&file, other.to_base64()).expect("key file");
        let (got, _) = RepositoryKey::from_vars(
            &KEY_VARS,
            lookup(&[
                (KEY_COMMAND_ENV, good.clone()),
                (KEY_FILE_ENV, file.display().to_string()),
            ]),
        )
        .expect("file")
        .expect("a key");
        assert_eq!(got.id(), other.id());
        assert!(
            RepositoryKey::from_vars(&KEY_VARS, lookup(&[(KEY_COMMAND_ENV, " ".into())]))
                .expect("blank is unset")
                .is_none()
        );

        // A failing command: the variable, the program and the status; never its output.
        let secret = key.to_base64();
        let failing = key_script(dir.path(), "kms-denied", &secret, 3);
        let err = RepositoryKey::from_vars(&KEY_VARS, lookup(&[(KEY_COMMAND_ENV, failing)]))
            .expect_err("exit 3");
        let text = format!("{err:#}");
        assert!(
            text.contains(KEY_COMMAND_ENV) && text.contains("kms-denied") && text.contains("3"),
            "{text}"
        );
        assert!(!text.contains(&secret), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");

        // Output that is not a key, a program that does not exist, a command that hangs.
        let garbage = key_script(dir.path(), "kms-garbage", "c2hvcnQ=", 0);
        let err =
            RepositoryKey::from_vars(&NEW_KEY_VARS, lookup(&[(NEW_KEY_COMMAND_ENV, garbage)]))
                .expect_err("5 bytes");
        let text = format!("{err:#}");
        assert!(
            text.contains(NEW_KEY_COMMAND_ENV) && text.contains("holds 5 bytes"),
            "{text}"
        );
        let missing = dir.path().join("no-such-kms").display().to_string();
        let err = RepositoryKey::from_vars(&KEY_VARS, lookup(&[(KEY_COMMAND_ENV, missing)]))
            .expect_err("missing");
        assert!(format!("{err:#}").contains(KEY_COMMAND_ENV), "{err:#}");
        let err = run_key_command(
            KEY_COMMAND_ENV,
            "sleep 30",
            std::time::Duration::from_millis(200),
        )
        .expect_err("hangs");
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    }

    #[test]
    fn key_text_is_checked() {
        let err = RepositoryKey::from_base64("not base64!", "X").expect_err("bad");
        assert!(err.to_string().contains("not base64"), "{err}");
        let err = RepositoryKey::from_base64(&BASE64.encode([1u8; 16]), "X").expect_err("short");
        assert!(err.to_string().contains("holds 16 bytes"), "{err}");
        let key = RepositoryKey::generate().expect("key");
        let again = RepositoryKey::from_base64(&format!(" {}\n", key.to_base64()), "X")
            .expect("round trip");
        assert_eq!(key.id(), again.id());
        assert!(!format!("{key:?}").contains(&key.to_base64()));
    }
}
