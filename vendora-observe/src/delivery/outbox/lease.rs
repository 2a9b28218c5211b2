//! The relay's lease on the rows it claimed, as the scheduler sees it: no attempt starts
//! that would outlast it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::delivery::scheduler::Gate;

/// The outbox's lease on the rows it handed over: valid until this many milliseconds after
/// the Unix epoch. An attempt starts only if it would end within the lease.
pub(crate) struct Lease {
    valid_until_ms: AtomicI64,
}

impl Lease {
    pub(crate) fn new(valid_until_ms: i64) -> Self {
        Lease {
            valid_until_ms: AtomicI64::new(valid_until_ms),
        }
    }

    pub(crate) fn extend_to(&self, ms: i64) {
        self.valid_until_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

impl Gate for Lease {
    fn admits(&self, attempt: Duration) -> bool {
        self.valid_until_ms.load(Ordering::Acquire) > now_ms() + attempt.as_millis() as i64
    }
}

/// Milliseconds since the Unix epoch: the clock leases and retry times are kept in.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// The advisory lock (PostgreSQL) that orders leases and requeues: a lease holds it shared,
/// a requeue alone (`outbox::requeue`), each taken before the statement reads. A
/// requeue then sees every lease that began before it, and a lease every requeue that
/// committed before it: no newer event of a row is leased by one relay while a requeue puts
/// an older one in front of it for another (both would go out, the older one last).
pub(crate) const REQUEUE_LOCK: i64 = 0x0076_656e_646f_7271;
