//! [`StartError`]: why an observer (or a [`WebhookService`](crate::WebhookService)) could
//! not start. Settings have their own error, [`ConfigError`].

use std::fmt;
use std::time::Duration;

use crate::config::{ConfigError, ENV_TIMEOUT_MS};

/// An error's cause, kept for [`std::error::Error::source`].
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an observer or a webhook service could not start. The message says what to do; the
/// underlying error, when there is one, is the [`source`](std::error::Error::source) alone
/// ([`ErrorChain`] prints both). `Debug` shows the variant, its fields and the message, so
/// `?` in `main` says what to do too.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built (no usable TLS trust store, …).
    #[error(
        "the HTTP client for webhooks cannot be built; check that the system's CA \
         certificates are installed (Debian: ca-certificates)"
    )]
    HttpClient {
        /// What went wrong.
        #[source]
        source: Cause,
    },
    /// The outbox table could not be created or read.
    #[error(
        "the outbox table vendora_outbox cannot be created in the database given to \
         ObserverBuilder::outbox; check that the connection may create tables, or \
         create it beforehand (vendora_observe::outbox::create_table, run by a role that may) \
         and grant this connection's role SELECT, INSERT, UPDATE, DELETE on vendora_outbox \
         (on PostgreSQL also USAGE on vendora_outbox_id_seq): a table already up to date needs \
         no right to create anything"
    )]
    Outbox {
        /// What the database said.
        #[source]
        source: sea_orm::DbErr,
    },
    /// The outbox's claim lease is not longer than the request timeout.
    #[error(
        "OutboxOptions::lease ({} ms) must be longer than {ENV_TIMEOUT_MS} ({} ms), or a slow \
         delivery could be claimed again and sent twice; raise the lease or lower the timeout",
        .lease.as_millis(),
        .timeout.as_millis()
    )]
    OutboxLease {
        /// `OutboxOptions::lease`.
        lease: Duration,
        /// The whole-request timeout.
        timeout: Duration,
    },
    /// The observer was built outside a Tokio runtime, so it cannot start its senders.
    #[error(
        "the observer must be built inside a Tokio runtime (its senders are Tokio tasks); \
         build it in `#[tokio::main] async fn main` or after entering a runtime"
    )]
    NoRuntime,
}

impl fmt::Debug for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => f.debug_tuple("Config").field(e).finish(),
            StartError::HttpClient { source } => f
                .debug_struct("HttpClient")
                .field("source", source)
                .field("message", &self.to_string())
                .finish(),
            StartError::Outbox { source } => f
                .debug_struct("Outbox")
                .field("source", source)
                .field("message", &self.to_string())
                .finish(),
            StartError::OutboxLease { lease, timeout } => f
                .debug_struct("OutboxLease")
                .field("lease", lease)
                .field("timeout", timeout)
                .field("message", &self.to_string())
                .finish(),
            StartError::NoRuntime => f
                .debug_struct("NoRuntime")
                .field("message", &self.to_string())
                .finish(),
        }
    }
}

/// An error and its causes on one line (`error: cause: cause`), for messages and logs.
///
/// The errors of this crate say what happened and what to do; what the system, the
/// database or the network said is their [`source`](std::error::Error::source), never
/// repeated in their own message. This prints both.
///
/// ```
/// use vendora_observe::{ErrorChain, WebhookConfig};
///
/// let e = WebhookConfig::builder().url("not a url").secret("s").build().unwrap_err();
/// let line = ErrorChain(&e).to_string();
/// assert!(line.starts_with("WEBSOCKET_SERVER_URL is not a valid URL"));
/// assert!(line.ends_with(": relative URL without a base"));
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}
