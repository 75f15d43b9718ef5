//! Logging and tracing for every `rollcall` process: `tracing` logs to stderr (human or
//! JSON), and OTLP trace export when an endpoint is configured. The W3C propagator is always
//! installed, so trace context flows through commands even when this process exports nothing.

use anyhow::{Context, Result};
use api::config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
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
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,sqlx=warn"));
    let fmt = match config.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
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
                .with_batch_exporter(exporter)
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

/// Logs for short operator commands: warnings and errors only, no export.
pub fn init_quiet() {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
}
