//! The operator side of the CLI: connecting to the coordinator's operator API with the
//! operator certificate or a bearer token, and the commands that use it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use api::model::{AgentStatus, Availability};
use api::pb::operator as op;
use api::pb::operator::operator_service_client::OperatorServiceClient;
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How an operator command reaches the coordinator.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The coordinator's operator API.
    #[arg(
        long,
        env = "ROLLCALL_COORDINATOR",
        default_value = "https://127.0.0.1:7401"
    )]
    pub coordinator: String,
    /// A directory from `rollcall certs init`: ca.pem, operator.pem, operator-key.pem.
    #[arg(long, env = "ROLLCALL_CERTS")]
    pub certs: Option<PathBuf>,
    /// Authenticate as this operator: `operators/NAME.pem` and `operators/NAME-key.pem` of the
    /// --certs directory (from `rollcall certs init --operator NAME:ROLE`) instead of
    /// operator.pem.
    #[arg(long = "operator", env = "ROLLCALL_OPERATOR", value_name = "NAME")]
    pub operator: Option<String>,
    /// The CA certificate, when authenticating with a token instead of a certificate.
    #[arg(long, env = "ROLLCALL_CA")]
    pub ca: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate (default: the URL's host).
    #[arg(long)]
    pub server_name: Option<String>,
}

/// Adds the operator's bearer token (from ROLLCALL_TOKEN) to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

pub type Client = OperatorServiceClient<InterceptedService<Channel, BearerToken>>;

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        anyhow!(
            "read {what} {}: {e}; pass --certs DIR (from `rollcall certs init`) or fix the path",
            path.display()
        )
    })
}

/// TCP connect to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From dialing to a usable connection (TCP, TLS and HTTP/2 handshakes).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

impl Connection {
    pub async fn connect(&self) -> Result<Client> {
        let url = self.coordinator.trim_end_matches('/').to_owned();
        let host = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("--coordinator {url:?} must start with https://"))?
            .split([':', '/'])
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut tls = ClientTlsConfig::new().domain_name(self.server_name.clone().unwrap_or(host));
        let token = std::env::var("ROLLCALL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        let operator = self.operator.as_deref().filter(|n| !n.is_empty());
        match (&self.certs, &self.ca) {
            (Some(dir), ca) => {
                let ca = ca.clone().unwrap_or_else(|| dir.join("ca.pem"));
                tls = tls.ca_certificate(Certificate::from_pem(read(&ca, "CA certificate")?));
                let (cert, key) = match operator {
                    Some(name) => {
                        api::identity::check_operator_name(name)
                            .map_err(|e| anyhow!("--operator: {e}"))?;
                        let (cert, key) = coordinator::certs::operator_files(dir, name);
                        if !cert.exists() {
                            return Err(anyhow!(
                                "no certificate for operator {name}: {} does not exist; issue \
                                 one with `rollcall certs init --dir {} --operator {name}:ROLE`",
                                cert.display(),
                                dir.display()
                            ));
                        }
                        (cert, key)
                    }
                    None => (dir.join("operator.pem"), dir.join("operator-key.pem")),
                };
                if cert.exists() || token.is_none() || operator.is_some() {
                    tls = tls.identity(Identity::from_pem(
                        read(&cert, "operator certificate")?,
                        read(&key, "operator key")?,
                    ));
                }
            }
            (None, Some(_)) if operator.is_some() => {
                return Err(anyhow!(
                    "--operator picks a certificate from --certs DIR; pass --certs (or use \
                     ROLLCALL_TOKEN with --ca and no --operator)"
                ));
            }
            (None, Some(ca)) => {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            }
            (None, None) => {
                return Err(anyhow!(
                    "no credentials: pass --certs DIR (operator.pem from `rollcall certs init`), \
                     or --ca FILE with ROLLCALL_TOKEN set"
                ));
            }
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("--coordinator {url:?} is not a valid URL"))?
            .tls_config(tls)?
            .connect_timeout(CONNECT_TIMEOUT)
            // A watch or a waiting backup notices a coordinator that went silent.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true);
        // The TLS and HTTP/2 handshakes too: something that accepts connections but never
        // answers (a load balancer in front of a stopped coordinator) must not hang the CLI.
        let channel = match tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint.connect()).await {
            Ok(connected) => connected.map_err(|e| {
                anyhow!(
                    "connect to coordinator at {url}: {}; is it running, and is the URL right?",
                    api::errors::one_line(&e)
                )
            })?,
            Err(_) => {
                return Err(anyhow!(
                    "connect to coordinator at {url}: no answer within {}s; something accepts \
                     connections there but does not answer as the coordinator (is it running, \
                     and is the URL right?)",
                    HANDSHAKE_TIMEOUT.as_secs()
                ));
            }
        };
        let header = match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<tonic::metadata::MetadataValue<_>>()
                    .map_err(|_| {
                        anyhow!("ROLLCALL_TOKEN holds characters not allowed in a header")
                    })?,
            ),
            None => None,
        };
        Ok(OperatorServiceClient::with_interceptor(
            channel,
            BearerToken(header),
        ))
    }
}

/// Turns an operator API error into one line saying what to do.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            anyhow!("coordinator refused the call: {}", status.message())
        }
        tonic::Code::Unavailable => anyhow!(
            "coordinator unavailable: {}; is it running and reachable?",
            status.message()
        ),
        _ => anyhow!(
            "coordinator error ({:?}): {}",
            status.code(),
            status.message()
        ),
    }
}

pub async fn agents(connection: &Connection, json: bool) -> Result<()> {
    let mut client = connection.connect().await?;
    let response = client
        .list_agents(op::ListAgentsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let agents: Vec<AgentStatus> = response
        .agents
        .into_iter()
        .map(AgentStatus::try_from)
        .collect::<Result<_, _>>()
        .context("coordinator sent an invalid agent status")?;
    if json {
        let out = serde_json::json!({ "epoch": response.epoch, "agents": agents });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if agents.is_empty() {
        outln!(
            "no agents have attached (coordinator epoch {})",
            response.epoch
        );
        return Ok(());
    }
    let now = api::model::to_unix_ms(std::time::SystemTime::now());
    outln!(
        "{:<20} {:<10} {:<14} {:<12} {:<6} {:<10} {:<8} CAPABILITIES",
        "NAME",
        "ROLE",
        "ENVIRONMENT",
        "STATE",
        "READY",
        "HEARTBEAT",
        "CLOCK"
    );
    let mut skewed = Vec::new();
    for a in &agents {
        let state = match a.availability {
            Availability::Connected => "connected",
            Availability::Unavailable => "unavailable",
        };
        let age = (now - a.last_heartbeat_unix_ms).max(0) / 1000;
        // The agent's clock against the coordinator's: `ok` within the warning threshold.
        let clock = match a.clock_offset_ms {
            None => "-".to_owned(),
            Some(ms) if ms.abs() <= api::human::CLOCK_OFFSET_WARN_MS => "ok".to_owned(),
            Some(ms) => {
                skewed.push((&a.name, ms));
                format!(
                    "{}{}s",
                    if ms >= 0 { "+" } else { "-" },
                    ms.unsigned_abs() / 1000
                )
            }
        };
        outln!(
            "{:<20} {:<10} {:<14} {:<12} {:<6} {:<10} {:<8} {}",
            a.name,
            a.role,
            a.environment,
            state,
            if a.ready { "yes" } else { "no" },
            format!("{age}s ago"),
            clock,
            a.capabilities.join(",")
        );
    }
    for (name, ms) in skewed {
        outln!(
            "warning: agent {name}'s clock is {} the coordinator's (more than {}s): commands do \
             not depend on it, but logs, reports and point stamps will not line up; synchronise \
             the clocks (NTP, chrony)",
            api::human::clock_offset(ms),
            api::human::CLOCK_OFFSET_WARN_MS / 1000
        );
    }
    Ok(())
}
