//! Logging, OpenTelemetry traces and process signals.
//!
//! Logs go to stderr as plain or JSON lines, filtered by `RUST_LOG` (default `info`); a log
//! line names the spans it happened in only with `--log-spans`, because formatting the
//! fields of every request's spans for the log cost a quarter of the message throughput. When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans
//! are also exported over OTLP/gRPC, in batches, filtered by `BLUETICK_OTEL_FILTER`
//! (default `info`). The standard `OTEL_*` variables (service name, sampler, headers,
//! timeout) apply. See [`crate::trace`] for how a trace crosses services.

use clap::builder::BoolishValueParser;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How a binary logs: the flags every bluetick binary shares (`#[command(flatten)]`). Their
/// environment variables take `1`/`true`/`yes`/`on` and `0`/`false`/`no`/`off`.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Log JSON lines.
    #[arg(long = "log-json", env = "BLUETICK_LOG_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Name the spans (request, frame, push) a log line happened in, with their fields.
    /// Costs about a quarter of the message throughput: every span's fields are formatted
    /// whether or not anything is logged inside it. Traces carry the same context (OTLP).
    #[arg(long = "log-spans", env = "BLUETICK_LOG_SPANS", value_parser = BoolishValueParser::new())]
    pub spans: bool,
}

/// Keeps the trace exporter alive; dropping it flushes and stops it. Hold it in `main`.
#[derive(Debug)]
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider_opt: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Returns true if spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.provider_opt.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider_opt.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace exporter did not shut down cleanly");
        }
    }
}

/// Returns true if the standard OTLP endpoint variables ask for trace export.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}

/// Installs the global tracing subscriber: `RUST_LOG` filtering (default `info`), plain or
/// JSON lines on stderr as `log` asks, and OTLP trace export for `service_name` when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Must run inside the tokio runtime (the exporter's
/// channel lives on it).
pub fn init_tracing(service_name: &'static str, log: LogArgs) -> TelemetryGuard {
    let provider_opt = if otlp_configured() {
        match otlp_provider(service_name) {
            Ok(provider) => Some(provider),
            Err(error) => {
                eprintln!("OTLP trace export disabled: {error}");
                None
            }
        }
    } else {
        None
    };
    let guard = init_tracing_with_provider(log, provider_opt);
    if guard.exports_traces() {
        tracing::info!(service = service_name, "exporting traces over OTLP");
    }
    guard
}

/// Installs the global tracing subscriber like [`init_tracing`], exporting spans through
/// `provider_opt` if given (tests pass one with an in-memory exporter). Does nothing if a
/// global subscriber is already installed.
///
/// Without `log.spans` the log layer sees events only, so when no spans are exported either
/// no span is even created: the per-request spans cost nothing unless someone reads them.
pub fn init_tracing_with_provider(
    log: LogArgs,
    provider_opt: Option<SdkTracerProvider>,
) -> TelemetryGuard {
    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log_spans = log.spans;
    let log_filter = env_filter.and(filter_fn(move |metadata| log_spans || metadata.is_event()));
    let log_layer = if log.json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let otel_layer_opt = provider_opt.as_ref().map(|provider| {
        let span_filter = EnvFilter::try_from_env("BLUETICK_OTEL_FILTER")
            .unwrap_or_else(|_| EnvFilter::new("info"));
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("bluetick"))
            .with_filter(span_filter)
    });
    let registry = tracing_subscriber::registry().with(log_layer.with_filter(log_filter));
    // Not `.with(Option<Layer>)`: an absent layer there still asks for every span.
    let _ = match otel_layer_opt {
        Some(otel_layer) => registry.with(otel_layer).try_init(),
        None => registry.try_init(),
    };
    TelemetryGuard { provider_opt }
}

/// Returns a tracer provider exporting over OTLP/gRPC to the endpoint in the environment.
fn otlp_provider(service_name: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Returns a token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}
