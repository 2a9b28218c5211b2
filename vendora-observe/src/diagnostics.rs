//! Messages for the person running the application: problems they must act on (a wrong
//! secret, dead-lettered or shed events, no observer installed, events abandoned at exit).
//!
//! They go through `tracing` like every other log line. An application that installed no
//! `tracing` subscriber would never see them, so then they are also written to standard
//! error, a bounded number of times per kind, rather than lost in silence.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// What a message is about; each kind has its own stderr budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Deliveries that failed or were given up on.
    Delivery,
    /// Events shed by a full queue.
    Shed,
    /// Set-up mistakes: no observer, a write that bypasses the outbox's transaction, …
    Setup,
}

/// How many messages of one kind reach stderr when no subscriber is installed.
const STDERR_BUDGET: u32 = 20;

static BUDGETS: [AtomicU32; 3] = [const { AtomicU32::new(0) }; 3];

/// Whether a `tracing` subscriber would see a message from here (scoped or global).
pub(crate) fn has_subscriber() -> bool {
    !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
}

/// Writes `message` to stderr if no subscriber is installed, within the kind's budget.
pub(crate) fn fallback(kind: Kind, level: &str, message: fmt::Arguments<'_>) {
    if has_subscriber() {
        return;
    }
    let n = BUDGETS[kind as usize].fetch_add(1, Ordering::Relaxed);
    if n < STDERR_BUDGET {
        eprintln!("vendora-observe {level}: {message}");
    } else if n == STDERR_BUDGET {
        eprintln!(
            "vendora-observe {level}: further messages like the above are not printed; install a \
             tracing subscriber (e.g. tracing_subscriber::fmt::init()) to see every one"
        );
    }
}

/// A warning: through `tracing`, or to stderr when nothing listens.
pub(crate) fn warn(kind: Kind, message: fmt::Arguments<'_>) {
    tracing::warn!(target: "vendora_observe", "{message}");
    fallback(kind, "warning", message);
}

/// A line of information the user waits for (a receiver back after an outage): through
/// `tracing`, or to stderr when nothing listens.
pub(crate) fn info(message: fmt::Arguments<'_>) {
    tracing::info!(target: "vendora_observe", "{message}");
    fallback(Kind::Delivery, "info", message);
}

/// An error: through `tracing`, or to stderr when nothing listens.
pub(crate) fn error(kind: Kind, message: fmt::Arguments<'_>) {
    tracing::error!(target: "vendora_observe", "{message}");
    fallback(kind, "error", message);
}
