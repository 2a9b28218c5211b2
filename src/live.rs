//! The receiver twin's live page: `GET /` shows every webhook the twin handles as the apps
//! receive it (time, event, row, signature, duplicates and retries, latency, data), with
//! filters and a live chart of events per second and delivery latency.
//!
//! The page is static and embedded in the binary (`src/live/`): HTML, CSS, a small script
//! and the socket.io v4 client. It connects like an app, with the same token, and asks to
//! monitor (`auth: { token, monitor: true }`): monitors join the room `monitor`, get what
//! the twin handled recently on connecting, then a `vendora:seen` record per webhook. No data
//! reaches a browser without a valid token. The page is served with a strict
//! Content-Security-Policy (scripts from the twin only) and shows network data as text only.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use serde_json::Value;

/// What the twin did with one webhook, as the live page shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Seen {
    /// When the twin handled it, in milliseconds since the Unix epoch.
    pub at: u64,
    /// The event name (`None` when the request was refused: its body is not trusted).
    pub event: Option<String>,
    /// The row: the data's `id`, or its first `…Id` field (`productId`).
    pub row: Option<String>,
    /// The `X-Webhook-Id`.
    pub id: Option<String>,
    /// `broadcast`, `duplicate` (dropped), `retry` (the same id is being handled: 503),
    /// `refused`.
    pub outcome: &'static str,
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
        outcome: &'static str,
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
            data: (outcome == "broadcast").then(|| data.clone()),
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
            outcome: "refused",
            signature: "invalid",
            reason: Some(reason),
            data: None,
            latency_ms: None,
            trace_id: None,
        }
    }
}

/// The last webhooks handled, sent to each page as it connects.
#[derive(Debug, Default)]
pub struct History {
    entries: Mutex<VecDeque<Seen>>,
}

/// How many records a twin keeps for pages that connect later.
pub const HISTORY: usize = 500;

impl History {
    pub fn push(&self, seen: Seen) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == HISTORY {
            entries.pop_front();
        }
        entries.push_back(seen);
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().cloned().collect()
    }
}

/// `GET /` and its assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       connect-src 'self'; img-src 'self'; form-action 'none'; \
                       frame-ancestors 'none'; base-uri 'none'";
    let asset = |body: &'static str, kind: &'static str| {
        move || async move {
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
    };
    Router::new()
        .route(
            "/",
            get(asset(
                include_str!("live/index.html"),
                "text/html; charset=utf-8",
            )),
        )
        .route(
            "/live/live.js",
            get(asset(
                include_str!("live/live.js"),
                "text/javascript; charset=utf-8",
            )),
        )
        .route(
            "/live/live.css",
            get(asset(
                include_str!("live/live.css"),
                "text/css; charset=utf-8",
            )),
        )
        .route(
            "/live/socket.io.min.js",
            get(asset(
                include_str!("live/socket.io.min.js"),
                "text/javascript; charset=utf-8",
            )),
        )
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
