//! [`Verifier`]: checks one webhook request as a receiver facing the internet must: size,
//! content type, the signature over the raw body in constant time, with any of several
//! secrets (rotation), the Standard Webhooks headers with their replay window (required
//! unless told otherwise), bounded ids, then the shape, rooms included.
//!
//! ```
//! use vendora_observe::signature::standard_signature;
//! use vendora_observe_server::{Claim, Dedupe, Rejection, Verifier};
//!
//! let verifier = Verifier::new(["s3cr3t"]);
//! let body = br#"{"event":"order:created","data":{"id":7},"rooms":["store:1"]}"#;
//! let now = std::time::SystemTime::now();
//! let ts = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
//! let signature = standard_signature(b"s3cr3t", "msg_1", ts, body);
//! let ts = ts.to_string();
//! let headers = |name: &str| match name {
//!     "content-type" => Some("application/json"),
//!     "webhook-id" => Some("msg_1"),
//!     "webhook-timestamp" => Some(ts.as_str()),
//!     "webhook-signature" => Some(signature.as_str()),
//!     _ => None,
//! };
//! let event = verifier.verify(headers, body)?;
//! assert_eq!((event.event.as_str(), event.id.as_deref()), ("order:created", Some("msg_1")));
//! assert_eq!(event.rooms.as_deref(), Some(&["store:1".to_owned()][..]));
//!
//! // The legacy header alone signs neither the id nor the time: a capture could be
//! // replayed under a fresh id. Refused unless legacy senders are accepted explicitly.
//! let legacy_sig = vendora_observe::sign(b"s3cr3t", body);
//! let legacy = |name: &str| match name {
//!     "content-type" => Some("application/json"),
//!     "x-webhook-signature" => Some(legacy_sig.as_str()),
//!     _ => None,
//! };
//! assert_eq!(verifier.verify(legacy, body).unwrap_err(), Rejection::StandardHeadersRequired);
//! assert!(verifier.clone().require_standard_headers(false).verify(legacy, body).is_ok());
//!
//! let seen = Dedupe::default();
//! if let Claim::First(ticket) = seen.claim("msg_1") {
//!     // … broadcast the event; only once it succeeded:
//!     ticket.done();
//! }
//! assert!(matches!(seen.claim("msg_1"), Claim::Seen)); // a retry of the same event
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
    /// `rooms`: the apps it is for (those whose scope holds one of them); `None` for an
    /// event every app receives.
    pub rooms: Option<Vec<String>>,
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
    /// The body is not `{"event": "<string>", "data": …}` (with `"rooms": ["<string>", …]`
    /// if any): 400.
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

impl Rejection {
    /// What was wrong, in a few words (the text of [`Display`](fmt::Display)).
    pub fn describe(self) -> &'static str {
        match self {
            Rejection::TooLarge => "body too large",
            Rejection::NotJson => "Content-Type must be application/json",
            Rejection::BadSignature => "invalid or missing signature",
            Rejection::StandardHeadersRequired => {
                "webhook-id, webhook-timestamp and webhook-signature are required"
            }
            Rejection::Stale => "webhook-timestamp is outside the replay window",
            Rejection::BadId => "invalid event id",
            Rejection::Malformed => {
                r#"body must be {"event": "<name>", "data": ..., "rooms": ["<room>", ...] (optional)}"#
            }
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
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
    /// out), in the Standard Webhooks headers, with a five-minute replay window. Requests
    /// with only the legacy `X-Webhook-Signature` are refused: see
    /// [`require_standard_headers`](Self::require_standard_headers).
    pub fn new<S: Into<String>>(secrets: impl IntoIterator<Item = S>) -> Self {
        Verifier {
            secrets: secrets
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .map(Secret::new)
                .collect(),
            require_standard: true,
            tolerance: REPLAY_TOLERANCE,
            max_body: MAX_BODY,
        }
    }

    /// Whether requests without Standard Webhooks headers are refused (the default). The
    /// legacy signature alone signs neither the time nor the id, so a captured request can
    /// be replayed under a fresh id; `false` accepts it, for senders older than the
    /// Standard headers (vendora-observe sends both unless `WEBHOOK_STANDARD_HEADERS=false`).
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
        let rooms = match value.get_mut("rooms").map(Value::take) {
            None => None,
            Some(rooms) => Some(serde_json::from_value(rooms).map_err(|_| Rejection::Malformed)?),
        };
        Ok(IncomingEvent {
            event,
            data,
            rooms,
            id: id.map(str::to_owned),
        })
    }
}

/// Whether `presented` equals `expected`, in constant time: both go through an HMAC under a
/// fixed key first, so neither their length nor their content shows in the timing. For app,
/// admin and page tokens.
pub fn token_matches(expected: &[u8], presented: &[u8]) -> bool {
    let mac = signature::sign(b"vendora-token-compare", expected);
    signature::verify(b"vendora-token-compare", presented, &mac)
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
        let v = Verifier::new(["k"]).require_standard_headers(false);
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
        let targeted = br#"{"event":"x","data":1,"rooms":[1]}"#;
        let sig = vendora_observe::sign(b"k", targeted);
        assert_eq!(
            v.verify(legacy(&sig, "a"), targeted).unwrap_err(),
            Rejection::Malformed,
            "rooms are strings"
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
        let v = Verifier::new(["new", "old"]).require_standard_headers(false);
        assert!(v.verify(legacy(&old, "a"), BODY).is_ok());
        assert!(v.verify(legacy(&new, "a"), BODY).is_ok());
        assert!(
            Verifier::new(["new"])
                .require_standard_headers(false)
                .verify(legacy(&old, "a"), BODY)
                .is_err()
        );
    }

    #[test]
    fn standard_headers_are_checked_with_their_window_and_required_by_default() {
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
        let stripped = |name: &str| match name {
            "webhook-signature" => None,
            other => standard(other),
        };
        assert_eq!(
            v.verify_at(stripped, BODY, sent).unwrap_err(),
            Rejection::StandardHeadersRequired,
            "a request stripped of a Standard header does not fall back to the legacy check"
        );
        assert_eq!(
            v.verify_at(standard, BODY, sent + Duration::from_secs(301))
                .unwrap_err(),
            Rejection::Stale
        );
        let legacy_sig = vendora_observe::sign(b"k", BODY);
        assert_eq!(
            v.verify(legacy(&legacy_sig, "a"), BODY).unwrap_err(),
            Rejection::StandardHeadersRequired
        );
        let lenient = v.clone().require_standard_headers(false);
        assert!(lenient.verify(legacy(&legacy_sig, "a"), BODY).is_ok());
        assert!(lenient.verify_at(standard, BODY, sent).is_ok());
    }
}
