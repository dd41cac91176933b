//! W3C trace context across every internal gRPC hop, so one message is one trace.
//!
//! - Client side: [`traced`] wraps a channel with [`InjectTraceContext`], which writes the
//!   `traceparent` (and `tracestate`) of the span current when the call is made into the
//!   request metadata. Clients of other services are `FooClient<TracedChannel>`.
//! - Server side: [`ServerTraceLayer`] (applied by [`crate::server::serve`]) reads those
//!   headers and opens the request span `grpc.server` as a child of the caller's span, so the
//!   handler and every call it makes belong to the caller's trace.
//! - Hand-offs between tasks (a session's ops worker, the push queues of
//!   [`crate::push::GatewayPusher`]) carry a [`Span`] or an [`opentelemetry::Context`] with
//!   each queued item; see [`current_context`] and [`batch_span`].
//!
//! Spans carry ids (message, device, client message id, method), never payloads. When no
//! OpenTelemetry layer is installed (no `OTEL_EXPORTER_OTLP_ENDPOINT`), the contexts are
//! empty and nothing is injected.

use std::task::{Context as TaskContext, Poll};

use crate::channel::InternalChannel;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tracing::Span;
use tracing::instrument::{Instrument, Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// An internal channel whose calls carry the caller's trace context.
pub type TracedChannel = InterceptedService<InternalChannel, InjectTraceContext>;

/// Returns `channel` with the trace context of the current span injected into every call.
pub fn traced(channel: InternalChannel) -> TracedChannel {
    InterceptedService::new(channel, InjectTraceContext)
}

/// A client interceptor that writes the current span's W3C trace context into the request
/// metadata (`traceparent`, `tracestate`).
#[derive(Clone, Copy, Debug, Default)]
pub struct InjectTraceContext;

impl Interceptor for InjectTraceContext {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject(&Span::current().context(), request.metadata_mut());
        Ok(request)
    }
}

/// Writes `context` into `metadata` as W3C trace context headers; nothing when the context
/// holds no valid span.
pub fn inject(context: &opentelemetry::Context, metadata: &mut MetadataMap) {
    if !context.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(context, &mut MetadataInjector(metadata));
}

/// Returns the trace context carried by `headers` (empty when there is none).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Returns the OpenTelemetry context of the current span, to carry with work queued for
/// another task (cheap; empty when tracing to OpenTelemetry is off).
pub fn current_context() -> opentelemetry::Context {
    Span::current().context()
}

/// Returns a span for work done on behalf of several queued items: its parent is the first
/// item's context and the others are attached as links. A batch of messages is therefore
/// part of the first message's trace, and the other messages' traces point at it.
pub fn batch_span<'a>(
    span: Span,
    contexts: impl IntoIterator<Item = &'a opentelemetry::Context>,
) -> Span {
    /// Links per span at most; further items of a big batch are not linked.
    const MAX_LINKS: usize = 32;
    let mut parent_set = false;
    let mut links = 0;
    let mut last_trace = None;
    for context in contexts {
        let span_context = context.span().span_context().clone();
        if !span_context.is_valid() {
            continue;
        }
        if !parent_set {
            let _ = span.set_parent(context.clone());
            parent_set = true;
            last_trace = Some(span_context.trace_id());
            continue;
        }
        if links >= MAX_LINKS {
            break;
        }
        // Consecutive items of one trace (a message to several devices) link once.
        if last_trace != Some(span_context.trace_id()) {
            last_trace = Some(span_context.trace_id());
            span.add_link(span_context);
            links += 1;
        }
    }
    span
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// A tower layer for gRPC servers: each request runs in a `grpc.server` span whose parent
/// is the trace context in the request headers (if any).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTraceLayer;

impl<S> tower::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// The service of [`ServerTraceLayer`].
#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = server_span(&request);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        future.instrument(span)
    }
}

/// Returns the request span: named after the gRPC method, child of the remote caller. Health
/// checks and reflection get none (probes would fill the trace store).
fn server_span<B>(request: &http::Request<B>) -> Span {
    let path = request.uri().path();
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return Span::none();
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    if span.is_disabled() {
        return span;
    }
    let parent = extract(request.headers());
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn injected_context_is_extracted_with_the_same_ids() {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID),
            SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let context = opentelemetry::Context::new().with_remote_span_context(span_context);
        let mut metadata = MetadataMap::new();
        inject(&context, &mut metadata);
        let headers = metadata.into_headers();
        assert_eq!(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let extracted = extract(&headers);
        let extracted = extracted.span().span_context().clone();
        assert_eq!(
            extracted.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(extracted.span_id().to_string(), "00f067aa0ba902b7");
        assert!(extracted.is_remote());
    }

    #[test]
    fn an_empty_context_injects_nothing() {
        let mut metadata = MetadataMap::new();
        inject(&opentelemetry::Context::new(), &mut metadata);
        assert!(metadata.is_empty());
    }
}
