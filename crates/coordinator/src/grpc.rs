//! The gRPC adapters: the agents' `Attach` stream and the operator API. Thin by design —
//! check identity (an agent's here; an operator's in `layers::OperatorAuthLayer`, with the
//! decision in [`OperatorAuth`]), convert, call the registry or the engine, map errors.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api::identity::{Identity, OperatorRole};
use api::model::{
    Action, AgentMessage, AgentName, AgentStatus, CommandId, CoordinatorMessage, Epoch, Hello,
    ResultDetail, Welcome,
};
use api::pb::agent as pb;
use api::pb::operator as op;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::access::{self, Call};
use crate::engine::operator::PointsError;
use crate::link::{AgentLink, Outgoing, StreamLink};
use crate::registry::{Generation, Registry};
use crate::tls;

/// How long an agent has after connecting to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before it counts as not reading its stream.
const OUTBOUND_QUEUE: usize = 256;
const DESCRIBE_DEADLINE: Duration = Duration::from_secs(10);

pub struct AgentStream {
    pub registry: Registry,
    pub link: StreamLink,
    pub epoch: Epoch,
    pub heartbeat_interval: Duration,
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// Checks that the certificate names the agent and role its hello claims.
fn authorize_agent(identities: &[Identity], hello: &Hello) -> Result<(), Status> {
    let mut seen = Vec::new();
    for id in identities {
        if let Identity::Agent { name, role } = id {
            if *name == hello.name && *role == hello.role {
                return Ok(());
            }
            seen.push((name, role));
        }
    }
    let message = match seen.as_slice() {
        [] => format!(
            "agent {} presented a certificate that carries no agent identity; issue one with \
             `rollcall certs init --agent {}:{}`",
            hello.name, hello.name, hello.role
        ),
        [(name, role), ..] if **name == hello.name => format!(
            "agent {} claims role {}, but its certificate carries role {role}; fix `role` in \
             its agent.toml or issue a certificate for {}:{}",
            hello.name, hello.role, hello.name, hello.role
        ),
        [(name, role), ..] => format!(
            "agent {} presented the certificate of agent {name} ({role}); each agent needs its \
             own certificate (`rollcall certs init --agent {}:{}`)",
            hello.name, hello.name, hello.role
        ),
    };
    Err(Status::permission_denied(message))
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentStream {
    type AttachStream = AttachStream;

    #[tracing::instrument(name = "coordinator.grpc.attach", skip_all, fields(peer, agent))]
    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let peer = request.remote_addr();
        if let Some(peer) = peer {
            tracing::Span::current().record("peer", tracing::field::display(peer));
        }
        let identities = request
            .peer_certs()
            .map(|certs| tls::identities(&certs))
            .unwrap_or_default();
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s of attaching"))??;
        let hello = match first.map(AgentMessage::try_from) {
            Some(Ok(AgentMessage::Hello(hello))) => hello,
            Some(Ok(_)) | None => {
                return Err(Status::invalid_argument(
                    "the first message on the attach stream must be a hello",
                ));
            }
            Some(Err(e)) => return Err(Status::invalid_argument(format!("hello: {e}"))),
        };
        tracing::Span::current().record("agent", tracing::field::display(&hello.name));
        if let Err(status) = authorize_agent(&identities, &hello) {
            tracing::warn!(agent = %hello.name, "refused attach: {}", status.message());
            return Err(status);
        }
        if let Some(seen) = hello.highest_epoch
            && seen > self.epoch
        {
            // The agent has obeyed a newer coordinator: this one is stale and must not
            // pretend otherwise. The agent would refuse its commands anyway.
            tracing::error!(
                agent = %hello.name,
                "agent has seen epoch {seen}, newer than ours ({}); another coordinator is \
                 active — stop this one",
                self.epoch
            );
        }

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = CoordinatorMessage::Welcome(Welcome {
            epoch: self.epoch,
            heartbeat_interval: self.heartbeat_interval,
        });
        // The queue is empty: this cannot fail.
        let _ = tx.try_send(Box::new(welcome));
        let name = hello.name.clone();
        tracing::info!(agent = %name, role = %hello.role, peer = ?peer, "agent attached");
        let generation = self.registry.attach(hello, peer, tx);
        tokio::spawn(describe_on_attach(
            self.link.clone(),
            name.clone(),
            generation,
        ));

        let registry = self.registry.clone();
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(message)) => match AgentMessage::try_from(message) {
                        Ok(AgentMessage::Heartbeat(hb)) => {
                            registry.heartbeat(&name, generation, hb)
                        }
                        Ok(AgentMessage::Result(result)) => {
                            registry.deliver(&name, generation, result);
                        }
                        Ok(AgentMessage::Progress(progress)) => {
                            registry.progress(&name, generation, progress);
                        }
                        Ok(AgentMessage::Hello(_)) => {
                            tracing::warn!(agent = %name, "ignoring a second hello on one stream");
                        }
                        Err(e) => tracing::warn!(agent = %name, "ignoring invalid message: {e}"),
                    },
                    Ok(None) => break "stream closed by agent".to_owned(),
                    Err(status) => break format!("stream lost: {}", status.message()),
                }
            };
            registry.detach(&name, generation, &reason);
        });

        let outbound = ReceiverStream::new(rx).map(|m| Ok(pb::CoordinatorMessage::from(*m)));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Asks a newly attached agent to describe itself, so the coordinator's log shows what the
/// agent remembers (its highest epoch, its recorded results) from the moment it attaches.
async fn describe_on_attach(link: StreamLink, name: AgentName, generation: Generation) {
    let command = Outgoing {
        id: match CommandId::parse(&format!("attach/{}/{name}/{generation}", link.epoch())) {
            Ok(id) => id,
            Err(_) => return,
        },
        run_id: String::new(),
        deadline: api::model::add_saturating(SystemTime::now(), DESCRIBE_DEADLINE),
        action: Action::Describe,
    };
    match link.send(&name, command).await {
        Ok(result) => match result.detail {
            Some(ResultDetail::Describe(d)) => tracing::info!(
                agent = %name,
                version = %d.version,
                highest_epoch = ?d.highest_epoch.map(Epoch::get),
                recorded_results = d.recorded_results,
                "agent described itself"
            ),
            _ => tracing::warn!(
                agent = %name,
                outcome = %result.outcome,
                "agent did not describe itself: {}",
                result.message
            ),
        },
        Err(e) => tracing::debug!(agent = %name, "describe on attach: {e}"),
    }
}

/// Hash of an operator bearer token, as stored in the coordinator config.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who made an operator call, as the authentication layer established it; handlers find it in
/// the request's extensions ([`caller`]) and ask `access::authorize` about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The certificate's operator name, or the token's configured name (`token` for the
    /// unnamed `operator.token_sha256` list).
    pub name: String,
    pub role: OperatorRole,
    pub via: Via,
}

/// How an operator authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// An operator certificate (`spiffe://rollcall/operator/[<role>/]<name>`).
    Certificate,
    /// A bearer token whose SHA-256 is configured.
    Token,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Certificate => "certificate",
            Via::Token => "token",
        }
    }
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Who made this operator call. Every call that reaches a handler has passed
/// `layers::OperatorAuthLayer`, which put it there.
pub fn caller<T>(request: &Request<T>) -> Option<&Operator> {
    request.extensions().get::<Operator>()
}

/// Records the caller on the handler's span, so the log says who started or changed what.
fn record_caller<T>(request: &Request<T>) {
    if let Some(operator) = caller(request) {
        tracing::Span::current().record("operator", tracing::field::display(operator));
    }
}

/// The caller of a request, admitted to `call` by `access::authorize`.
fn authorized<T>(request: &Request<T>, call: &Call<'_>) -> Result<Operator, Status> {
    let operator = caller(request).cloned().ok_or_else(|| {
        // The authentication layer puts a caller on every call it lets through.
        Status::unauthenticated("operator call without an authenticated caller")
    })?;
    if let Err(status) = access::authorize(&operator, call) {
        tracing::warn!(operator = %operator, "refused: {}", status.message());
        return Err(status);
    }
    Ok(operator)
}

/// An accepted bearer token: the SHA-256 of its value, and who presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorToken {
    pub name: String,
    pub role: OperatorRole,
    pub sha256: [u8; 32],
}

/// Admits operator calls made with an operator certificate or a known bearer token.
#[derive(Clone)]
pub struct OperatorAuth {
    pub tokens: Arc<Vec<OperatorToken>>,
}

impl OperatorAuth {
    /// Decides on a call from the identities in the client's certificate and the request's
    /// headers: an operator certificate, else a bearer token, is admitted with the role it
    /// carries; an agent certificate is refused.
    pub fn check(
        &self,
        identities: &[Identity],
        headers: &http::HeaderMap,
    ) -> Result<Operator, Status> {
        if let Some((name, role)) = identities.iter().find_map(|id| match id {
            Identity::Operator { name, role } => Some((name, *role)),
            _ => None,
        }) {
            return Ok(Operator {
                name: name.clone(),
                role,
                via: Via::Certificate,
            });
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("authorization header must be `Bearer <token>`")
                })?;
            let hash = token_hash(token.trim());
            // Compare every stored hash in full so timing does not reveal a prefix match.
            let known = self.tokens.iter().fold(None, |found, t| {
                if constant_eq(&t.sha256, &hash) && found.is_none() {
                    Some(t)
                } else {
                    found
                }
            });
            if let Some(t) = known {
                return Ok(Operator {
                    name: t.name.clone(),
                    role: t.role,
                    via: Via::Token,
                });
            }
            return Err(Status::unauthenticated(
                "operator token not recognised; check ROLLCALL_TOKEN against \
                 `operator.token_sha256` or `[[operator.token]]` in the coordinator config",
            ));
        }
        if identities
            .iter()
            .any(|id| matches!(id, Identity::Agent { .. }))
        {
            return Err(Status::permission_denied(
                "agent certificates cannot call the operator API; use the operator certificate",
            ));
        }
        Err(Status::unauthenticated(
            "operator call without an operator certificate or token; pass --certs DIR \
             (operator.pem from `rollcall certs init`) or set ROLLCALL_TOKEN",
        ))
    }
}

fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub struct OperatorApi {
    pub registry: Registry,
    pub epoch: Epoch,
    pub engine: crate::engine::Engine<crate::link::StreamLink>,
}

fn run_to_pb(r: crate::store::RunRecord) -> op::Run {
    let plan_name = r
        .params
        .get("plan")
        .and_then(|p| p.as_str())
        .unwrap_or_default()
        .to_owned();
    let started_by = crate::engine::started_by(&r.params);
    op::Run {
        started_by: started_by
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        started_by_role: started_by.map(|s| s.role).unwrap_or_default(),
        id: r.id,
        kind: r.kind.as_str().to_owned(),
        environment: r.environment,
        point_id: r.point_id.unwrap_or_default(),
        state: r.state.as_str().to_owned(),
        reason: r.reason.unwrap_or_default(),
        epoch: r.epoch.get(),
        created_unix_ms: r.created_at.timestamp_millis(),
        updated_unix_ms: r.updated_at.timestamp_millis(),
        finished_unix_ms: r.finished_at.map_or(0, |t| t.timestamp_millis()),
        plan_name,
    }
}

fn start_request(r: op::StartRunRequest) -> Result<crate::engine::StartRun, Status> {
    let kind = match r.kind.as_str() {
        "" | "drill" => crate::store::RunKind::Drill,
        "recovery" => crate::store::RunKind::Recovery,
        "backup" => crate::store::RunKind::Backup,
        other => {
            return Err(Status::invalid_argument(format!(
                "run kind {other:?} is not drill or recovery"
            )));
        }
    };
    let plan = (!r.plan_toml.is_empty()).then(|| {
        let name = if r.plan_name.is_empty() {
            "plan.toml".to_owned()
        } else {
            r.plan_name
        };
        (name, r.plan_toml)
    });
    let to_time = if r.to_time.is_empty() {
        None
    } else {
        let at = chrono::DateTime::parse_from_rfc3339(&r.to_time).map_err(|e| {
            Status::invalid_argument(format!(
                "to_time {:?} is not RFC 3339 ({e}): write it like 2026-12-06T08:00:00Z",
                r.to_time
            ))
        })?;
        Some(at.with_timezone(&chrono::Utc))
    };
    Ok(crate::engine::StartRun {
        environment: r.environment,
        kind,
        point_id: (!r.point.is_empty()).then_some(r.point),
        plan,
        excluded: r.excluded,
        to_time,
        base_backup: r.base_backup,
    })
}

fn status_of(e: &anyhow::Error) -> Status {
    let text = format!("{e:#}");
    match e.downcast_ref::<crate::store::Error>() {
        Some(crate::store::Error::NotFound(_)) => Status::not_found(text),
        Some(crate::store::Error::Conflict(_)) => Status::failed_precondition(text),
        _ if text.starts_with("no run ") => Status::not_found(text),
        _ => Status::failed_precondition(text),
    }
}

/// Runs a change of the journal to its end even when the caller stops waiting (its deadline,
/// `operator.call_timeout`, a dropped connection): a start dropped between journaling a run
/// and driving it would leave a run that nobody drives and that holds its environment.
async fn finish_even_if_abandoned<T: Send + 'static>(
    change: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(change.in_current_span()).await.map_err(|e| {
        Status::internal(format!(
            "the coordinator failed while applying the call: {e}"
        ))
    })
}

#[tonic::async_trait]
impl op::operator_service_server::OperatorService for OperatorApi {
    #[tracing::instrument(name = "coordinator.grpc.list_agents", skip_all)]
    async fn list_agents(
        &self,
        request: Request<op::ListAgentsRequest>,
    ) -> Result<Response<op::ListAgentsResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let agents = self
            .registry
            .list()
            .into_iter()
            .map(|a: AgentStatus| a.into())
            .collect();
        Ok(Response::new(op::ListAgentsResponse {
            agents,
            epoch: self.epoch.get(),
        }))
    }

    #[tracing::instrument(name = "coordinator.grpc.start_run", skip_all, fields(operator))]
    async fn start_run(
        &self,
        request: Request<op::StartRunRequest>,
    ) -> Result<Response<op::Run>, Status> {
        record_caller(&request);
        let start = start_request(request.get_ref().clone())?;
        let protected = self
            .engine
            .environments()
            .get(&start.environment)
            .is_some_and(|e| e.protected);
        let operator = authorized(
            &request,
            &Call::Run {
                verb: "start",
                kind: start.kind,
                environment: &start.environment,
                protected,
                own_plan: start.plan.is_some(),
            },
        )?;
        let by = crate::engine::Starter::of(&operator);
        let run = finish_even_if_abandoned({
            let engine = self.engine.clone();
            async move { engine.start_run_by(start, Some(by)).await }
        })
        .await?
        .map_err(|e| {
            let text = format!("{e:#}");
            if e.downcast_ref::<crate::engine::RunConflict>().is_some() {
                Status::failed_precondition(text)
            } else {
                Status::invalid_argument(text)
            }
        })?;
        Ok(Response::new(run_to_pb(run)))
    }

    #[tracing::instrument(name = "coordinator.grpc.list_runs", skip_all)]
    async fn list_runs(
        &self,
        request: Request<op::ListRunsRequest>,
    ) -> Result<Response<op::ListRunsResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let runs = self
            .engine
            .list_runs(request.into_inner().limit)
            .await
            .map_err(|e| status_of(&e.into()))?;
        Ok(Response::new(op::ListRunsResponse {
            runs: runs.into_iter().map(run_to_pb).collect(),
        }))
    }

    #[tracing::instrument(name = "coordinator.grpc.get_run", skip_all)]
    async fn get_run(
        &self,
        request: Request<op::GetRunRequest>,
    ) -> Result<Response<op::RunDetail>, Status> {
        authorized(&request, &Call::Read)?;
        let detail = self
            .engine
            .run_detail(&request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        let phases = detail
            .phases
            .into_iter()
            .map(|p| op::PhaseStatus {
                index: p.index,
                name: p.name,
                state: p.state.as_str().to_owned(),
                attempt: p.attempt,
                started_unix_ms: p.started_at.map_or(0, |t| t.timestamp_millis()),
                finished_unix_ms: p.finished_at.map_or(0, |t| t.timestamp_millis()),
                detail: p.detail.unwrap_or_default(),
            })
            .collect();
        let commands = detail
            .commands
            .into_iter()
            .map(|(c, r)| op::CommandStatus {
                command_id: c.command_id,
                phase_index: c.phase_index,
                agent: c.agent,
                action: c.action.as_str().to_owned(),
                attempt: c.attempt,
                epoch: c.epoch.get(),
                outcome: r
                    .as_ref()
                    .map_or_else(String::new, |r| r.outcome.as_str().to_owned()),
                message: r.as_ref().map(|r| r.detail.clone()).unwrap_or_default(),
                replayed: r.is_some_and(|r| r.replayed),
            })
            .collect();
        Ok(Response::new(op::RunDetail {
            run: Some(run_to_pb(detail.run)),
            phases,
            commands,
        }))
    }

    type WatchRunStream = Pin<Box<dyn Stream<Item = Result<op::RunEvent, Status>> + Send>>;

    #[tracing::instrument(name = "coordinator.grpc.watch_run", skip_all)]
    async fn watch_run(
        &self,
        request: Request<op::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        authorized(&request, &Call::Read)?;
        let r = request.into_inner();
        let events = self
            .engine
            .watch_run(&r.id, r.after_seq)
            .await
            .map_err(|e| status_of(&e))?;
        let events = events.map(|e| match e {
            Ok(e) => Ok(op::RunEvent {
                seq: e.seq,
                at_unix_ms: e.at.timestamp_millis(),
                kind: e.kind,
                payload_json: e.payload.to_string(),
            }),
            Err(e) => Err(Status::unavailable(format!("{e:#}"))),
        });
        Ok(Response::new(Box::pin(events)))
    }

    #[tracing::instrument(name = "coordinator.grpc.list_points", skip_all)]
    async fn list_points(
        &self,
        request: Request<op::ListPointsRequest>,
    ) -> Result<Response<op::ListPointsResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let wanted = request.into_inner().environment;
        let listing = self
            .engine
            .list_points((!wanted.is_empty()).then_some(wanted.as_str()))
            .await
            .map_err(|e| match e {
                PointsError::UnknownEnvironment { .. } => Status::not_found(e.to_string()),
                PointsError::Repository(_) => Status::unavailable(e.to_string()),
            })?;
        let points = listing
            .points
            .into_iter()
            .map(|s| op::PointSummary {
                id: s.point.id.to_string(),
                environment: s.point.environment.clone(),
                created_unix_ms: s.point.created_at.timestamp_millis(),
                age_seconds: s.age.as_secs(),
                postgres_bytes: s.point.postgres.as_ref().map_or(0, |pg| pg.size),
                objects: s.point.objects.as_ref().map_or(0, |o| o.objects),
                object_bytes: s.point.objects.as_ref().map_or(0, |o| o.bytes),
                rpo_seconds: s.rpo.as_secs(),
                stale: s.stale,
                secret_refs: s.point.secrets.len() as u32,
                sequence: s.point.sequence.unwrap_or(0),
                stamped_ahead_seconds: s.stamped_ahead.map_or(0, |d| d.as_secs()),
            })
            .collect();
        let windows = listing
            .windows
            .into_iter()
            .map(|(environment, w)| op::RecoveryWindow {
                environment,
                earliest_unix_ms: w.earliest.timestamp_millis(),
                latest_unix_ms: w.latest.timestamp_millis(),
                newest_segment: w.newest_segment,
                gap_at: w.gap_at.unwrap_or_default(),
                base_backups: w.base_backups as u32,
                provider: false,
            })
            .chain(
                listing
                    .provider_windows
                    .into_iter()
                    .map(|environment| op::RecoveryWindow {
                        environment,
                        provider: true,
                        ..op::RecoveryWindow::default()
                    }),
            )
            .collect();
        Ok(Response::new(op::ListPointsResponse {
            points,
            damaged: listing.damaged,
            windows,
        }))
    }

    #[tracing::instrument(name = "coordinator.grpc.prune_points", skip_all, fields(operator))]
    async fn prune_points(
        &self,
        request: Request<op::PrunePointsRequest>,
    ) -> Result<Response<op::JsonResponse>, Status> {
        record_caller(&request);
        let dry_run = request.get_ref().dry_run;
        authorized(&request, &Call::PrunePoints { dry_run })?;
        let r = request.into_inner();
        let report = self
            .engine
            .prune_points(&r.environment, r.dry_run)
            .await
            .map_err(|e| status_of(&e))?;
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Status::internal(format!("encode the prune report: {e}")))?;
        Ok(Response::new(op::JsonResponse { json, ok: true }))
    }

    #[tracing::instrument(name = "coordinator.grpc.verify_point", skip_all)]
    async fn verify_point(
        &self,
        request: Request<op::VerifyPointRequest>,
    ) -> Result<Response<op::JsonResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let r = request.into_inner();
        let report = self
            .engine
            .verify_point(&r.id, r.full)
            .await
            .map_err(|e| status_of(&e))?;
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Status::internal(format!("encode the verify report: {e}")))?;
        Ok(Response::new(op::JsonResponse {
            json,
            ok: report.is_ok(),
        }))
    }

    #[tracing::instrument(name = "coordinator.grpc.get_report", skip_all)]
    async fn get_report(
        &self,
        request: Request<op::GetReportRequest>,
    ) -> Result<Response<op::GetReportResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let r = request.into_inner();
        let report = self
            .engine
            .report(&r.id, &r.follow_ups)
            .await
            .map_err(|e| status_of(&e))?;
        let text = match r.format.as_str() {
            "" | "md" | "markdown" => report.to_markdown(),
            "json" => serde_json::to_string_pretty(&report.to_json())
                .map_err(|e| Status::internal(format!("encode the report: {e}")))?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "report format {other:?} is not md or json"
                )));
            }
        };
        Ok(Response::new(op::GetReportResponse { text }))
    }

    #[tracing::instrument(name = "coordinator.grpc.dry_run", skip_all)]
    async fn dry_run(
        &self,
        request: Request<op::StartRunRequest>,
    ) -> Result<Response<op::DryRunResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let start = start_request(request.into_inner())?;
        let text = self
            .engine
            .dry_run(&start)
            .await
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(Response::new(op::DryRunResponse { text }))
    }

    #[tracing::instrument(name = "coordinator.grpc.control_run", skip_all, fields(operator))]
    async fn control_run(
        &self,
        request: Request<op::ControlRunRequest>,
    ) -> Result<Response<op::Run>, Status> {
        record_caller(&request);
        let r = request.get_ref().clone();
        let control = match op::RunControl::try_from(r.control) {
            Ok(op::RunControl::Resume) => crate::engine::Control::Resume,
            Ok(op::RunControl::Retry) => crate::engine::Control::Retry,
            Ok(op::RunControl::Abort) => crate::engine::Control::Abort,
            Ok(op::RunControl::Undo) => crate::engine::Control::Undo { force: r.force },
            _ => {
                return Err(Status::invalid_argument(
                    "control must be resume, retry, abort or undo",
                ));
            }
        };
        let (verb, kind) = match control {
            crate::engine::Control::Resume => ("resume", None),
            crate::engine::Control::Retry => ("retry", None),
            crate::engine::Control::Abort => ("abort", None),
            crate::engine::Control::Undo { .. } => ("start", Some(crate::store::RunKind::Undo)),
        };
        let operator = self.authorize_on_run(&request, &r.id, verb, kind).await?;
        let by = crate::engine::Starter::of(&operator);
        let run = finish_even_if_abandoned({
            let engine = self.engine.clone();
            async move { engine.control_by(&r.id, control, Some(by)).await }
        })
        .await?
        .map_err(|e| status_of(&e))?;
        Ok(Response::new(run_to_pb(run)))
    }

    #[tracing::instrument(name = "coordinator.grpc.decide_run", skip_all, fields(operator))]
    async fn decide_run(
        &self,
        request: Request<op::DecideRunRequest>,
    ) -> Result<Response<op::DecideRunResponse>, Status> {
        record_caller(&request);
        let r = request.get_ref().clone();
        let verb = if r.approve { "approve" } else { "reject" };
        let operator = self.authorize_on_run(&request, &r.id, verb, None).await?;
        let by = crate::engine::Starter::of(&operator);
        let (run, message) = finish_even_if_abandoned({
            let engine = self.engine.clone();
            async move { engine.decide(&r.id, &by, r.approve, &r.reason).await }
        })
        .await?
        .map_err(|e| {
            if e.downcast_ref::<crate::engine::DecisionRefused>().is_some() {
                Status::permission_denied(format!("{e:#}"))
            } else {
                status_of(&e)
            }
        })?;
        Ok(Response::new(op::DecideRunResponse {
            run: Some(run_to_pb(run)),
            message,
        }))
    }

    #[tracing::instrument(name = "coordinator.grpc.list_kept", skip_all)]
    async fn list_kept(
        &self,
        request: Request<op::ListKeptRequest>,
    ) -> Result<Response<op::KeptResponse>, Status> {
        authorized(&request, &Call::Read)?;
        let r = request.into_inner();
        let listing = self
            .engine
            .list_kept(&r.environment)
            .await
            .map_err(|e| status_of(&e))?;
        let now = chrono::Utc::now();
        Ok(Response::new(op::KeptResponse {
            copies: listing
                .copies
                .iter()
                .map(|c| kept_to_pb(c, None, now))
                .collect(),
            problems: listing.problems,
        }))
    }

    #[tracing::instrument(name = "coordinator.grpc.prune_kept", skip_all, fields(operator))]
    async fn prune_kept(
        &self,
        request: Request<op::PruneKeptRequest>,
    ) -> Result<Response<op::KeptResponse>, Status> {
        record_caller(&request);
        let dry_run = request.get_ref().dry_run;
        authorized(&request, &Call::PruneKept { dry_run })?;
        let r = request.into_inner();
        let rules = crate::engine::kept::PruneRules {
            keep_last: r
                .keep_last
                .unwrap_or(crate::engine::kept::DEFAULT_KEEP_LAST),
            older_than: (r.older_than_seconds > 0)
                .then(|| Duration::from_secs(r.older_than_seconds)),
        };
        let outcome = finish_even_if_abandoned({
            let engine = self.engine.clone();
            async move { engine.prune_kept(&r.environment, r.dry_run, rules).await }
        })
        .await?
        .map_err(|e| status_of(&e))?;
        let now = chrono::Utc::now();
        Ok(Response::new(op::KeptResponse {
            copies: outcome
                .decisions
                .iter()
                .map(|(c, v)| kept_to_pb(c, Some(v), now))
                .collect(),
            problems: outcome.problems,
        }))
    }
}

impl OperatorApi {
    /// Admits the caller to `verb` run `id` (of `kind`, else the run's own kind), by the
    /// role its environment asks for; an unknown run is `NotFound`.
    async fn authorize_on_run<T>(
        &self,
        request: &Request<T>,
        id: &str,
        verb: &str,
        kind: Option<crate::store::RunKind>,
    ) -> Result<Operator, Status> {
        let run = self
            .engine
            .store()
            .run(id)
            .await
            .map_err(|e| status_of(&e.into()))?
            .ok_or_else(|| Status::not_found(format!("no run {id}; `rollcall runs` lists them")))?;
        let env = self.engine.environments().get(&run.environment);
        let protected = env.is_some_and(|e| e.protected);
        // A backup that does not follow the built-in backup plan was sent with a plan of its
        // starter's: acting on it takes what starting it took (the text differs too when the
        // fleet changed since, which only asks for more).
        let own_plan = run.kind == crate::store::RunKind::Backup
            && env.is_none_or(|e| {
                e.backup_plan.source != run.plan && crate::plan::BASE_BACKUP_PLAN != run.plan
            });
        authorized(
            request,
            &Call::Run {
                verb,
                kind: kind.unwrap_or(run.kind),
                environment: &run.environment,
                protected,
                own_plan,
            },
        )
    }
}

fn kept_to_pb(
    c: &crate::engine::kept::KeptCopy,
    verdict: Option<&crate::engine::kept::Verdict>,
    now: chrono::DateTime<chrono::Utc>,
) -> op::KeptCopy {
    use crate::engine::kept::Verdict;
    let (decision, reason) = match verdict {
        None => ("", String::new()),
        Some(Verdict::Prune) => ("prune", String::new()),
        Some(Verdict::Pruned) => ("pruned", String::new()),
        Some(Verdict::Keep(why)) => ("keep", why.clone()),
        Some(Verdict::Failed(why)) => ("failed", why.clone()),
    };
    op::KeptCopy {
        kind: c.kind.as_str().to_owned(),
        name: c.name.clone(),
        agent: c.agent.as_ref().map(|a| a.to_string()).unwrap_or_default(),
        tag: c.tag.clone(),
        bytes: c.bytes,
        objects: c.objects,
        sessions: c.sessions,
        run_id: c.run.clone().unwrap_or_default(),
        run_state: c.run_state.map(|s| s.to_string()).unwrap_or_default(),
        undo_run_id: c.undo_run.clone().unwrap_or_default(),
        made_unix_ms: c.made_at.map_or(0, |t| t.timestamp_millis()),
        age_seconds: c
            .made_at
            .map_or(0, |t| (now - t).num_seconds().max(0) as u64),
        decision: decision.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::model::{AgentName, Environment, Role};

    fn hello(name: &str, role: &str) -> Hello {
        Hello {
            name: AgentName::parse(name).expect("name"),
            role: Role::parse(role).expect("role"),
            environment: Environment::parse("dev").expect("env"),
            capabilities: vec![],
            version: "0.1.0".into(),
            highest_epoch: None,
        }
    }

    fn agent(name: &str, role: &str) -> Identity {
        Identity::Agent {
            name: AgentName::parse(name).expect("name"),
            role: Role::parse(role).expect("role"),
        }
    }

    #[test]
    fn agent_must_match_its_certificate() {
        assert!(authorize_agent(&[agent("w-1", "web")], &hello("w-1", "web")).is_ok());
        let e = authorize_agent(&[agent("w-1", "web")], &hello("w-1", "worker")).expect_err("role");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("claims role worker, but its certificate carries role web")
        );
        let e = authorize_agent(&[agent("w-2", "web")], &hello("w-1", "web")).expect_err("name");
        assert!(
            e.message().contains("certificate of agent w-2"),
            "{}",
            e.message()
        );
        let e = authorize_agent(
            &[Identity::Operator {
                name: "ops".into(),
                role: OperatorRole::Admin,
            }],
            &hello("w-1", "web"),
        )
        .expect_err("operator cert");
        assert!(
            e.message().contains("carries no agent identity"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn operator_needs_a_certificate_or_a_known_token() {
        let auth = OperatorAuth {
            tokens: Arc::new(vec![
                OperatorToken {
                    name: "vera".into(),
                    role: OperatorRole::Viewer,
                    sha256: token_hash("look"),
                },
                OperatorToken {
                    name: "token".into(),
                    role: OperatorRole::Admin,
                    sha256: token_hash("s3cret"),
                },
            ]),
        };
        let bearer = |token: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
            headers
        };
        let bare = http::HeaderMap::new();
        assert_eq!(
            auth.check(&[], &bare).expect_err("bare").code(),
            tonic::Code::Unauthenticated
        );

        assert_eq!(
            auth.check(&[], &bearer("s3cret")).expect("known token"),
            Operator {
                name: "token".into(),
                role: OperatorRole::Admin,
                via: Via::Token
            }
        );
        // A named token carries its name and role.
        assert_eq!(
            auth.check(&[], &bearer("look")).expect("named token"),
            Operator {
                name: "vera".into(),
                role: OperatorRole::Viewer,
                via: Via::Token
            }
        );

        let e = auth.check(&[], &bearer("nope")).expect_err("wrong token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("nope"), "never echo a token");

        let ops = Identity::Operator {
            name: "ops".into(),
            role: OperatorRole::Admin,
        };
        assert_eq!(
            auth.check(&[ops], &bare).expect("operator certificate"),
            Operator {
                name: "ops".into(),
                role: OperatorRole::Admin,
                via: Via::Certificate
            }
        );
        // A certificate's role wins over any token sent with it.
        let bob = Identity::Operator {
            name: "bob".into(),
            role: OperatorRole::Viewer,
        };
        assert_eq!(
            auth.check(&[bob], &bearer("s3cret"))
                .expect("viewer certificate")
                .role,
            OperatorRole::Viewer
        );

        let e = auth
            .check(&[agent("w-1", "web")], &bare)
            .expect_err("agent certificate");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "agent certificates cannot call the operator API; use the operator certificate"
        );
    }
}
