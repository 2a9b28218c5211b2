//! [`StartError`]: why an observer (or a [`WebhookService`](crate::WebhookService)) could
//! not start. Settings have their own error, [`ConfigError`].

use std::fmt;
use std::time::Duration;

use crate::config::{ConfigError, ENV_TIMEOUT_MS};

/// An error's cause, kept for [`std::error::Error::source`].
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an observer or a webhook service could not start. The message says what to do;
/// `Debug` prints the same message, so `?` in `main` shows it too. The underlying error,
/// when there is one, is also the [`source`](std::error::Error::source).
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built (no usable TLS trust store, …).
    #[error(
        "the HTTP client for webhooks cannot be built: {source}; check that the system's CA \
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
         ObserverBuilder::outbox ({source}); check that the connection may create tables, or \
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
        fmt::Display::fmt(self, f)
    }
}
