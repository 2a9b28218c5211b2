//! The live page: every webhook a receiver handles, as the apps receive it — time, event,
//! row, signature, duplicates and retries, latency from the write, data — with filters by
//! event and row and a live chart of events per second and latency.
//!
//! The page is static and embedded in the binary (`src/live/`): HTML, CSS, a small script,
//! the apps' own module (`clients/js/vendora-observe.js`) and the socket.io v4 client. It
//! needs the receiver's own credential, never an app token, and gets what the receiver
//! handled recently, then a record ([`Seen`]) per webhook, over one of two [`Transport`]s:
//!
//! - [`Transport::SocketIo`]: the server's app connection; the page connects through the
//!   apps' module with `auth: { token: <ADMIN_TOKEN>, monitor: true }`, and gets
//!   `vendora:history` then `vendora:seen` events;
//! - [`Transport::EventSource`]: Server-Sent Events from [`Feed`], read with `fetch` and the
//!   token in an `Authorization` header, for receivers without socket.io
//!   (`vendora-observe listen`).
//!
//! The page is served with a strict Content-Security-Policy (scripts from the receiver
//! only) and shows what it receives as text, never as HTML. The records kept for pages
//! that connect later are bounded in number and in bytes ([`Records`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

/// What a receiver did with a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Outcome {
    /// Accepted for the apps (the server).
    Broadcast,
    /// Verified and shown (`listen`, which has no apps).
    Received,
    /// A redelivery of an id already handled: acknowledged, not sent again.
    Duplicate,
    /// The same id is being handled right now: answered 503, the sender retries.
    Retry,
    /// The server could not take it (Redis down): answered 503, the sender retries.
    Failed,
    /// Refused (signature, size, shape…).
    Refused,
}

/// What a receiver did with one webhook, as the live page shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Seen {
    /// When the twin handled it, in milliseconds since the Unix epoch.
    pub at: u64,
    /// The event name (`None` when the request was refused: its body is not trusted).
    pub event: Option<String>,
    /// The row: the data's `id`, or its first `…Id` field (`productId`).
    pub row: Option<String>,
    /// The `X-Webhook-Id`.
    pub id: Option<String>,
    /// What became of it.
    pub outcome: Outcome,
    /// `ok`, or `invalid` when refused.
    pub signature: &'static str,
    /// Why it was refused.
    pub reason: Option<String>,
    /// The data, once verified.
    pub data: Option<Value>,
    /// From the write (the UUIDv7 id's time) to the broadcast.
    pub latency_ms: Option<u64>,
    /// The trace the sender's `traceparent` named.
    pub trace_id: Option<String>,
}

impl Seen {
    /// A verified webhook and what became of it.
    pub fn verified(
        event: &str,
        data: &Value,
        id: Option<&str>,
        outcome: Outcome,
        trace_id: Option<String>,
    ) -> Seen {
        let at = now_ms();
        Seen {
            at,
            event: Some(event.to_owned()),
            row: row_of(data),
            id: id.map(str::to_owned),
            outcome,
            signature: "ok",
            reason: None,
            data: matches!(outcome, Outcome::Broadcast | Outcome::Received).then(|| data.clone()),
            latency_ms: id.and_then(uuid_v7_ms).map(|born| at.saturating_sub(born)),
            trace_id,
        }
    }

    /// A refused request: only why.
    pub fn refused(reason: String) -> Seen {
        Seen {
            at: now_ms(),
            event: None,
            row: None,
            id: None,
            outcome: Outcome::Refused,
            signature: "invalid",
            reason: Some(reason),
            data: None,
            latency_ms: None,
            trace_id: None,
        }
    }
}

/// The last webhooks handled, sent to each page as it connects: at most [`RECORDS`]
/// records and [`RECORD_BYTES`] bytes of them, the oldest dropped first.
#[derive(Debug, Default)]
pub struct Records {
    entries: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    records: VecDeque<(Seen, usize)>,
    bytes: usize,
}

/// How many records a receiver keeps for pages that connect later.
pub const RECORDS: usize = 500;
/// How many bytes of records (their data included) a receiver keeps.
pub const RECORD_BYTES: usize = 4 << 20;

impl Records {
    /// Keeps `seen`, dropping the oldest records beyond the bounds.
    pub fn push(&self, seen: Seen) {
        Records::keep(&mut self.lock(), seen);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keep(kept: &mut Kept, seen: Seen) {
        let size = 256
            + seen
                .data
                .as_ref()
                .map_or(0, |d| serde_json::to_vec(d).map_or(0, |v| v.len()))
            + seen.reason.as_ref().map_or(0, String::len);
        kept.bytes += size;
        kept.records.push_back((seen, size));
        while kept.records.len() > RECORDS || (kept.bytes > RECORD_BYTES && kept.records.len() > 1)
        {
            if let Some((_, size)) = kept.records.pop_front() {
                kept.bytes -= size;
            }
        }
    }

    /// The records kept, oldest first.
    pub fn snapshot(&self) -> Vec<Seen> {
        self.lock().records.iter().map(|(s, _)| s.clone()).collect()
    }

    /// The bytes the records kept weigh.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// How the page gets its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// socket.io, with the apps: the page connects as a monitor.
    SocketIo,
    /// Server-Sent Events from a [`Feed`] at `/live/events`.
    EventSource,
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; form-action 'none'; \
                   frame-ancestors 'none'; base-uri 'none'";

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page itself, for `GET /`; add the receiver's own methods to it, e.g.
/// `page(Transport::SocketIo).post(webhook)`.
pub fn page<S: Clone + Send + Sync + 'static>(transport: Transport) -> MethodRouter<S> {
    static SOCKET_IO: OnceLock<String> = OnceLock::new();
    static EVENT_SOURCE: OnceLock<String> = OnceLock::new();
    let html: &'static str = match transport {
        Transport::SocketIo => SOCKET_IO.get_or_init(|| {
            include_str!("live/index.html").replace(
                "<!--transport-->",
                "<meta name=\"vendora-transport\" content=\"socket.io\">\n\
                 <script src=\"/live/socket.io.min.js\"></script>",
            )
        }),
        Transport::EventSource => EVENT_SOURCE.get_or_init(|| {
            include_str!("live/index.html").replace(
                "<!--transport-->",
                "<meta name=\"vendora-transport\" content=\"eventsource\">",
            )
        }),
    };
    get(move || async move { asset(html, "text/html; charset=utf-8") })
}

/// The page's assets, under `/live/`.
pub fn assets<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let js = "text/javascript; charset=utf-8";
    Router::new()
        .route(
            "/live/live.js",
            get(move || async move { asset(include_str!("live/live.js"), js) }),
        )
        .route(
            "/live/live.css",
            get(|| async { asset(include_str!("live/live.css"), "text/css; charset=utf-8") }),
        )
        .route(
            "/live/socket.io.min.js",
            get(move || async move { asset(include_str!("live/socket.io.min.js"), js) }),
        )
        .route(
            "/live/vendora-observe.js",
            get(move || async move { asset(include_str!("live/vendora-observe.js"), js) }),
        )
}

/// The records of a receiver without socket.io, for pages that hold `token`: what it
/// handled recently, then each new record, as Server-Sent Events at `/live/events`.
pub struct Feed {
    history: Records,
    tx: broadcast::Sender<Seen>,
    token: String,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

impl Feed {
    /// A feed for pages that present `token`.
    pub fn new(token: impl Into<String>) -> Arc<Feed> {
        Arc::new(Feed {
            history: Records::default(),
            tx: broadcast::channel(1024).0,
            token: token.into(),
        })
    }

    /// Records what became of a webhook and sends it to the open pages.
    pub fn push(&self, seen: Seen) {
        // Under the history's lock: a page that connects gets each record exactly once,
        // in its history or live.
        let mut entries = self.history.lock();
        Records::keep(&mut entries, seen.clone());
        let _ = self.tx.send(seen);
    }

    /// `GET /live/events` with `Authorization: Bearer <token>`: 401 without the feed's
    /// token. (Not in the query string: proxies log URLs.)
    pub fn routes<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Router<S> {
        Router::new()
            .route("/live/events", get(events))
            .with_state(self.clone())
    }
}

fn sse_event(name: &'static str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_default())
}

async fn events(State(feed): State<Arc<Feed>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !crate::token_matches(feed.token.as_bytes(), token.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "a valid token is required").into_response();
    }
    let (history, rx) = {
        let entries = feed.history.lock();
        let records: Vec<&Seen> = entries.records.iter().map(|(s, _)| s).collect();
        (sse_event("vendora:history", &records), feed.tx.subscribe())
    };
    let first = futures_util::stream::once(async move { Ok::<_, Infallible>(history) });
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(seen) => {
                    return Some((Ok(sse_event("vendora:seen", &seen)), rx));
                }
                // A page too slow for the feed misses records; it is told on reconnect.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    let mut response = Sse::new(first.chain(rest))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, "no-cache".parse().expect("valid"));
    response
}

/// The row an event is about: `data.id`, or the first field named `…Id`.
fn row_of(data: &Value) -> Option<String> {
    let object = data.as_object()?;
    let value = object.get("id").or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.ends_with("Id") || k.ends_with("_id"))
            .map(|(_, v)| v)
    })?;
    Some(match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The creation time of a UUIDv7, in milliseconds since the Unix epoch.
fn uuid_v7_ms(id: &str) -> Option<u64> {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || hex.as_bytes()[12] != b'7' {
        return None;
    }
    u64::from_str_radix(&hex[..12], 16).ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_bounded_by_count_and_by_bytes() {
        let records = Records::default();
        let big = Value::String("x".repeat(100 << 10));
        for i in 0..100 {
            records.push(Seen::verified(
                "product:updated",
                &serde_json::json!({"id": i, "blob": big}),
                None,
                Outcome::Broadcast,
                None,
            ));
        }
        assert!(records.bytes() <= RECORD_BYTES, "{} bytes", records.bytes());
        let kept = records.snapshot();
        assert!(kept.len() < 100 && kept.len() > 10, "{} kept", kept.len());
        assert_eq!(
            kept.last().unwrap().row.as_deref(),
            Some("99"),
            "the newest stay"
        );
        let small = Records::default();
        for _ in 0..(RECORDS + 10) {
            small.push(Seen::refused("bad".into()));
        }
        assert_eq!(small.snapshot().len(), RECORDS);
    }
}
