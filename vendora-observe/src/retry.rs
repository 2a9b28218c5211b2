//! When to try again: exponential backoff with full jitter, and `Retry-After`.

use std::time::Duration;

/// How failed deliveries are retried, in both delivery modes.
///
/// The delay before retry *n* (after the *n*-th failed attempt) is drawn uniformly from
/// `0..=min(max_delay, base_delay * 2^(n-1))` ("full jitter"), so receivers coming back
/// up are not hit by every sender at the same instant. A `Retry-After` on 429 or 503 is
/// used instead, up to `max_retry_after`. Only retryable failures are retried
/// ([`DeliveryError::is_retryable`](crate::DeliveryError::is_retryable)).
///
/// The default makes 10 attempts over at most ~2 minutes: delays of at most 0.25, 0.5, 1,
/// 2, 4, 8, 16, 30, 30 s.
///
/// ```
/// # use std::time::Duration;
/// # use vendora_observe::RetryPolicy;
/// let policy = RetryPolicy::default();
/// assert!(policy.delay(1, None) <= Duration::from_millis(250));
/// assert!(policy.delay(20, None) <= Duration::from_secs(30));
/// assert_eq!(policy.delay(1, Some(Duration::from_secs(3))), Duration::from_secs(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last the event is dead-lettered.
    pub max_attempts: u32,
    /// The ceiling of the first retry's delay.
    pub base_delay: Duration,
    /// The largest backoff delay.
    pub max_delay: Duration,
    /// The largest `Retry-After` that is honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries: one attempt, then dead-letter.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
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
