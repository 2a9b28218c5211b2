//! Delivery: one scheduler, two sources.
//!
//! ```text
//! hooks ─> direct (in-memory queue) ─┐
//!                                    ├─> Scheduler: chains, ready set, timers ─> sender (one signed POST)
//! hooks ─> outbox table ─> relay ────┘        │
//!                   ^── outcomes written ─────┘
//! ```
//!
//! Every event belongs to *chains*: the chain of its row (`entity` and primary key) and,
//! under [`Order::Causal`] (the default), the chain of the unit of work that made the write
//! (the Tokio task, so also the transaction running in it). An event is sent only once it is
//! at the head of each of its chains, so no app ever sees a row's history, or a task's
//! writes, out of order; events that share no chain go out in parallel. A failed attempt
//! waits on a timer and holds only its own chains.
//!
//! This module holds what both sources share: the event ([`Webhook`]), the retry and
//! dead-letter decision (made once, in `decide`), the counters and the dead-letter type.

mod counters;
pub(crate) mod direct;
pub mod outbox;
mod outcome;
mod retry;
pub(crate) mod scheduler;
pub(crate) mod sender;
mod transport;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::body::{BodyError, WebhookBody};
use crate::trace::TraceParent;
pub(crate) use counters::Counters;
pub use counters::Stats;
pub use retry::RetryPolicy;
pub(crate) use retry::{Decision, decide};
pub use sender::{Delivered, DeliveryError, WebhookService};

/// One event ready to send: a unique id (kept across retries), its body, and the trace it
/// belongs to (sent as `traceparent`, see [`crate::trace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    id: String,
    body: WebhookBody,
    trace: TraceParent,
}

impl Webhook {
    /// A new event with a fresh id (a UUIDv7: unique, and sortable by creation time), in a
    /// trace of its own.
    pub fn new(body: WebhookBody) -> Self {
        Webhook {
            id: uuid::Uuid::now_v7().to_string(),
            body,
            trace: TraceParent::start(),
        }
    }

    /// Serialises `data` under `event` and gives it a fresh id.
    pub fn build<T: Serialize + ?Sized>(event: &str, data: &T) -> Result<Self, BodyError> {
        Ok(Self::new(WebhookBody::new(event, data)?))
    }

    /// The same event in the trace `trace` (whose span is the event's parent).
    pub fn in_trace(mut self, trace: TraceParent) -> Self {
        self.trace = trace;
        self
    }

    /// An event with a known id and trace (the outbox stores them).
    pub(crate) fn stored(id: String, body: WebhookBody, trace: TraceParent) -> Self {
        Webhook { id, body, trace }
    }

    /// The trace the event belongs to; its span id is the write's.
    pub fn trace(&self) -> TraceParent {
        self.trace
    }

    /// The `X-Webhook-Id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The body.
    pub fn body(&self) -> &WebhookBody {
        &self.body
    }

    /// The event name.
    pub fn event(&self) -> &str {
        self.body.event()
    }
}

/// Which order the apps are guaranteed to see events in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Order {
    /// The default. Events never arrive in an order that contradicts one row's history
    /// (`(entity, primary key)`) nor the order in which one unit of work (a Tokio task,
    /// so a request handler, and any transaction it runs) made its writes. Events related
    /// by neither go out in parallel. One task's writes therefore leave one at a time.
    #[default]
    Causal,
    /// Only each row's own history is kept in order; the writes of one task to different
    /// rows go out in parallel. For bulk imports and back-fills where throughput matters
    /// more than the order across rows.
    PerRow,
}

/// What kind of change an event reports; decides which newer events supersede it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `E:created`, the full model.
    Created,
    /// `E:updated`, the full model.
    Updated,
    /// `E:deleted`, `{"id": …}`.
    Deleted,
    /// A watched column's `f:updated`.
    Watch,
}

impl EventKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Updated => "updated",
            EventKind::Deleted => "deleted",
            EventKind::Watch => "watch",
        }
    }

    pub(crate) fn parse(s: &str) -> EventKind {
        match s {
            "created" => EventKind::Created,
            "deleted" => EventKind::Deleted,
            "watch" => EventKind::Watch,
            _ => EventKind::Updated,
        }
    }
}

/// An event as the scheduler holds it.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// Shared: a sender takes it under the scheduler's lock, where a clone must be cheap.
    pub(crate) webhook: Arc<Webhook>,
    /// The row's chain.
    pub(crate) row: ChainKey,
    /// The unit of work's chain ([`Order::Causal`] only).
    pub(crate) unit: Option<ChainKey>,
    pub(crate) kind: EventKind,
    /// Latest-wins: skip this event when a newer one of its row supersedes it.
    pub(crate) coalesce: bool,
    /// Attempts already made (the outbox remembers them across restarts).
    pub(crate) attempts: u32,
    /// The source's handle on the event: the outbox row id; 0 in direct mode.
    pub(crate) token: i64,
    /// When the write made it (outbox: when its row was inserted).
    pub(crate) born: SystemTime,
    /// The span current at the write (direct mode): the parent of the delivery's span.
    pub(crate) span: tracing::Span,
}

/// A chain's identity: a hash of its name. Two chains that collide merge into one, which
/// only orders events that needed no order; it never reorders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ChainKey(pub(crate) u64);

impl ChainKey {
    pub(crate) fn row(ordering_key: &str) -> ChainKey {
        ChainKey::of(b'r', ordering_key)
    }

    pub(crate) fn unit(unit_key: &str) -> ChainKey {
        ChainKey::of(b'u', unit_key)
    }

    fn of(tag: u8, name: &str) -> ChainKey {
        // Fixed keys: the same name hashes the same in every process of one build.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tag.hash(&mut h);
        name.hash(&mut h);
        ChainKey(h.finish())
    }
}

/// An event that could not be delivered after its last attempt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event, with the id and bytes that were sent.
    pub webhook: Webhook,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure, as a sentence.
    pub last_error: String,
    /// The receiver's HTTP status in the last answer, when it answered (a 401: the secrets
    /// differ; a 404: the path is wrong); `None` for a timeout, a refused connection, or
    /// an event that was never sent (its maximum age, the shutdown deadline).
    pub status: Option<u16>,
}

pub(crate) type DeadLetterHandler = Arc<dyn Fn(DeadLetter) + Send + Sync>;

/// What direct mode does with an event when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// Drop the new event, count it in [`Stats::shed`] and log it: the write never waits.
    /// The default.
    #[default]
    Shed,
    /// The hook waits until the queue has room: no event is shed, but a write can wait on
    /// a slow receiver.
    Wait,
}

/// What a source hands the scheduler: its settings and shared parts.
pub(crate) struct Context {
    pub(crate) service: WebhookService,
    pub(crate) policy: RetryPolicy,
    pub(crate) counters: Arc<Counters>,
    pub(crate) dead_letter: Option<DeadLetterHandler>,
    /// Sends at once, at most, not counting slow ones.
    pub(crate) concurrency: usize,
    /// Slow sends (see [`crate::ObserverBuilder::slow_request_slots`]) beyond
    /// `concurrency`, at most.
    pub(crate) slow_slots: usize,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("policy", &self.policy)
            .field("concurrency", &self.concurrency)
            .field("slow_slots", &self.slow_slots)
            .finish_non_exhaustive()
    }
}

/// What the shutdown deadline found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Leftovers {
    /// Requests cut while in flight: the receiver may or may not have processed them.
    pub(crate) unknown: u64,
    /// Events never delivered: queued, or waiting to retry.
    pub(crate) left: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_keys_are_stable_and_tagged() {
        assert_eq!(ChainKey::row("product:1"), ChainKey::row("product:1"));
        assert_ne!(ChainKey::row("x"), ChainKey::unit("x"));
    }
}
