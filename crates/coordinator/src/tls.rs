//! mTLS for the coordinator's listeners: rustls (ring) server configs, an acceptor that names
//! why a handshake was refused, and the Rollcall identity of a peer certificate.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::identity::Identity;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA, certificate chain and key a listener serves with.
pub struct TlsMaterial {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Paths of the TLS files, as they appear in a config file (for error messages).
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Prefix of the config keys, e.g. `tls` for `tls.ca`.
    pub key_prefix: &'static str,
}

impl TlsMaterial {
    pub fn load(paths: &TlsPaths) -> Result<TlsMaterial> {
        let p = paths.key_prefix;
        let ca = read_certs(&paths.ca, &format!("{p}.ca"))?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).with_context(|| {
                format!(
                    "{p}.ca = {}: not a usable CA certificate; point it at the ca.pem written \
                     by `rollcall certs init`",
                    paths.ca.display()
                )
            })?;
        }
        let chain = read_certs(&paths.cert, &format!("{p}.cert"))?;
        let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| {
            anyhow::anyhow!(
                "{p}.key = {}: cannot load a PEM private key ({e}); fix the path or run \
                 `rollcall certs init --dir DIR`",
                paths.key.display()
            )
        })?;
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    if !path.is_file() {
        bail!(
            "{key} = {}: file not found; run `rollcall certs init --dir DIR` or fix the path",
            path.display()
        );
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "{key} = {}: cannot read PEM certificates ({e}); fix the path or regenerate it",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "{key} = {}: holds no PEM certificate; point it at a certificate file",
            path.display()
        );
    }
    Ok(certs)
}

/// Whether a listener demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Agents: no certificate, no connection.
    Required,
    /// Operators: a certificate or a bearer token (checked per call).
    Optional,
}

pub fn server_config(
    material: &TlsMaterial,
    auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider.clone());
    let verifier = match auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .context("build client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choose TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .context("use the coordinator certificate and key (do they belong together?)")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Why handshakes were refused, by reason. Exposed as metrics and read by tests.
#[derive(Debug, Default)]
pub struct Rejections {
    pub plaintext: AtomicU64,
    pub untrusted_certificate: AtomicU64,
    pub no_certificate: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Plaintext,
    UntrustedCertificate,
    NoCertificate,
    Other,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Plaintext => "plaintext",
            RejectReason::UntrustedCertificate => "untrusted_certificate",
            RejectReason::NoCertificate => "no_certificate",
            RejectReason::Other => "handshake_failed",
        }
    }
}

impl Rejections {
    fn count(&self, reason: RejectReason) {
        let counter = match reason {
            RejectReason::Plaintext => &self.plaintext,
            RejectReason::UntrustedCertificate => &self.untrusted_certificate,
            RejectReason::NoCertificate => &self.no_certificate,
            RejectReason::Other => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: RejectReason) -> u64 {
        let counter = match reason {
            RejectReason::Plaintext => &self.plaintext,
            RejectReason::UntrustedCertificate => &self.untrusted_certificate,
            RejectReason::NoCertificate => &self.no_certificate,
            RejectReason::Other => &self.other,
        };
        counter.load(Ordering::Relaxed)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding only
/// established streams; refused handshakes are logged with their reason and counted.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    rejections: Arc<Rejections>,
    listener_name: &'static str,
    cancel: CancellationToken,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = listener_name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let rejections = rejections.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err((reason, detail))) => {
                        rejections.count(reason);
                        tracing::warn!(
                            listener = listener_name,
                            %peer,
                            reason = reason.as_str(),
                            "refused connection: {detail}"
                        );
                    }
                    Err(_) => {
                        rejections.count(RejectReason::Other);
                        tracing::warn!(
                            listener = listener_name,
                            %peer,
                            "refused connection: TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}"
                        );
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, (RejectReason, String)> {
    // A TLS connection starts with a handshake record (0x16). Anything else is a client
    // speaking plaintext (HTTP/2 without TLS, curl http://...): say so plainly.
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err((RejectReason::Other, "client closed before TLS".into())),
        Ok(_) if first[0] != 0x16 => {
            return Err((
                RejectReason::Plaintext,
                "client spoke plaintext; Rollcall accepts only TLS with client certificates \
                 (use https:// and the certificates from `rollcall certs init`)"
                    .into(),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err((RejectReason::Other, format!("read from client: {e}"))),
    }
    acceptor.accept(tcp).await.map_err(|e| {
        let reason = match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(_)) => RejectReason::UntrustedCertificate,
            Some(rustls::Error::NoCertificatesPresented) => RejectReason::NoCertificate,
            _ => RejectReason::Other,
        };
        let detail = match reason {
            RejectReason::UntrustedCertificate => format!(
                "client certificate not issued by this coordinator's CA ({e}); issue it with \
                 `rollcall certs init` on the fleet's CA"
            ),
            RejectReason::NoCertificate => {
                "client presented no certificate; agents need the certificate from \
                 `rollcall certs init --agent NAME:ROLE`"
                    .to_owned()
            }
            _ => format!("TLS handshake failed: {e}"),
        };
        (reason, detail)
    })
}

/// The Rollcall identities in the leaf certificate of a DER chain.
pub fn identities(chain: &[CertificateDer<'_>]) -> Vec<Identity> {
    chain
        .first()
        .map(|leaf| api::identity::in_certificate_der(leaf))
        .unwrap_or_default()
}
