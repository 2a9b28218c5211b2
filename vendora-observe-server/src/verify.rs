//! The receiving end, for anyone building a WebSocket server (or any webhook consumer) in
//! Rust, and what the receiver twin and `vendora-observe listen` are made of:
//!
//! - [`Verifier`]: checks one request as it must be checked on the internet: size, content
//!   type, the signature over the raw body in constant time, with any of several secrets
//!   (rotation), Standard Webhooks headers with a replay window when present (or required),
//!   bounded ids, then the shape;
//! - [`Dedupe`]: drops redeliveries by id, bounded in entries and bytes, an id recorded only
//!   once its event was handled;
//! - [`AppToken`]: short-lived HMAC tokens the backend mints for its apps, which a socket.io
//!   server checks on the handshake;
//! - `server` (feature `server`): an HTTP server with header-read, body and idle timeouts, a
//!   connection cap and the body limit enforced while reading.
//!
//! ```
//! use vendora_observe_server::{Claim, Dedupe, Rejection, Verifier};
//!
//! let verifier = Verifier::new(["s3cr3t"]);
//! let body = br#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#;
//! let signature = vendora_observe::sign(b"s3cr3t", body);
//! let headers = |name: &str| match name {
//!     "content-type" => Some("application/json"),
//!     "x-webhook-signature" => Some(signature.as_str()),
//!     "x-webhook-id" => Some("0193a0b5-6c1e-7d1a-9b7e-2f3a4b5c6d7e"),
//!     _ => None,
//! };
//! let event = verifier.verify(headers, body)?;
//! assert_eq!(event.event, "stock:updated");
//! assert_eq!(event.data["newStock"], 7);
//!
//! let seen = Dedupe::default();
//! let id = event.id.as_deref().unwrap();
//! if let Claim::First(ticket) = seen.claim(id) {
//!     // … broadcast the event; only once it succeeded:
//!     ticket.done();
//! }
//! assert!(matches!(seen.claim(id), Claim::Seen)); // a retry of the same event
//!
//! let forged = |name: &str| if name == "x-webhook-signature" { Some("00") } else { headers(name) };
//! assert_eq!(verifier.verify(forged, body).unwrap_err().status(), 401);
//! # Ok::<(), Rejection>(())
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use vendora_observe::Secret;
use vendora_observe::signature::{self, StandardRejection};

/// The largest body a receiver accepts: 1 MiB. Every receiver this crate ships uses it.
pub const MAX_BODY: usize = 1 << 20;

/// The longest event id accepted (`X-Webhook-Id`, `webhook-id`): ours are 36-byte UUIDs.
pub const MAX_ID: usize = 128;

/// The Standard Webhooks replay window: a request whose `webhook-timestamp` is further
/// from now is refused.
pub const REPLAY_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// A verified event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct IncomingEvent {
    /// `event`: `product:created`, ….
    pub event: String,
    /// `data`.
    pub data: Value,
    /// Its id (`webhook-id` or `X-Webhook-Id`), the same on every retry: dedupe on it.
    pub id: Option<String>,
}

/// Why a request was refused, with the HTTP status to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The body is larger than [`MAX_BODY`] (or the verifier's limit): 413.
    TooLarge,
    /// `Content-Type` is not `application/json`: 415.
    NotJson,
    /// No signature, or none matches any secret: 401.
    BadSignature,
    /// Standard Webhooks headers are required and missing: 401.
    StandardHeadersRequired,
    /// `webhook-timestamp` is outside the replay window (or not a time): 401.
    Stale,
    /// The event id is longer than [`MAX_ID`], or `webhook-id` and `X-Webhook-Id` differ:
    /// 400.
    BadId,
    /// The body is not `{"event": "<string>", "data": …}`: 400.
    Malformed,
}

impl Rejection {
    /// The HTTP status to answer.
    pub fn status(self) -> u16 {
        match self {
            Rejection::TooLarge => 413,
            Rejection::NotJson => 415,
            Rejection::BadSignature | Rejection::StandardHeadersRequired | Rejection::Stale => 401,
            Rejection::BadId | Rejection::Malformed => 400,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::TooLarge => "body too large",
            Rejection::NotJson => "Content-Type must be application/json",
            Rejection::BadSignature => "invalid or missing signature",
            Rejection::StandardHeadersRequired => {
                "webhook-id, webhook-timestamp and webhook-signature are required"
            }
            Rejection::Stale => "webhook-timestamp is outside the replay window",
            Rejection::BadId => "invalid event id",
            Rejection::Malformed => r#"body must be {"event": "<name>", "data": ...}"#,
        })
    }
}

impl std::error::Error for Rejection {}

/// Checks requests as a receiver facing the internet must. Built once, shared by every
/// request.
#[derive(Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
    require_standard: bool,
    tolerance: Duration,
    max_body: usize,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.secrets.len())
            .field("require_standard", &self.require_standard)
            .field("tolerance", &self.tolerance)
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl Verifier {
    /// Accepts a signature by any of `secrets` (the current one and those being rotated
    /// out). Standard Webhooks headers are verified when present, with a five-minute replay
    /// window; the legacy `X-Webhook-Signature` alone is accepted too (the Node servers in
    /// the field use it).
    pub fn new<S: Into<String>>(secrets: impl IntoIterator<Item = S>) -> Self {
        Verifier {
            secrets: secrets
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .map(Secret::new)
                .collect(),
            require_standard: false,
            tolerance: REPLAY_TOLERANCE,
            max_body: MAX_BODY,
        }
    }

    /// Refuses requests without Standard Webhooks headers: the legacy signature alone can
    /// be replayed (it signs no time), so a receiver that wants replay protection requires
    /// them. The sender sends them with `WEBHOOK_STANDARD_HEADERS=true`.
    #[must_use]
    pub fn require_standard_headers(mut self, require: bool) -> Self {
        self.require_standard = require;
        self
    }

    /// The replay window (default five minutes).
    #[must_use]
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The largest body accepted (default [`MAX_BODY`]).
    #[must_use]
    pub fn max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// Checks one request: `header` looks a header up by its lowercase name. The signature
    /// is checked before the body is parsed, so unsigned input is never parsed.
    pub fn verify<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        body: &[u8],
    ) -> Result<IncomingEvent, Rejection> {
        self.verify_at(header, body, SystemTime::now())
    }

    /// [`verify`](Self::verify) at a given time (for tests of the replay window).
    pub fn verify_at<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<IncomingEvent, Rejection> {
        if body.len() > self.max_body {
            return Err(Rejection::TooLarge);
        }
        let is_json = header("content-type")
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(Rejection::NotJson);
        }
        let legacy_id = header("x-webhook-id");
        let standard = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let id = match standard {
            (Some(id), Some(timestamp), Some(signatures)) => {
                if id.len() > MAX_ID || legacy_id.is_some_and(|l| l != id) {
                    return Err(Rejection::BadId);
                }
                let mut result = Err(Rejection::BadSignature);
                for secret in &self.secrets {
                    match signature::verify_standard(
                        secret.expose(),
                        id,
                        timestamp,
                        signatures,
                        body,
                        now,
                        self.tolerance,
                    ) {
                        Ok(()) => {
                            result = Ok(());
                            break;
                        }
                        Err(StandardRejection::Mismatch) => {}
                        Err(_) => return Err(Rejection::Stale),
                    }
                }
                result?;
                Some(id)
            }
            _ if self.require_standard => return Err(Rejection::StandardHeadersRequired),
            _ => {
                if legacy_id.is_some_and(|id| id.len() > MAX_ID) {
                    return Err(Rejection::BadId);
                }
                let Some(sig) = header("x-webhook-signature") else {
                    return Err(Rejection::BadSignature);
                };
                if !self
                    .secrets
                    .iter()
                    .any(|s| signature::verify(s.expose(), body, sig))
                {
                    return Err(Rejection::BadSignature);
                }
                legacy_id
            }
        };
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
        Ok(IncomingEvent {
            event,
            data,
            id: id.map(str::to_owned),
        })
    }
}

/// Checks one request with one secret, the legacy header and [`MAX_BODY`]-style limit:
/// [`Verifier`] is the complete check (rotation, Standard Webhooks, ids).
pub fn verify_request(
    secret: &[u8],
    content_type: Option<&str>,
    signature_header: Option<&str>,
    body: &[u8],
    max_body: usize,
) -> Result<IncomingEvent, Rejection> {
    Verifier::new([String::from_utf8_lossy(secret).into_owned()])
        .max_body(max_body)
        .verify(
            |name| match name {
                "content-type" => content_type,
                "x-webhook-signature" => signature_header,
                _ => None,
            },
            body,
        )
}

/// Whether `presented` equals `expected`, in constant time: both go through an HMAC under a
/// fixed key first, so neither their length nor their content shows in the timing. For app
/// and page tokens.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    let mac = signature::sign(b"vendora-token-compare", expected.as_bytes());
    signature::verify(b"vendora-token-compare", presented.as_bytes(), &mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const BODY: &[u8] = br#"{"event":"product:deleted","data":{"id":3}}"#;

    fn legacy<'a>(sig: &'a str, id: &'a str) -> impl Fn(&str) -> Option<&'a str> {
        move |name| match name {
            "content-type" => Some("application/json; charset=utf-8"),
            "x-webhook-signature" => Some(sig),
            "x-webhook-id" => Some(id),
            _ => None,
        }
    }

    #[test]
    fn each_rejection_has_its_status() {
        let s = vendora_observe::sign(b"k", BODY);
        let v = Verifier::new(["k"]);
        assert_eq!(
            v.clone()
                .max_body(10)
                .verify(legacy(&s, "a"), BODY)
                .unwrap_err()
                .status(),
            413
        );
        let text = |name: &str| (name == "content-type").then_some("text/plain");
        assert_eq!(v.verify(text, BODY).unwrap_err().status(), 415);
        assert_eq!(v.verify(|_| None, BODY).unwrap_err().status(), 415);
        let unsigned = |name: &str| (name == "content-type").then_some("application/json");
        assert_eq!(v.verify(unsigned, BODY).unwrap_err().status(), 401);
        assert_eq!(
            Verifier::new(["x"])
                .verify(legacy(&s, "a"), BODY)
                .unwrap_err()
                .status(),
            401
        );
        let long = "i".repeat(MAX_ID + 1);
        assert_eq!(
            v.verify(legacy(&s, &long), BODY).unwrap_err(),
            Rejection::BadId
        );
        let bad = b"{\"data\":1}";
        let bad_sig = vendora_observe::sign(b"k", bad);
        assert_eq!(
            v.verify(legacy(&bad_sig, "a"), bad).unwrap_err().status(),
            400
        );
        let e = v.verify(legacy(&s, "a"), BODY).unwrap();
        assert_eq!(
            (e.event.as_str(), e.id.as_deref()),
            ("product:deleted", Some("a"))
        );
        assert_eq!(e.data, serde_json::json!({"id": 3}));
    }

    #[test]
    fn any_current_secret_verifies_during_a_rotation() {
        let old = vendora_observe::sign(b"old", BODY);
        let new = vendora_observe::sign(b"new", BODY);
        let v = Verifier::new(["new", "old"]);
        assert!(v.verify(legacy(&old, "a"), BODY).is_ok());
        assert!(v.verify(legacy(&new, "a"), BODY).is_ok());
        assert!(
            Verifier::new(["new"])
                .verify(legacy(&old, "a"), BODY)
                .is_err()
        );
    }

    #[test]
    fn standard_headers_are_checked_with_their_window_and_can_be_required() {
        let sent = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ts = "1800000000";
        let sig =
            vendora_observe::signature::standard_signature(b"k", "msg_1", 1_800_000_000, BODY);
        let standard = |name: &str| match name {
            "content-type" => Some("application/json"),
            "webhook-id" => Some("msg_1"),
            "webhook-timestamp" => Some(ts),
            "webhook-signature" => Some(sig.as_str()),
            _ => None,
        };
        let v = Verifier::new(["k"]);
        assert!(
            v.verify_at(standard, BODY, sent + Duration::from_secs(299))
                .is_ok()
        );
        assert_eq!(
            v.verify_at(standard, BODY, sent + Duration::from_secs(301))
                .unwrap_err(),
            Rejection::Stale
        );
        let legacy_sig = vendora_observe::sign(b"k", BODY);
        let required = v.clone().require_standard_headers(true);
        assert_eq!(
            required.verify(legacy(&legacy_sig, "a"), BODY).unwrap_err(),
            Rejection::StandardHeadersRequired
        );
        assert!(required.verify_at(standard, BODY, sent).is_ok());
    }
}
