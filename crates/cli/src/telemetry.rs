//! Logging and tracing for every `rollcall` process: `tracing` logs to stderr (human or
//! JSON), and OTLP trace export when an endpoint is configured. The W3C propagator is always
//! installed, so trace context flows through commands even when this process exports nothing.

use anyhow::{Context, Result};
use api::config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::Status;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes buffered spans when the process ends; call `shutdown` before exiting.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!("flush traces: {e}");
        }
    }
}

/// Sets up logs and, for long-running processes, trace export. `service` names this process
/// in traces (`rollcall-coordinator`, `rollcall-agent`); `instance` tells agents apart.
pub fn init(service: &str, instance: Option<&str>, config: &TelemetryConfig) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new(api::DEFAULT_LOG_FILTER));
    let fmt = match config.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(RedactedStderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(RedactedStderr)
            .boxed(),
    };
    let endpoint = config
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty());
    let (otel, provider) = match endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| {
                    format!("set up OTLP trace export to {endpoint} (telemetry.otlp_endpoint)")
                })?;
            let mut resource = Resource::builder().with_service_name(service.to_owned());
            if let Some(instance) = instance {
                resource = resource.with_attribute(opentelemetry::KeyValue::new(
                    "service.instance.id",
                    instance.to_owned(),
                ));
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(Redacting(exporter))
                .with_resource(resource.build())
                .build();
            let tracer = provider.tracer("rollcall");
            opentelemetry::global::set_tracer_provider(provider.clone());
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("install the log subscriber")?;
    Ok(Telemetry { provider })
}

/// A span exporter that passes every span through `api::redact` first: span and event names,
/// string attributes (a value under a key that names a secret is blanked), link attributes and
/// error descriptions. Nothing leaves the process in a trace that a log line could not carry.
#[derive(Debug)]
struct Redacting<E>(E);

impl<E: SpanExporter> SpanExporter for Redacting<E> {
    fn export(
        &self,
        mut batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        for span in &mut batch {
            redact_span(span);
        }
        self.0.export(batch)
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

fn redact_span(span: &mut SpanData) {
    redact_cow(&mut span.name);
    redact_attributes(&mut span.attributes);
    for event in &mut span.events.events {
        redact_cow(&mut event.name);
        redact_attributes(&mut event.attributes);
    }
    for link in &mut span.links.links {
        redact_attributes(&mut link.attributes);
    }
    if let Status::Error { description } = &mut span.status {
        redact_cow(description);
    }
}

fn redact_cow(text: &mut std::borrow::Cow<'static, str>) {
    if let std::borrow::Cow::Owned(clean) = api::redact::redact(text) {
        *text = clean.into();
    }
}

fn redact_attributes(attributes: &mut [KeyValue]) {
    for kv in attributes {
        if api::redact::is_secret_key(kv.key.as_str()) {
            kv.value = Value::from(api::redact::MARKER);
            continue;
        }
        match &mut kv.value {
            Value::String(s) => {
                if let std::borrow::Cow::Owned(clean) = api::redact::redact(s.as_str()) {
                    *s = clean.into();
                }
            }
            Value::Array(Array::String(items)) => {
                for s in items {
                    if let std::borrow::Cow::Owned(clean) = api::redact::redact(s.as_str()) {
                        *s = clean.into();
                    }
                }
            }
            _ => {}
        }
    }
}

/// Logs for short operator commands: warnings and errors only, no export.
pub fn init_quiet() {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(RedactedStderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
}

/// Log lines go to stderr through `api::redact`: a token, password or key that reaches a log
/// message (an error from a tool, a URL) is removed before it is written.
#[derive(Clone, Copy)]
struct RedactedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = RedactedLine<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactedLine::new(std::io::stderr())
    }
}

/// Collects one formatted event and writes it, redacted, when dropped.
struct RedactedLine<W: std::io::Write> {
    buf: Vec<u8>,
    out: W,
}

impl<W: std::io::Write> RedactedLine<W> {
    fn new(out: W) -> Self {
        RedactedLine {
            buf: Vec::with_capacity(256),
            out,
        }
    }
}

impl<W: std::io::Write> std::io::Write for RedactedLine<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: std::io::Write> Drop for RedactedLine<W> {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let _ = self.out.write_all(api::redact::redact(&text).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Keeps what it is given, for the test to read.
    #[derive(Debug, Clone, Default)]
    struct Keep(std::sync::Arc<std::sync::Mutex<Vec<SpanData>>>);

    impl SpanExporter for Keep {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(mut kept) = self.0.lock() {
                kept.extend(batch);
            }
            Ok(())
        }
    }

    #[test]
    fn spans_are_redacted_before_they_are_exported() {
        let kept = Keep::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(Redacting(kept.clone()))
            .build();
        let tracer = provider.tracer("test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "agent.command.execute",
                url = "postgres://app:hunter2@db:5432/app",
                token = "plain-value-under-a-secret-key",
                path = "/home/alice/agent.toml",
                command_id = "run-1/verify/db-1/a1/s0/r0",
            );
            let _entered = span.enter();
            tracing::warn!(
                detail =
                    "Authorization: Bearer cws_operator_a8ceeae5c1456acd6ca23d0a3c1b09f564b7cbe5",
                "check failed for alice.smith@example.com"
            );
        });
        let _ = provider.force_flush();
        let spans = kept.0.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(spans.len(), 1, "{spans:?}");
        let text = format!("{spans:?}");
        for secret in [
            "hunter2",
            "plain-value-under-a-secret-key",
            "/home/alice",
            "cws_operator_a8ce",
            "alice.smith",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        for kept in [
            "postgres://app:***@db:5432/app",
            "run-1/verify/db-1/a1/s0/r0",
            "agent.command.execute",
            "/home/[REDACTED]/agent.toml",
        ] {
            assert!(text.contains(kept), "{kept} missing: {text}");
        }
    }

    #[test]
    fn log_lines_are_redacted_before_they_are_written() {
        let mut out = Vec::new();
        {
            let mut line = RedactedLine::new(&mut out);
            let _ = writeln!(
                line,
                "WARN connect to postgres://rollcall:hunter2@db:5432/state failed; \
                 Authorization: Bearer cws_operator_a8ceeae5c1456acd6ca23d0a3c1b09f564b7cbe5"
            );
        }
        let written = String::from_utf8(out).unwrap_or_default();
        assert!(!written.contains("hunter2"), "{written}");
        assert!(!written.contains("cws_operator_a8ce"), "{written}");
        assert!(
            written.contains("postgres://rollcall:***@db:5432/state"),
            "{written}"
        );
    }
}
