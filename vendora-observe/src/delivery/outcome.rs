//! What one attempt came to: [`Delivered`], or why not ([`DeliveryError`]). Apart from the
//! sender so that its transport, which makes the attempt, need not name the sender.

use std::time::Duration;

use crate::body::BodyError;
use crate::config::{ENV_SECRET, ENV_URL};
use crate::error::Cause;

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
/// what to do; the underlying error is the [`source`](std::error::Error::source) alone
/// ([`ErrorChain`](crate::ErrorChain) prints both).
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The data could not be serialised (only from [`WebhookService::try_dispatch`](crate::WebhookService::try_dispatch)).
    #[error(transparent)]
    Body(#[from] BodyError),
    /// No connection could be made (receiver down, port closed, DNS failure).
    #[error("cannot connect to the receiver")]
    Connect {
        /// What the system said.
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
    #[error("the exchange with the receiver failed")]
    Transport {
        /// What the connection said.
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
