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

pub(crate) mod direct;
pub mod outbox;
mod outcome;
pub(crate) mod scheduler;
pub(crate) mod sender;
mod transport;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;

use crate::body::{BodyError, WebhookBody};
use crate::telemetry::{self, Count, Mode};
use crate::trace::TraceParent;
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

/// How failed deliveries are retried, in both delivery modes.
///
/// Two kinds of failure are told apart:
///
/// - **The receiver is unreachable or failing** (a connection refused or cut, a timeout, a
///   5xx, 408 or 429) and nothing it was sent has succeeded since the attempt began: that is
///   a state of the endpoint, not of the event. Sending stops, but for one *probe* (the next
///   event in order) every [`probe_interval`](Self::probe_interval) at most (doubling from
///   `base_delay` up to it, or the receiver's `Retry-After`); the moment a probe succeeds,
///   the whole backlog flows, in order. No event spends an attempt meanwhile, so an outage
///   dead-letters nothing: an event is given up on only past [`max_age`](Self::max_age).
/// - **The event itself fails** while others get through (a 5xx for this body only), or is
///   refused (a 4xx other than 408 and 429: not retried): its attempts count, retried with
///   exponential backoff and full jitter — the delay before retry *n* is drawn from
///   `0..=min(max_delay, base_delay * 2^(n-1))`, or the receiver's `Retry-After` on 429 and
///   503, up to `max_retry_after` — and dead-lettered after `max_attempts`.
///
/// The default: 10 attempts of the event's own over at most ~2 minutes (delays of at most
/// 0.25, 0.5, 1, 2, 4, 8, 16, 30, 30 s), a probe every 0.5 s at most while the receiver is
/// down, a maximum age of 24 hours.
///
/// ```
/// # use std::time::Duration;
/// # use vendora_observe::RetryPolicy;
/// let policy = RetryPolicy::default();
/// assert!(policy.delay(1, None) <= Duration::from_millis(250));
/// assert!(policy.delay(20, None) <= Duration::from_secs(30));
/// assert_eq!(policy.delay(1, Some(Duration::from_secs(3))), Duration::from_secs(3));
///
/// let patient = RetryPolicy::default()
///     .max_attempts(20)
///     .max_age(Duration::from_secs(3600));
/// assert_eq!((patient.max_attempts, patient.max_age), (20, Duration::from_secs(3600)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included, that fail for the event itself; after the last
    /// the event is dead-lettered.
    pub max_attempts: u32,
    /// The ceiling of the first retry's delay.
    pub base_delay: Duration,
    /// The largest backoff delay.
    pub max_delay: Duration,
    /// The largest `Retry-After` that is honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
    /// While the receiver is down, the longest time between two probes.
    pub probe_interval: Duration,
    /// An event not delivered this long after its write is dead-lettered, however the
    /// receiver fares.
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
            probe_interval: Duration::from_millis(500),
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries an event's own failure: one attempt, then dead-letter.
    /// (A receiver that is down is still waited for, up to [`max_age`](Self::max_age).)
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Sets [`max_attempts`](Self::max_attempts) (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets [`base_delay`](Self::base_delay).
    #[must_use]
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// Sets [`max_delay`](Self::max_delay).
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets [`max_retry_after`](Self::max_retry_after).
    #[must_use]
    pub fn max_retry_after(mut self, delay: Duration) -> Self {
        self.max_retry_after = delay;
        self
    }

    /// Sets [`probe_interval`](Self::probe_interval).
    #[must_use]
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// Sets [`max_age`](Self::max_age).
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The delay before the next attempt, after `failed_attempts` failures.
    pub fn delay(&self, failed_attempts: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_retry_after);
        }
        let exp = failed_attempts.saturating_sub(1).min(30);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

/// What becomes of an event after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Try again after this delay.
    Retry(Duration),
    /// Give up: dead-letter it.
    Dead,
}

/// The retry / dead-letter decision, for both modes: retryable failures are retried until
/// the policy's last attempt, with its backoff or the receiver's `Retry-After`.
pub(crate) fn decide(policy: &RetryPolicy, attempts: u32, error: &DeliveryError) -> Decision {
    if error.is_retryable() && attempts < policy.max_attempts {
        Decision::Retry(policy.delay(attempts, error.retry_after()))
    } else {
        Decision::Dead
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

/// Counters of an observer, read with [`Observer::stats`](crate::Observer::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Events the hooks handed over (in outbox mode: rows written, including any in a
    /// transaction that was then rolled back).
    pub emitted: u64,
    /// Events delivered (answered 2xx).
    pub sent: u64,
    /// Retries scheduled after a failed attempt.
    pub retried: u64,
    /// Attempts that failed (each retry's failure counts).
    pub failed: u64,
    /// Events given up on (dead-lettered): after their last attempt, or left at shutdown.
    pub dead: u64,
    /// Events not sent because a newer event of their row superseded them (latest-wins
    /// coalescing, or a requeued dead event that a delivered newer one made stale).
    pub superseded: u64,
    /// Events accepted and not yet delivered, dead-lettered or superseded. In outbox mode,
    /// the table's pending rows, whichever process wrote them: counted by the relay at each
    /// look for work while idle (every `poll_interval`, or when woken) and every second
    /// while it holds rows, and by [`Observer::flush`](crate::Observer::flush).
    pub pending: u64,
    /// Events refused because the queue was full ([`Overflow::Shed`]) or closed.
    pub shed: u64,
}

/// An observer's counters: [`Stats`], and the same counts through the `metrics` facade
/// (feature `metrics`, see [`crate::telemetry`]).
pub(crate) struct Counters {
    mode: Mode,
    emitted: AtomicU64,
    sent: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    superseded: AtomicU64,
    pending: AtomicU64,
    shed: AtomicU64,
    /// Signalled when `pending` drops to zero.
    idle: Notify,
    /// Signalled whenever pending events leave (room for [`Overflow::Wait`]), while
    /// `space_waiters` says that a write waits for it.
    pub(crate) space: Notify,
    space_waiters: AtomicUsize,
}

/// A write counted as waiting for room (see [`Counters::waiting_for_space`]), until dropped.
pub(crate) struct SpaceWaiter<'a>(&'a Counters);

impl Drop for SpaceWaiter<'_> {
    fn drop(&mut self) {
        self.0.space_waiters.fetch_sub(1, AtomicOrdering::SeqCst);
    }
}

impl Counters {
    pub(crate) fn new(mode: Mode) -> Counters {
        Counters {
            mode,
            emitted: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            idle: Notify::new(),
            space: Notify::new(),
            space_waiters: AtomicUsize::new(0),
        }
    }
    pub(crate) fn try_reserve(&self, n: u64, capacity: usize) -> bool {
        self.pending
            .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |p| {
                (p + n <= capacity as u64).then_some(p + n)
            })
            .is_ok()
    }
    pub(crate) fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        if self.pending.fetch_sub(n, AtomicOrdering::SeqCst) == n {
            self.idle.notify_waiters();
        }
        // A waiter registers before it counts itself and looks at `pending` after (both
        // SeqCst, as here): either it sees the room, or this sees it.
        if self.space_waiters.load(AtomicOrdering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }
    /// Counts the caller as waiting for room until the guard is dropped (also when its
    /// future is). Register on `space` first, then count, then look at `pending` once more.
    pub(crate) fn waiting_for_space(&self) -> SpaceWaiter<'_> {
        self.space_waiters.fetch_add(1, AtomicOrdering::SeqCst);
        SpaceWaiter(self)
    }
    pub(crate) fn set_pending(&self, n: u64) {
        if self.pending.swap(n, AtomicOrdering::AcqRel) != 0 && n == 0 {
            self.idle.notify_waiters();
        }
    }
    pub(crate) fn pending(&self) -> u64 {
        self.pending.load(AtomicOrdering::Acquire)
    }
    fn count(&self, counter: &AtomicU64, which: Count, event: &str, n: u64) {
        counter.fetch_add(n, AtomicOrdering::Relaxed);
        telemetry::count(which, self.mode, event, n);
    }
    pub(crate) fn emitted(&self, jobs: &[Job]) {
        for job in jobs {
            self.count(&self.emitted, Count::Emitted, job.webhook.event(), 1);
        }
    }
    pub(crate) fn sent(&self, event: &str, born: SystemTime) {
        self.count(&self.sent, Count::Sent, event, 1);
        telemetry::delivered(self.mode, event, born);
    }
    pub(crate) fn retried(&self, event: &str) {
        self.count(&self.retried, Count::Retried, event, 1);
    }
    pub(crate) fn failed(&self, event: &str) {
        self.count(&self.failed, Count::Failed, event, 1);
    }
    pub(crate) fn dead(&self, event: &str) {
        self.count(&self.dead, Count::Dead, event, 1);
    }
    pub(crate) fn superseded(&self, event: &str) {
        self.count(&self.superseded, Count::Superseded, event, 1);
    }
    pub(crate) fn shed(&self, jobs: &[Job]) {
        for job in jobs {
            self.count(&self.shed, Count::Shed, job.webhook.event(), 1);
        }
    }
    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            emitted: self.emitted.load(AtomicOrdering::Relaxed),
            sent: self.sent.load(AtomicOrdering::Relaxed),
            retried: self.retried.load(AtomicOrdering::Relaxed),
            failed: self.failed.load(AtomicOrdering::Relaxed),
            dead: self.dead.load(AtomicOrdering::Relaxed),
            superseded: self.superseded.load(AtomicOrdering::Relaxed),
            pending: self.pending.load(AtomicOrdering::Acquire),
            shed: self.shed.load(AtomicOrdering::Relaxed),
        }
    }
    /// Waits until nothing is pending, or `deadline` passes.
    pub(crate) async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), idle)
                .await
                .is_err()
            {
                return self.pending() == 0;
            }
        }
    }
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
    fn only_retryable_failures_before_the_last_attempt_are_retried() {
        let policy = RetryPolicy::default().max_attempts(3);
        let unavailable = DeliveryError::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            decide(&policy, 1, &unavailable),
            Decision::Retry(Duration::from_secs(2))
        );
        assert_eq!(decide(&policy, 3, &unavailable), Decision::Dead);
        let unauthorized = DeliveryError::Status {
            status: 401,
            retry_after: None,
        };
        assert_eq!(decide(&policy, 1, &unauthorized), Decision::Dead);
    }

    #[test]
    fn chain_keys_are_stable_and_tagged() {
        assert_eq!(ChainKey::row("product:1"), ChainKey::row("product:1"));
        assert_ne!(ChainKey::row("x"), ChainKey::unit("x"));
    }
}
