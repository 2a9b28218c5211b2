//! Traces: a delivery's spans under the write's span. A binary of its own: `tracing` caches
//! per call site whether anyone listens, and tests of other binaries that run without a
//! subscriber on other threads would leave that cache saying no one does.

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
        .find(|l| l.contains("webhook rejected"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no rejection logged:\n{}", logs()));
    assert!(line.contains("checkout{order=7}:"), "{line}");
    assert!(line.contains("webhook.deliver{"), "{line}");
    assert!(
        line.contains(&format!("trace_id={}", trace.trace_id())),
        "{line}"
    );
}
