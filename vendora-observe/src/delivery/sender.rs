//! The sender: one signed POST per event over a shared keep-alive client
//! ([`WebhookService`]).
//!
//! This is the Rust form of the original design's `WebhookService`. It sends inline: the
//! caller's future completes when the receiver has answered (or the timeout passed). The
//! observers do not call it from a database hook; they hand events to the background
//! delivery (see [`crate::Observer`]), whose scheduler uses [`WebhookService::send`] for each
//! attempt.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use reqwest::{Url, redirect};
use serde::Serialize;
use tracing::Instrument;

use super::Webhook;
use super::transport::Transport;
use crate::trace::TraceParent;

use crate::body::BodyError;
use crate::config::{ENV_SECRET, ENV_URL, WebhookConfig, mask_url};
use crate::error::{Cause, StartError};
use crate::signature;

/// `User-Agent` of every request.
pub const USER_AGENT_VALUE: &str = concat!("vendora-observe/", env!("CARGO_PKG_VERSION"));
/// The legacy signature header.
pub const SIGNATURE_HEADER: &str = "x-webhook-signature";
/// The event id header, the same on every retry of one event.
pub const ID_HEADER: &str = "x-webhook-id";

/// A successful delivery: the receiver answered 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivered {
    /// The HTTP status the receiver answered (2xx).
    pub status: u16,
    /// From sending the request to the answer's head.
    pub elapsed: Duration,
}

/// Why one attempt did not deliver. The message says what happened and, where it can,
/// what to do; the underlying error is the [`source`](std::error::Error::source).
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The data could not be serialised (only from [`WebhookService::try_dispatch`]).
    #[error(transparent)]
    Body(#[from] BodyError),
    /// No connection could be made (receiver down, port closed, DNS failure).
    #[error("cannot connect to the receiver: {reason}")]
    Connect {
        /// The error and its causes, as text.
        reason: String,
        /// The error.
        #[source]
        source: Cause,
    },
    /// No complete answer within the configured timeout.
    #[error("the receiver did not answer within {} ms", .after.as_millis())]
    Timeout {
        /// The timeout that passed.
        after: Duration,
    },
    /// The receiver answered a status other than 2xx or 3xx.
    #[error("{}", status_message(*.status, *.retry_after))]
    Status {
        /// The HTTP status.
        status: u16,
        /// `Retry-After`, when the receiver sent one.
        retry_after: Option<Duration>,
    },
    /// The receiver answered a redirect, which is never followed with a signed body.
    #[error(
        "the receiver answered {status} redirecting to {}; a signed webhook is never \
         redirected: set WEBSOCKET_SERVER_URL to the final URL",
        .location.as_deref().unwrap_or("<no Location>")
    )]
    Redirect {
        /// The HTTP status.
        status: u16,
        /// Where it pointed.
        location: Option<String>,
    },
    /// The connection broke during the exchange.
    #[error("the exchange with the receiver failed: {reason}")]
    Transport {
        /// The error and its causes, as text.
        reason: String,
        /// The error.
        #[source]
        source: Cause,
    },
}

fn status_message(status: u16, retry_after: Option<Duration>) -> String {
    let name = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!("{status} {r}"))
        .unwrap_or_else(|| status.to_string());
    match (status, retry_after) {
        (401, _) => format!(
            "the receiver answered {name}: it rejected the signature, so {ENV_SECRET} \
             probably differs from the WebSocket server's secret"
        ),
        (404 | 405, _) => format!(
            "the receiver answered {name}: nothing takes webhooks at this path, so the path \
             in {ENV_URL} is probably wrong (it must be the server's webhook route, such as \
             /webhook)"
        ),
        (_, Some(after)) => format!(
            "the receiver answered {name} (Retry-After {} s)",
            after.as_secs()
        ),
        _ => format!("the receiver answered {name}"),
    }
}

impl DeliveryError {
    /// Whether trying again later can succeed: connection problems, timeouts, 408, 429 and
    /// 5xx. Other 4xx (a 401 from a wrong secret, a 400, a 404) and redirects are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeliveryError::Body(_) | DeliveryError::Redirect { .. } => false,
            DeliveryError::Connect { .. }
            | DeliveryError::Timeout { .. }
            | DeliveryError::Transport { .. } => true,
            DeliveryError::Status { status, .. } => {
                (500..600).contains(status) || *status == 408 || *status == 429
            }
        }
    }

    /// The receiver's `Retry-After`, on the statuses where it is honoured (429 and 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Status {
                status: 429 | 503,
                retry_after,
            } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status the receiver answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Status { status, .. } | DeliveryError::Redirect { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// A short machine-readable kind, for logs and the outbox's `last_error`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeliveryError::Body(_) => "body",
            DeliveryError::Connect { .. } => "connect",
            DeliveryError::Timeout { .. } => "timeout",
            DeliveryError::Status { .. } => "status",
            DeliveryError::Redirect { .. } => "redirect",
            DeliveryError::Transport { .. } => "transport",
        }
    }
}

/// Sends signed webhooks to the configured WebSocket server.
///
/// Cheap to clone (an `Arc` inside); every clone shares one pool of kept-alive connections
/// (HTTP/1.1 over hyper for `http://`, reqwest with rustls for `https://`). Redirects are
/// never followed.
///
/// ```no_run
/// use vendora_observe::{WebhookConfig, WebhookService};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let service = WebhookService::new(WebhookConfig::from_env()?)?;
/// // Never fails: a problem is logged with `tracing`.
/// service.dispatch("product:deleted", &serde_json::json!({ "id": 3 })).await;
/// // When the outcome matters:
/// let delivered = service.try_dispatch("product:deleted", &serde_json::json!({ "id": 3 })).await?;
/// println!("{} in {:?}", delivered.status, delivered.elapsed);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WebhookService {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebhookConfig,
    /// The current secret's and then each previous secret's keyed HMAC states.
    signers: Vec<signature::Signer>,
    transport: Transport,
    /// The endpoint as it may appear in logs: without user name or password.
    log_url: String,
}

impl fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookService")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl WebhookService {
    /// A service for `config`, with its own connection pool.
    pub fn new(config: WebhookConfig) -> Result<Self, StartError> {
        let transport = Transport::new(config.parsed_url(), config.connect_timeout(), || {
            build_client(&config)
        })
        .map_err(|source| StartError::HttpClient { source })?;
        let log_url = mask_url(&redact_url(config.parsed_url()));
        let signers = std::iter::once(config.secret())
            .chain(config.previous_secrets())
            .map(|s| signature::Signer::new(s.expose()))
            .collect();
        Ok(WebhookService {
            inner: Arc::new(Inner {
                config,
                signers,
                transport,
                log_url,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WebhookConfig {
        &self.inner.config
    }

    /// The endpoint with any credentials removed, as it appears in logs.
    pub fn endpoint_for_logs(&self) -> &str {
        &self.inner.log_url
    }

    /// Sends `event` with `data` and waits for the answer. Never returns an error: a
    /// failure is logged (event, URL, status or error kind) at `warn`, or `error` for a 401.
    pub async fn dispatch<T: Serialize + ?Sized>(&self, event: &str, data: &T) {
        if let Err(e) = self.try_dispatch(event, data).await {
            self.log_failure(event, None, &e);
        }
    }

    /// Sends `event` with `data` and returns the outcome.
    pub async fn try_dispatch<T: Serialize + ?Sized>(
        &self,
        event: &str,
        data: &T,
    ) -> Result<Delivered, DeliveryError> {
        let webhook = Webhook::build(event, data)?;
        self.send(&webhook).await
    }

    /// One attempt at delivering `webhook`: signs its bytes and POSTs those same bytes.
    pub async fn send(&self, webhook: &Webhook) -> Result<Delivered, DeliveryError> {
        let bytes: Bytes = webhook.body().shared_bytes();
        // This attempt is a span of the event's trace, the parent of what the receiver does:
        // with OpenTelemetry, the attempt span's own context.
        let span = tracing::info_span!(
            "webhook.attempt",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let attempt = TraceParent::of_span(&span)
            .filter(|a| a.same_trace(&webhook.trace()))
            .unwrap_or_else(|| webhook.trace().child());
        if !span.is_disabled() {
            span.record("trace_id", attempt.trace_id());
            span.record("span_id", attempt.span_id());
        }
        let headers = |map: &mut HeaderMap| self.headers(map, webhook, &bytes, &attempt);
        self.post(&headers, &bytes).instrument(span).await
    }

    /// Adds an attempt's headers (again for a resend on a new connection).
    fn headers(
        &self,
        headers: &mut HeaderMap,
        webhook: &Webhook,
        bytes: &Bytes,
        attempt: &TraceParent,
    ) {
        let config = &self.inner.config;
        let signers = &self.inner.signers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        headers.insert(SIGNATURE_HEADER, ascii_value(&signers[0].legacy(bytes)));
        let id = ascii_value(webhook.id().as_bytes());
        headers.insert(ID_HEADER, id.clone());
        if config.standard_headers() {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            headers.insert("webhook-id", id);
            headers.insert("webhook-timestamp", HeaderValue::from(ts));
            // One signature per current secret: receivers that know only one of them (during
            // a rotation) find theirs.
            let mut signatures = String::with_capacity(48 * signers.len());
            for (i, signer) in signers.iter().enumerate() {
                if i > 0 {
                    signatures.push(' ');
                }
                signer.standard_into(webhook.id(), ts, bytes, &mut signatures);
            }
            headers.insert("webhook-signature", ascii_value(signatures.as_bytes()));
        }
        headers.insert("traceparent", ascii_value(&attempt.header_bytes()));
    }

    /// The POST itself (see [`Transport`]), and what its answer means.
    async fn post(
        &self,
        headers: &(dyn Fn(&mut HeaderMap) + Sync),
        bytes: &Bytes,
    ) -> Result<Delivered, DeliveryError> {
        let config = &self.inner.config;
        let answer = self
            .inner
            .transport
            .post(config.parsed_url(), headers, bytes, config.timeout())
            .await?;
        let (status, elapsed) = (answer.status, answer.elapsed);
        if (200..300).contains(&status) {
            return Ok(Delivered { status, elapsed });
        }
        Err(if (300..400).contains(&status) {
            DeliveryError::Redirect {
                status,
                location: answer.location,
            }
        } else {
            DeliveryError::Status {
                status,
                retry_after: answer.retry_after.as_deref().and_then(parse_retry_after),
            }
        })
    }

    /// Logs a failed attempt the way every part of the crate does (and on stderr when no
    /// `tracing` subscriber listens).
    /// The receiver went down: one line for the whole outage (its end is told too).
    pub(crate) fn log_down(&self, error: &DeliveryError, waiting: usize, probe: Duration) {
        let url = self.endpoint_for_logs();
        let message = format!(
            "webhook receiver {url} is down ({error}); the {waiting} event(s) waiting are held \
             and go out in order once it answers, probed every {} ms at most (no event spends \
             an attempt meanwhile)",
            probe.as_millis()
        );
        tracing::warn!(
            url,
            kind = error.kind(),
            status = error.status(),
            "{message}"
        );
        crate::diagnostics::fallback(
            crate::diagnostics::Kind::Delivery,
            "warning",
            format_args!("{message}"),
        );
    }

    pub(crate) fn log_failure(&self, event: &str, id: Option<&str>, error: &DeliveryError) {
        use crate::diagnostics::{Kind, fallback};
        let url = self.endpoint_for_logs();
        let id = id.unwrap_or("-");
        let kind = error.kind();
        let status = error.status();
        if status == Some(401) {
            tracing::error!(event, id, url, kind, status, "webhook rejected: {error}");
            fallback(
                Kind::Delivery,
                "error",
                format_args!("webhook {event} (X-Webhook-Id {id}) to {url} rejected: {error}"),
            );
        } else {
            tracing::warn!(
                event,
                id,
                url,
                kind,
                status,
                "webhook not delivered: {error}"
            );
            fallback(
                Kind::Delivery,
                "warning",
                format_args!("webhook {event} (X-Webhook-Id {id}) to {url} not delivered: {error}"),
            );
        }
    }
}

fn ascii_value(s: &[u8]) -> HeaderValue {
    // Hex, base64, digits and UUIDs are always valid header values.
    HeaderValue::from_bytes(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn build_client(config: &WebhookConfig) -> Result<reqwest::Client, Cause> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    // ring rather than aws-lc-rs: no C/CMake build, and TLS speed is not what limits a
    // webhook sender. The platform verifier uses the system's trust store. rustls 0.23.48
    // deprecates ring's provider because it offers no post-quantum key exchange; it is
    // still supported, and without the allow a fresh resolve of rustls turns the lint into
    // a warning for every build of this crate from source (an error under -D warnings).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(redirect::Policy::none())
        .timeout(config.timeout())
        .connect_timeout(config.connect_timeout())
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(Into::into)
}

/// `Retry-After` is either delay-seconds or an HTTP-date.
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_username("");
        let _ = u.set_password(None);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        let status = |s: u16| DeliveryError::Status {
            status: s,
            retry_after: None,
        };
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(status(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 422] {
            assert!(!status(s).is_retryable(), "{s}");
        }
        assert!(
            DeliveryError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(
            !DeliveryError::Redirect {
                status: 302,
                location: None
            }
            .is_retryable()
        );
    }

    #[test]
    fn a_401_names_the_secret() {
        let e = DeliveryError::Status {
            status: 401,
            retry_after: None,
        };
        assert!(
            e.to_string().contains("WEBHOOK_SECRET probably differs"),
            "{e}"
        );
    }

    #[test]
    fn a_404_or_405_names_the_url_setting() {
        for status in [404, 405] {
            let e = DeliveryError::Status {
                status,
                retry_after: None,
            };
            assert!(
                e.to_string()
                    .contains("the path in WEBSOCKET_SERVER_URL is probably wrong"),
                "{e}"
            );
        }
    }

    #[test]
    fn credentials_never_reach_the_log_url() {
        let u = Url::parse("https://user:pw@ws.example.com/hook").unwrap();
        assert_eq!(redact_url(&u), "https://ws.example.com/hook");
    }
}
