//! The tower layers in front of the gRPC services, and their limits.
//!
//! Operator API, outermost first: [`OperatorAuthLayer`] (an operator certificate or a known
//! bearer token, else refused; who called goes into the request's extensions), a limit on
//! calls in flight (`operator.max_concurrent_calls`; one more is refused at once), and a
//! deadline (`operator.call_timeout`) on every call but the [`LONG_CALLS`].
//!
//! Agents' `Attach`: new attachments are admitted at `agents.attach_rate` a second; up to one
//! second's worth more wait their turn, and the rest are refused with `Unavailable`. An agent
//! logs the refusal and retries with its usual backoff, so a reconnect storm after a
//! coordinator restart is admitted at a bounded pace instead of all at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use api::pb::operator::operator_service_server::OperatorServiceServer;
use futures::future::{Either, Ready, ready};
use tonic::Status;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::steer::{Picker, Steer};
use tower::timeout::Timeout;
use tower::util::{MapErr, Oneshot, ServiceExt};
use tower::{BoxError, Layer, Service};

use crate::grpc::{OperatorApi, OperatorAuth};
pub use crate::limits::{
    DEFAULT_ATTACH_RATE, DEFAULT_OPERATOR_CALL_TIMEOUT, DEFAULT_OPERATOR_CALLS, LONG_CALLS, Limits,
};
use crate::metrics::CallRefusals;
use crate::tls;

type GrpcRequest = http::Request<tonic::body::Body>;

/// Authenticates operator calls; see [`OperatorAuth::check`].
#[derive(Clone)]
pub struct OperatorAuthLayer {
    auth: OperatorAuth,
}

impl OperatorAuthLayer {
    pub fn new(auth: OperatorAuth) -> Self {
        OperatorAuthLayer { auth }
    }
}

impl<S> Layer<S> for OperatorAuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// A service whose calls are authenticated first: refused ones never reach `S` (nor use up
/// its capacity); admitted ones carry their [`crate::grpc::Operator`] as an extension.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: OperatorAuth,
}

impl<S, B, ResBody> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, Oneshot<S, http::Request<B>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is readied per admitted call (below), so a refused call costs it
        // nothing.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let identities = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .map(|certs| tls::identities(&certs))
            .unwrap_or_default();
        match self.auth.check(&identities, request.headers()) {
            Ok(operator) => {
                request.extensions_mut().insert(operator);
                Either::Right(self.inner.clone().oneshot(request))
            }
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

/// Puts `timeout` on every operator call but the [`LONG_CALLS`].
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    timeout: Duration,
}

impl DeadlineLayer {
    pub fn new(timeout: Duration) -> Self {
        DeadlineLayer { timeout }
    }
}

type Untimed<S> = MapErr<S, fn(<S as Service<GrpcRequest>>::Error) -> BoxError>;

impl<S> Layer<S> for DeadlineLayer
where
    S: Service<GrpcRequest> + Clone,
    S::Error: Into<BoxError>,
{
    type Service = Steer<tower::util::Either<Timeout<S>, Untimed<S>>, ByDeadline, GrpcRequest>;

    fn layer(&self, inner: S) -> Self::Service {
        let untimed: Untimed<S> = MapErr::new(inner.clone(), Into::into);
        Steer::new(
            [
                tower::util::Either::Left(Timeout::new(inner, self.timeout)),
                tower::util::Either::Right(untimed),
            ],
            ByDeadline,
        )
    }
}

/// Steers an operator call to the timed service (0) or, for the [`LONG_CALLS`], the untimed
/// one (1).
#[derive(Debug, Clone, Copy)]
pub struct ByDeadline;

impl<S, B> Picker<S, http::Request<B>> for ByDeadline {
    fn pick(&mut self, request: &http::Request<B>, _services: &[S]) -> usize {
        usize::from(is_long_call(request.uri().path()))
    }
}

fn is_long_call(path: &str) -> bool {
    let service = <OperatorServiceServer<OperatorApi> as NamedService>::NAME;
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(s, method)| s == service && LONG_CALLS.contains(&method))
}

/// Turns what the operator layers refuse (a full house, a deadline) into a status that says
/// which limit it met, and counts it.
pub fn operator_refusal(
    limits: &Limits,
    refusals: Arc<CallRefusals>,
) -> impl Fn(BoxError) -> BoxError + Clone + Send + Sync + 'static {
    let (calls, timeout) = (limits.operator_calls, limits.operator_call_timeout);
    move |e: BoxError| {
        if e.is::<tower::load_shed::error::Overloaded>() {
            refusals.operator_refused("busy");
            return Box::new(Status::resource_exhausted(format!(
                "the coordinator is serving {calls} operator calls already \
                 (operator.max_concurrent_calls); try again in a moment"
            )));
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            refusals.operator_refused("timeout");
            return Box::new(Status::deadline_exceeded(format!(
                "the coordinator did not answer within {} (operator.call_timeout); a run this \
                 call started or changed goes on: `rollcall runs` shows it",
                humantime::format_duration(timeout)
            )));
        }
        e
    }
}

/// Turns an attachment the rate limit refused into `Unavailable` (an agent retries with
/// backoff), counts it, and logs at most one line a second while a storm lasts.
pub fn attach_refusal(
    limits: &Limits,
    refusals: Arc<CallRefusals>,
) -> impl Fn(BoxError) -> BoxError + Clone + Send + Sync + 'static {
    let rate = per_second(limits);
    let last_logged = Arc::new(AtomicU64::new(0));
    move |e: BoxError| {
        if !e.is::<tower::load_shed::error::Overloaded>() {
            return e;
        }
        let before = refusals.attach_throttled();
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if last_logged.swap(second, Ordering::Relaxed) != second {
            tracing::warn!(
                refused = before + 1,
                "refusing agent attachments over agents.attach_rate ({rate}); the agents \
                 retry with backoff"
            );
        }
        Box::new(Status::unavailable(format!(
            "too many agents attaching at once: the coordinator admits {rate} \
             (agents.attach_rate)"
        )))
    }
}

fn per_second(limits: &Limits) -> String {
    if limits.attach_window == Duration::from_secs(1) {
        format!("{} a second", limits.attaches)
    } else {
        format!(
            "{} per {}",
            limits.attaches,
            humantime::format_duration(limits.attach_window)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::{Operator, OperatorToken, Via, token_hash};
    use std::sync::Mutex;

    fn auth_layer() -> OperatorAuthLayer {
        OperatorAuthLayer::new(OperatorAuth {
            tokens: Arc::new(vec![OperatorToken {
                name: "token".into(),
                role: api::identity::OperatorRole::Admin,
                sha256: token_hash("s3cret"),
            }]),
        })
    }

    fn with_token(token: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::new(());
        if let Some(t) = token {
            request.headers_mut().insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        request
    }

    async fn status_of(
        service: impl Service<
            http::Request<()>,
            Response = http::Response<()>,
            Error = std::convert::Infallible,
        >,
        request: http::Request<()>,
    ) -> Option<Status> {
        let response = service.oneshot(request).await.expect("infallible");
        Status::from_header_map(response.headers())
    }

    #[tokio::test]
    async fn the_layer_refuses_bad_tokens_and_hands_the_caller_on() {
        // A handler that records the caller the layer left in the extensions.
        let seen: Arc<Mutex<Vec<Option<Operator>>>> = Arc::default();
        let handler = {
            let seen = seen.clone();
            tower::service_fn(move |request: http::Request<()>| {
                let seen = seen.clone();
                async move {
                    let caller = request.extensions().get::<Operator>().cloned();
                    seen.lock().expect("lock").push(caller);
                    Ok::<_, std::convert::Infallible>(http::Response::new(()))
                }
            })
        };
        let service = auth_layer().layer(handler);

        let refused = status_of(service.clone(), with_token(Some("nope")))
            .await
            .expect("a status");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused
                .message()
                .starts_with("operator token not recognised"),
            "{}",
            refused.message()
        );
        assert!(!refused.message().contains("nope"), "never echo a token");

        let bare = status_of(service.clone(), with_token(None))
            .await
            .expect("a status");
        assert_eq!(bare.code(), tonic::Code::Unauthenticated);
        assert!(
            seen.lock().expect("lock").is_empty(),
            "refused calls never reach the handler"
        );

        let admitted = status_of(service, with_token(Some("s3cret"))).await;
        assert!(admitted.is_none(), "{admitted:?}");
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![Some(Operator {
                name: "token".into(),
                role: api::identity::OperatorRole::Admin,
                via: Via::Token
            })]
        );
    }

    #[test]
    fn long_calls_have_no_deadline() {
        assert!(is_long_call(
            "/rollcall.operator.v1.OperatorService/WatchRun"
        ));
        assert!(is_long_call(
            "/rollcall.operator.v1.OperatorService/VerifyPoint"
        ));
        assert!(!is_long_call(
            "/rollcall.operator.v1.OperatorService/GetRun"
        ));
        assert!(!is_long_call(
            "/rollcall.operator.v1.OperatorService/StartRun"
        ));
        assert!(!is_long_call("/other.Service/WatchRun"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_says_which_limit_it_met() {
        // A handler that never answers.
        let slow = tower::service_fn(|_: GrpcRequest| async {
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let refusals = Arc::new(CallRefusals::default());
        let limits = Limits {
            operator_call_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let service = tower::ServiceBuilder::new()
            .map_err(operator_refusal(&limits, refusals.clone()))
            .layer(DeadlineLayer::new(limits.operator_call_timeout))
            .service(slow);
        let call = |method: &str| {
            http::Request::builder()
                .uri(format!("/rollcall.operator.v1.OperatorService/{method}"))
                .body(tonic::body::Body::empty())
                .expect("request")
        };
        let e = service
            .clone()
            .oneshot(call("ListRuns"))
            .await
            .expect_err("past the deadline");
        let status = Status::from_error(e);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status
                .message()
                .contains("within 5s (operator.call_timeout)"),
            "{}",
            status.message()
        );
        assert_eq!(refusals.operator_refusals("timeout"), 1);
        // A watch outlives the deadline many times over.
        let watch =
            tokio::time::timeout(Duration::from_secs(3600), service.oneshot(call("WatchRun")));
        assert!(watch.await.is_err(), "WatchRun has no deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn attachments_over_the_rate_wait_their_turn_or_are_refused() {
        let attached = tower::service_fn(|_: GrpcRequest| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let limits = Limits {
            attaches: 1,
            attach_window: Duration::from_secs(1),
            ..Limits::default()
        };
        let refusals = Arc::new(CallRefusals::default());
        let service = tower::ServiceBuilder::new()
            .map_err(attach_refusal(&limits, refusals.clone()))
            .load_shed()
            .buffer(limits.attach_queue())
            .rate_limit(limits.attaches, limits.attach_window)
            .service(attached);
        let attach = || {
            http::Request::builder()
                .uri("/rollcall.agent.v1.AgentService/Attach")
                .body(tonic::body::Body::empty())
                .expect("request")
        };
        let started = tokio::time::Instant::now();

        service
            .clone()
            .oneshot(attach())
            .await
            .expect("the first is admitted");
        // The second waits for the next window, holding the one place in the queue ...
        let mut second = Box::pin(service.clone().oneshot(attach()));
        assert!(futures::poll!(&mut second).is_pending());
        // ... so a third is refused at once, with a status an agent retries on.
        let refused = service
            .clone()
            .oneshot(attach())
            .await
            .expect_err("over the rate and the queue");
        let status = Status::from_error(refused);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.message(),
            "too many agents attaching at once: the coordinator admits 1 a second \
             (agents.attach_rate)"
        );
        assert_eq!(refusals.attaches_throttled(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);

        second
            .await
            .expect("the waiting one is admitted in the next window");
        assert!(started.elapsed() >= Duration::from_secs(1));
    }
}
