//! The receiving end, for anyone building a WebSocket server (or any webhook consumer) in
//! Rust: check one request as the Vendora server does, and drop redeliveries.
//!
//! ```
//! use vendora_observe::receiver::{Dedupe, Rejection, verify_request};
//!
//! let secret = b"s3cr3t";
//! let body = br#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#;
//! let signature = vendora_observe::sign(secret, body);
//!
//! let event = verify_request(secret, Some("application/json"), Some(&signature), body, 1 << 20)?;
//! assert_eq!(event.event, "stock:updated");
//! assert_eq!(event.data["newStock"], 7);
//!
//! let err = verify_request(secret, Some("application/json"), Some("00"), body, 1 << 20).unwrap_err();
//! assert_eq!(err.status(), 401);
//!
//! let seen = Dedupe::new(10_000);
//! assert!(seen.first_time("0193a0b5-…"));
//! assert!(!seen.first_time("0193a0b5-…")); // a retry of the same event
//! # Ok::<(), Rejection>(())
//! ```

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Mutex;

use serde_json::Value;

use crate::signature;

/// A verified event.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    /// `event`: `product:created`, ….
    pub event: String,
    /// `data`.
    pub data: Value,
}

/// Why a request was refused, with the HTTP status to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The body is larger than allowed: 413.
    TooLarge,
    /// `Content-Type` is not `application/json`: 415.
    NotJson,
    /// No `X-Webhook-Signature`, or it does not match: 401.
    BadSignature,
    /// The body is not `{"event": "<string>", "data": …}`: 400.
    Malformed,
}

impl Rejection {
    /// The HTTP status to answer.
    pub fn status(self) -> u16 {
        match self {
            Rejection::TooLarge => 413,
            Rejection::NotJson => 415,
            Rejection::BadSignature => 401,
            Rejection::Malformed => 400,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::TooLarge => "body too large",
            Rejection::NotJson => "Content-Type must be application/json",
            Rejection::BadSignature => "invalid or missing X-Webhook-Signature",
            Rejection::Malformed => r#"body must be {"event": "<name>", "data": ...}"#,
        })
    }
}

impl std::error::Error for Rejection {}

/// Checks one request: size, content type, the signature over the raw body (constant
/// time), then the shape. The signature is checked before the body is parsed, so unsigned
/// input is never parsed.
pub fn verify_request(
    secret: &[u8],
    content_type: Option<&str>,
    signature_header: Option<&str>,
    body: &[u8],
    max_body: usize,
) -> Result<IncomingEvent, Rejection> {
    if body.len() > max_body {
        return Err(Rejection::TooLarge);
    }
    let is_json = content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Rejection::NotJson);
    }
    match signature_header {
        Some(sig) if signature::verify(secret, body, sig) => {}
        _ => return Err(Rejection::BadSignature),
    }
    let mut value: Value = serde_json::from_slice(body).map_err(|_| Rejection::Malformed)?;
    let event = value
        .get("event")
        .and_then(Value::as_str)
        .ok_or(Rejection::Malformed)?
        .to_owned();
    let data = value
        .get_mut("data")
        .map(Value::take)
        .unwrap_or(Value::Null);
    Ok(IncomingEvent { event, data })
}

/// Remembers the last `capacity` event ids, to drop redeliveries (`X-Webhook-Id` is the
/// same on every retry).
#[derive(Debug)]
pub struct Dedupe {
    capacity: usize,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Dedupe {
    /// Remembers up to `capacity` ids; the oldest is forgotten first.
    pub fn new(capacity: usize) -> Self {
        Dedupe {
            capacity: capacity.max(1),
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// `true` the first time `id` is seen (process the event), `false` after.
    #[must_use = "false means the event is a redelivery and must not be processed again"]
    pub fn first_time(&self, id: &str) -> bool {
        let mut guard = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *guard;
        if set.contains(id) {
            return false;
        }
        if order.len() >= self.capacity
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        set.insert(id.to_owned());
        order.push_back(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"event":"product:deleted","data":{"id":3}}"#;

    fn sig() -> String {
        crate::sign(b"k", BODY)
    }

    #[test]
    fn each_rejection_has_its_status() {
        let s = sig();
        let ok = Some("application/json; charset=utf-8");
        assert_eq!(
            verify_request(b"k", ok, Some(&s), BODY, 10)
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(
            verify_request(b"k", Some("text/plain"), Some(&s), BODY, 1000)
                .unwrap_err()
                .status(),
            415
        );
        assert_eq!(
            verify_request(b"k", None, Some(&s), BODY, 1000)
                .unwrap_err()
                .status(),
            415
        );
        assert_eq!(
            verify_request(b"k", ok, None, BODY, 1000)
                .unwrap_err()
                .status(),
            401
        );
        assert_eq!(
            verify_request(b"x", ok, Some(&s), BODY, 1000)
                .unwrap_err()
                .status(),
            401
        );
        let bad = b"{\"data\":1}";
        let bad_sig = crate::sign(b"k", bad);
        assert_eq!(
            verify_request(b"k", ok, Some(&bad_sig), bad, 1000)
                .unwrap_err()
                .status(),
            400
        );
        let e = verify_request(b"k", ok, Some(&s), BODY, 1000).unwrap();
        assert_eq!(e.event, "product:deleted");
        assert_eq!(e.data, serde_json::json!({"id": 3}));
    }

    #[test]
    fn dedupe_forgets_the_oldest_beyond_capacity() {
        let d = Dedupe::new(2);
        assert!(d.first_time("a"));
        assert!(d.first_time("b"));
        assert!(!d.first_time("a"));
        assert!(d.first_time("c")); // forgets a
        assert!(d.first_time("a"));
        assert!(!d.first_time("c"));
    }
}
