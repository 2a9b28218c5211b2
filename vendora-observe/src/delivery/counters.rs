//! An observer's counters: [`Stats`], the pending count writes wait on when the queue is
//! full, and the same counts through the `metrics` facade.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;

use super::Job;
use crate::telemetry::{self, Count, Mode};

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
    /// Events refused because the queue was full ([`Overflow::Shed`](crate::Overflow::Shed)) or
    /// closed.
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
