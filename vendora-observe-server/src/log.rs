//! What the server tells its operator: through `tracing`, or on standard error when the
//! program installed no subscriber (a receiver embedded in an application that logs
//! nothing must still say what it refused). The server's own lines are already limited
//! where they arise (a line per kind of refusal and 10 s), so none is cut here.

use std::fmt;

/// Whether a `tracing` subscriber would see a line from here.
fn has_subscriber() -> bool {
    !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
}

/// A warning.
pub(crate) fn warn(message: fmt::Arguments<'_>) {
    tracing::warn!(target: "vendora_observe_server", "{message}");
    if !has_subscriber() {
        eprintln!("vendora-observe-server warning: {message}");
    }
}

/// A line of information.
#[allow(dead_code)]
pub(crate) fn info(message: fmt::Arguments<'_>) {
    tracing::info!(target: "vendora_observe_server", "{message}");
    if !has_subscriber() {
        eprintln!("vendora-observe-server: {message}");
    }
}
