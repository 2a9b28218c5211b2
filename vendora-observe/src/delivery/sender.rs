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
pub use super::outcome::{Delivered, DeliveryError};
use super::transport::Transport;
use crate::trace::TraceParent;

use crate::config::{WebhookConfig, mask_url};
use crate::error::{Cause, ErrorChain, StartError};
use crate::signature;

/// `User-Agent` of every request.
pub const USER_AGENT_VALUE: &str = concat!("vendora-observe/", env!("CARGO_PKG_VERSION"));
/// The legacy signature header.
pub const SIGNATURE_HEADER: &str = "x-webhook-signature";
/// The event id header, the same on every retry of one event.
pub const ID_HEADER: &str = "x-webhook-id";

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
            "webhook receiver {url} is down ({}); the {waiting} event(s) waiting are held \
             and go out in order once it answers, probed every {} ms at most (no event spends \
             an attempt meanwhile)",
            ErrorChain(error),
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
        let error = ErrorChain(error);
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
