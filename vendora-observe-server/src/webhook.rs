//! `POST /webhook` (or `/`): a signed event from the backend, verified, then appended to
//! the history, from which every server delivers it to the apps allowed to see it.
//!
//! Answered 200 once the event is in the history (`{"ok":true,"offset":"…","epoch":"…"}`:
//! where an app that received it stands), or a
//! redelivery of an id already there (`"duplicate":true`, not delivered again); 503 with
//! `Retry-After` while the history cannot be reached (Redis down), which senders retry; the
//! verifier's status (401, 413, 415, 400) when refused.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use tracing::Instrument;
use vendora_observe::trace::TraceParent;

use crate::Verifier;
use crate::apps::Apps;
use crate::history::{Appended, History, NewEntry};
use crate::http::Connection;
use crate::live::{Outcome, Seen};
use crate::log::{Tally, escaped};

/// What the webhook endpoint needs.
pub(crate) struct Endpoint {
    pub(crate) verifier: Verifier,
    pub(crate) history: Arc<History>,
    pub(crate) apps: Arc<Apps>,
    pub(crate) refusals: Arc<Tally>,
}

fn answer(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) async fn webhook(
    State(endpoint): State<Arc<Endpoint>>,
    connection: Option<axum::Extension<Connection>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = match endpoint.verifier.verify(header, &body) {
        Ok(e) => e,
        Err(rejection) => {
            let from = connection.map_or_else(|| "?".to_owned(), |c| c.peer().to_string());
            endpoint.refusals.note(
                rejection.describe(),
                format_args!(
                    "refused a webhook: {rejection} (answered {}), from {from}",
                    rejection.status()
                ),
            );
            endpoint.apps.seen(Seen::refused(rejection.to_string()));
            let status =
                StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return answer(status, r#"{"error":"refused"}"#.to_owned());
        }
    };
    // The sender's attempt is the parent of what follows: the trace goes on to the apps.
    let trace = header("traceparent").and_then(TraceParent::parse);
    let span = match trace {
        Some(t) => tracing::info_span!(
            "webhook.broadcast",
            event = %escaped(&event.event),
            trace_id = %t.trace_id(),
            parent_id = %t.span_id(),
        ),
        None => tracing::info_span!("webhook.broadcast", event = %escaped(&event.event)),
    };
    if let Some(t) = trace {
        // With OpenTelemetry, the broadcast is a span of the sender's trace.
        t.adopt(&span);
    }
    let data = serde_json::value::to_raw_value(&event.data)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("valid JSON"));
    let appended = endpoint
        .history
        .append(NewEntry {
            id: event.id.as_deref(),
            event: &event.event,
            data: &data,
            rooms: event.rooms.as_deref(),
        })
        .instrument(span.clone())
        .await;
    let (response, outcome) = match appended {
        Ok(Appended::New(offset, epoch)) => {
            span.in_scope(|| {
                tracing::debug!(
                    offset = %offset,
                    rooms = ?event.rooms,
                    "accepted {}",
                    escaped(&event.event)
                )
            });
            (
                answer(
                    StatusCode::OK,
                    format!(r#"{{"ok":true,"offset":"{offset}","epoch":"{epoch}"}}"#),
                ),
                Outcome::Broadcast,
            )
        }
        Ok(Appended::Duplicate) => (
            answer(StatusCode::OK, r#"{"ok":true,"duplicate":true}"#.to_owned()),
            Outcome::Duplicate,
        ),
        Err(_) => (
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::RETRY_AFTER, "1"),
                ],
                r#"{"error":"the history (Redis) cannot be reached; retry"}"#,
            )
                .into_response(),
            Outcome::Failed,
        ),
    };
    endpoint.apps.seen(Seen::verified(
        &event.event,
        &event.data,
        event.id.as_deref(),
        outcome,
        trace.map(|t| t.trace_id()),
    ));
    response
}
