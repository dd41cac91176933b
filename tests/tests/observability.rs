//! Observability end to end: one message is one trace across every service it touches,
//! carried by real W3C `traceparent` headers between the in-process servers, and the
//! Prometheus counters on `/metrics` move with the message.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bluetick_client::TickStatus;
use bluetick_tests::{TestCluster, WAIT, eventually};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Keeps every finished span in memory.
#[derive(Clone, Debug, Default)]
struct CollectingExporter {
    spans: Arc<Mutex<Vec<SpanData>>>,
}

impl SpanExporter for CollectingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.spans.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl CollectingExporter {
    fn spans(&self) -> Vec<SpanData> {
        self.spans.lock().unwrap().clone()
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The server span of `service`/`method` in `trace`, if it has ended.
fn server_span<'a>(
    spans: &'a [SpanData],
    trace: TraceId,
    service: &str,
    method: &str,
) -> Option<&'a SpanData> {
    spans.iter().find(|span| {
        span.span_context.trace_id() == trace
            && span.name == format!("{service}/{method}")
            && attribute(span, "rpc.service").as_deref() == Some(service)
    })
}

/// Returns the value of the sample `name` (exact series text, labels included) in a
/// Prometheus text exposition, 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// GET `url` (`http://host:port/path`) over plain HTTP/1.1; returns the body.
async fn scrape(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.to_string()
}

/// A message from alice to bob is one trace: alice's gateway (`chat.send`), messaging's
/// AcceptBatch, ack's RecordSent, presence's Locate and bob's gateway's Deliver all share its
/// trace id, and each server span has a remote parent (it came through the gRPC headers).
/// The counters of `/metrics` move by exactly this one message, delivered and read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_services_and_moves_the_metrics() {
    let exporter = CollectingExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry =
        bluetick_common::telemetry::init_tracing_with_provider(Default::default(), Some(provider));

    let cluster = TestCluster::start_with(|config| config.metrics_port = Some(0)).await;
    let metrics_url = cluster.endpoints.metrics.clone().unwrap();
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let (_b, bob_chat, mut bob_events) = cluster.connect(&bob).await;
    let before = scrape(&metrics_url).await;

    let client_msg_id = alice_chat
        .send(&bob.user_id, b"hello".to_vec())
        .await
        .unwrap();
    let message_id = alice_events.wait_sent(&client_msg_id, WAIT).await.unwrap();
    let received = bob_events.next_message(WAIT).await.unwrap();
    assert_eq!(received.message_id, message_id);
    alice_events
        .wait_receipt(message_id, TickStatus::Delivered, WAIT)
        .await
        .unwrap();
    bob_chat.mark_read(vec![message_id]).await.unwrap();
    alice_events
        .wait_receipt(message_id, TickStatus::Read, WAIT)
        .await
        .unwrap();

    // The trace of the message starts at alice's gateway.
    let message_id_text = message_id.to_string();
    let mut trace_opt = None;
    assert!(
        eventually(WAIT, || {
            let spans = exporter.spans();
            trace_opt = spans
                .iter()
                .find(|span| {
                    span.name == "chat.send"
                        && attribute(span, "message_id").as_deref()
                            == Some(message_id_text.as_str())
                })
                .map(|span| (span.span_context.trace_id(), span.span_context.span_id()));
            // Deliver and the push span that made it end after bob has the message.
            let found = trace_opt.is_some_and(|(trace, _)| {
                server_span(
                    &spans,
                    trace,
                    "bluetick.gateway.v1.GatewayInternal",
                    "Deliver",
                )
                .is_some_and(|deliver| {
                    spans
                        .iter()
                        .any(|span| span.span_context.span_id() == deliver.parent_span_id)
                })
            });
            async move { found }
        })
        .await,
        "no chat.send span with a Deliver in its trace"
    );
    let (trace, send_span_id) = trace_opt.unwrap();
    let spans = exporter.spans();
    let chat_send = spans
        .iter()
        .find(|span| span.span_context.span_id() == send_span_id)
        .unwrap();
    assert_eq!(
        chat_send.parent_span_id,
        SpanId::INVALID,
        "chat.send is a root"
    );
    assert_eq!(
        attribute(chat_send, "client_msg_id").as_deref(),
        Some(client_msg_id.as_str())
    );

    let hops = [
        ("bluetick.messaging.v1.Messaging", "AcceptBatch"),
        ("bluetick.ack.v1.Ack", "RecordSent"),
        ("bluetick.presence.v1.Presence", "Locate"),
        ("bluetick.gateway.v1.GatewayInternal", "Deliver"),
    ];
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .filter(|span| span.span_context.trace_id() == trace)
        .map(|span| (span.span_context.span_id(), span))
        .collect();
    for (service, method) in hops {
        let span = server_span(&spans, trace, service, method)
            .unwrap_or_else(|| panic!("no {service}/{method} span in the message's trace"));
        assert!(
            span.parent_span_is_remote,
            "{service}/{method} span's parent is not remote: the context did not come through the headers"
        );
        assert!(
            by_id.contains_key(&span.parent_span_id),
            "{service}/{method}'s parent is not a span of this trace"
        );
        assert_eq!(span.span_kind, SpanKind::Server);
    }
    // Accept's caller is alice's gateway; RecordSent's and Locate's caller is messaging.
    let accept = server_span(
        &spans,
        trace,
        "bluetick.messaging.v1.Messaging",
        "AcceptBatch",
    )
    .unwrap();
    assert_eq!(accept.parent_span_id, send_span_id);
    let accept_handler = spans
        .iter()
        .find(|span| {
            span.name == "messaging.accept_batch"
                && span.parent_span_id == accept.span_context.span_id()
        })
        .unwrap();
    assert_eq!(
        attribute(accept_handler, "first_message_id").as_deref(),
        Some(message_id_text.as_str())
    );
    for (service, method) in [
        ("bluetick.ack.v1.Ack", "RecordSent"),
        ("bluetick.presence.v1.Presence", "Locate"),
    ] {
        let span = server_span(&spans, trace, service, method).unwrap();
        assert_eq!(span.parent_span_id, accept_handler.span_context.span_id());
    }
    // Deliver came from the push queue, whose span continues the message's trace.
    let deliver = server_span(
        &spans,
        trace,
        "bluetick.gateway.v1.GatewayInternal",
        "Deliver",
    )
    .unwrap();
    assert_eq!(by_id[&deliver.parent_span_id].name, "gateway.push");
    // No span carries the payload.
    for span in &spans {
        for kv in &span.attributes {
            assert!(!kv.value.to_string().contains("hello"), "{span:?}");
        }
    }

    let after = scrape(&metrics_url).await;
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(moved("bluetick_messages_accepted_total"), 1.0, "{after}");
    assert_eq!(moved("bluetick_messages_delivered_total"), 1.0);
    assert_eq!(moved("bluetick_messages_read_total"), 1.0);
    assert_eq!(
        moved("bluetick_tick_latency_seconds_count{tick=\"delivered\"}"),
        1.0
    );
    assert_eq!(
        moved("bluetick_tick_latency_seconds_count{tick=\"read\"}"),
        1.0
    );
    assert!(moved("bluetick_store_latency_seconds_count{op=\"inbox.accept_batch\"}") >= 1.0);
    assert!(moved("bluetick_store_latency_seconds_count{op=\"ticks.acknowledge\"}") >= 2.0);
    assert!(moved("bluetick_store_latency_seconds_count{op=\"ticks.record_sent\"}") >= 1.0);
    assert_eq!(sample(&after, "bluetick_connected_devices"), 2.0);
    assert!(after.contains("# TYPE bluetick_push_queue_depth gauge"));
}
