//! How many senders run: `concurrency`, and a stand-in for each request that turned slow.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// The senders: `concurrency` of them, and one more for each request counted slow, up to
/// the slow slots. A request is slow once it has taken 8 times the usual answer time
/// (25 ms to 1 s), or from the start when the last request of its row was slow; the
/// sender that waits on it no longer counts, and a stand-in takes the ready events
/// meanwhile. When fewer are wanted, a sender leaves instead of taking its next event.
pub(super) struct Pace {
    pub(super) concurrency: usize,
    pub(super) slots: usize,
    /// Sender tasks running.
    pub(super) senders: AtomicUsize,
    /// Requests in flight counted slow.
    pub(super) slow: AtomicUsize,
    /// A moving average (1/16 weight) of how long requests that were not slow took, in µs.
    pub(super) usual_us: AtomicU64,
}

impl Pace {
    pub(super) const FLOOR: Duration = Duration::from_millis(25);
    pub(super) const CEILING: Duration = Duration::from_secs(1);

    pub(super) fn new(concurrency: usize, slots: usize) -> Pace {
        Pace {
            concurrency,
            slots,
            senders: AtomicUsize::new(concurrency),
            slow: AtomicUsize::new(0),
            usual_us: AtomicU64::new(10_000),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.slots > 0
    }

    /// How long a request may take before it counts as slow.
    pub(super) fn slow_after(&self) -> Duration {
        Duration::from_micros(8 * self.usual_us.load(Ordering::Relaxed))
            .clamp(Self::FLOOR, Self::CEILING)
    }

    /// A request that did not count as slow took `took`.
    pub(super) fn answered(&self, took: Duration) {
        let took = took.as_micros().min(u128::from(u32::MAX)) as u64;
        let _ = self
            .usual_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |usual| {
                Some(usual - usual / 16 + took / 16)
            });
    }

    pub(super) fn wanted(&self) -> usize {
        self.concurrency + self.slow.load(Ordering::Acquire).min(self.slots)
    }

    /// One more sender, if fewer run than are wanted.
    pub(super) fn take_sender_slot(&self) -> bool {
        self.senders
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.wanted()).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether this sender should leave: more run than are wanted.
    pub(super) fn leave(&self) -> bool {
        self.senders
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > self.wanted()).then_some(n - 1)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_follow_the_slow_requests_up_to_the_slots() {
        let pace = Pace::new(8, 2);
        // Eight run, eight wanted.
        assert!(!pace.take_sender_slot());
        assert!(!pace.leave());
        pace.slow.fetch_add(1, Ordering::AcqRel);
        assert!(pace.take_sender_slot());
        assert!(!pace.take_sender_slot());
        // Three slow requests, two slots: ten senders at most.
        pace.slow.fetch_add(2, Ordering::AcqRel);
        assert!(pace.take_sender_slot());
        assert!(!pace.take_sender_slot());
        assert_eq!(pace.senders.load(Ordering::Acquire), 10);
        // Answered: the stand-ins leave, the eight stay.
        pace.slow.fetch_sub(3, Ordering::AcqRel);
        assert!(pace.leave());
        assert!(pace.leave());
        assert!(!pace.leave());
        assert_eq!(pace.senders.load(Ordering::Acquire), 8);
    }

    #[test]
    fn slow_is_eight_times_the_usual_answer_within_bounds() {
        let pace = Pace::new(8, 128);
        assert_eq!(pace.slow_after(), Duration::from_millis(80));
        for _ in 0..200 {
            pace.answered(Duration::from_millis(5));
        }
        let after = pace.slow_after();
        assert!(
            (Duration::from_millis(39)..=Duration::from_millis(41)).contains(&after),
            "{after:?}"
        );
        for _ in 0..200 {
            pace.answered(Duration::from_micros(300));
        }
        assert_eq!(pace.slow_after(), Pace::FLOOR);
        for _ in 0..200 {
            pace.answered(Duration::from_millis(400));
        }
        assert_eq!(pace.slow_after(), Pace::CEILING);
    }
}
