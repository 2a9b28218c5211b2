//! Traces: a delivery's spans under the write's span, and one OpenTelemetry trace from the
//! write to the twin's broadcast. A binary of its own: `tracing` caches per call site
//! whether anyone listens, and tests that run without a subscriber on other threads would
//! leave that cache saying no one does.

mod common;

use common::product_am;
use sea_orm::ActiveModelTrait;
use vendora_pos::receiver::Reply;

/// A delivery's log lines sit under the span of the request that made the write, with the
/// event's trace id, the one its `traceparent` carries to the receiver.
#[tokio::test(flavor = "current_thread")]
async fn a_delivery_logs_under_the_span_of_its_write_with_its_trace_id() {
    use tracing::Instrument;
    let (_guard, logs) = common::capture_logs();
    let env = common::env().await;
    env.receiver.set_reply(Reply::Status(401, None));
    env.observer
        .scope(product_am("traced", 1).insert(&env.db))
        .instrument(tracing::info_span!("checkout", order = 7))
        .await
        .unwrap();
    assert!(env.observer.flush(common::WAIT).await);
    let sent = env.receiver.requests();
    let trace = vendora_observe::trace::TraceParent::parse(sent[0].header("traceparent").unwrap())
        .expect("a valid traceparent");
    let line = logs()
        .lines()
        .find(|l| l.contains("dead-lettered"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no dead letter logged:\n{}", logs()));
    assert!(line.contains("status=401"), "{line}");
    assert!(line.contains("checkout{order=7}:"), "{line}");
    assert!(line.contains("webhook.deliver{"), "{line}");
    assert!(
        line.contains(&format!("trace_id={}", trace.trace_id())),
        "{line}"
    );
}

/// One OpenTelemetry trace from the write to the app: the sale's span, then for each of its
/// three events a delivery, its attempt and the twin's broadcast, each the child of the one
/// before, all under the sale's trace id; in outbox mode through the trace stored with the
/// row.
async fn one_trace_from_the_write_to_the_broadcast(outbox: bool) {
    use opentelemetry::trace::SpanId;
    use vendora_pos::traced;
    let (subscriber, spans, provider) = traced::subscriber();
    let _guard = tracing::subscriber::set_default(subscriber);
    let file = outbox.then(|| {
        std::env::temp_dir().join(format!("vendora-traced-{}.sqlite", std::process::id()))
    });
    let trace_id = traced::sale(file.clone()).await.unwrap();
    if let Some(file) = file {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
    }
    // The write's span ends when its last handle goes: the events' jobs hold one, and the
    // task that sent the last of them may drop it after `sale` returned.
    let deadline = std::time::Instant::now() + common::WAIT;
    while !spans.all().iter().any(|s| s.name == "pos.sell") && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    provider.force_flush().unwrap();
    let spans = spans.all();
    let tree = traced::tree(&spans);
    let named = |name: &str| -> Vec<&opentelemetry_sdk::trace::SpanData> {
        spans.iter().filter(|s| s.name == name).collect()
    };
    let sale = named("pos.sell");
    assert_eq!(sale.len(), 1, "{tree}");
    let sale_id = sale[0].span_context.span_id();
    let parent_of = |id: SpanId, name: &str| {
        spans
            .iter()
            .find(|s| s.span_context.span_id() == id)
            .unwrap_or_else(|| panic!("no span {id} ({name}'s parent) in\n{tree}"))
    };
    let broadcasts = named("webhook.broadcast");
    assert_eq!(broadcasts.len(), 3, "{tree}");
    for b in broadcasts {
        assert_eq!(b.span_context.trace_id(), trace_id, "{tree}");
        let attempt = parent_of(b.parent_span_id, "broadcast");
        assert_eq!(attempt.name, "webhook.attempt", "{tree}");
        let deliver = parent_of(attempt.parent_span_id, "attempt");
        assert_eq!(deliver.name, "webhook.deliver", "{tree}");
        assert_eq!(deliver.parent_span_id, sale_id, "{tree}");
        assert_eq!(deliver.span_context.trace_id(), trace_id, "{tree}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn direct_one_trace_from_the_write_to_the_broadcast() {
    one_trace_from_the_write_to_the_broadcast(false).await;
}

#[tokio::test(flavor = "current_thread")]
async fn outbox_one_trace_from_the_write_to_the_broadcast() {
    one_trace_from_the_write_to_the_broadcast(true).await;
}
