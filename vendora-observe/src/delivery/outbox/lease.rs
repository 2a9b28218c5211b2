//! The relay's lease on the rows it claimed, as the scheduler sees it: no attempt starts
//! that would outlast it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, QueryResult, Statement, TransactionSession, TransactionTrait,
};

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

/// How a statement takes [`REQUEUE_LOCK`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum RequeueLock {
    /// A lease: beside other leases.
    Shared,
    /// A requeue: alone.
    Alone,
}

/// Runs `statement` holding [`REQUEUE_LOCK`] as `how` says: on PostgreSQL in a transaction
/// that takes the lock before the statement reads (SQLite runs one writer at a time, which
/// orders them already).
pub(crate) async fn under_requeue_lock<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    how: RequeueLock,
    statement: Statement,
) -> Result<Vec<QueryResult>, DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return db.query_all_raw(statement).await;
    }
    let lock = match how {
        RequeueLock::Shared => "pg_advisory_xact_lock_shared",
        RequeueLock::Alone => "pg_advisory_xact_lock",
    };
    let txn = db.begin().await?;
    txn.execute_unprepared(&format!("SELECT {lock}({REQUEUE_LOCK})"))
        .await?;
    let rows = txn.query_all_raw(statement).await?;
    txn.commit().await?;
    Ok(rows)
}
