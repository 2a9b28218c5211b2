//! The retry policy, and the one place an attempt's failure is judged: retry, or give up.

use std::time::Duration;

use super::DeliveryError;

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
}
