//! Looking after the outbox without a relay (the CLI's `outbox` commands, operators' tools):
//! counts, dead rows, requeue, purge.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbErr, TransactionTrait};

use super::TABLE;
use super::lease::{RequeueLock, now_ms, under_requeue_lock};
use super::sql::statement;

/// One row of the outbox, as [`dead`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxRow {
    /// Insertion order.
    pub id: i64,
    /// The `X-Webhook-Id`.
    pub event_id: String,
    /// Entity and primary key.
    pub ordering_key: String,
    /// The event name.
    pub event: String,
    /// The exact body.
    pub body: String,
    /// Where it stands.
    pub status: OutboxStatus,
    /// Attempts made.
    pub attempts: i32,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// When the write made it, in milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When it was delivered (or superseded), in milliseconds since the Unix epoch.
    pub delivered_at: Option<i64>,
}

/// Where an outbox row stands (its `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OutboxStatus {
    /// Waiting for delivery (or retrying).
    Pending,
    /// Delivered, kept until the retention passes.
    Delivered,
    /// Given up on; see [`requeue`].
    Dead,
    /// Not sent: a newer event of its row made it stale.
    Superseded,
}

impl OutboxStatus {
    /// The value of the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Delivered => "delivered",
            OutboxStatus::Dead => "dead",
            OutboxStatus::Superseded => "superseded",
        }
    }
}

impl std::fmt::Display for OutboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for OutboxStatus {
    type Err = DbErr;

    fn from_str(s: &str) -> Result<Self, DbErr> {
        Ok(match s {
            "pending" => OutboxStatus::Pending,
            "delivered" => OutboxStatus::Delivered,
            "dead" => OutboxStatus::Dead,
            "superseded" => OutboxStatus::Superseded,
            other => {
                return Err(DbErr::Type(format!(
                    "{TABLE}.status is {other:?}, not one of pending, delivered, dead, superseded"
                )));
            }
        })
    }
}

const ROW_COLUMNS: &str = "id, event_id, ordering_key, event, body, status, attempts, last_error, created_at, \
     delivered_at";

fn outbox_row(r: &sea_orm::QueryResult) -> Result<OutboxRow, DbErr> {
    Ok(OutboxRow {
        id: r.try_get("", "id")?,
        event_id: r.try_get("", "event_id")?,
        ordering_key: r.try_get("", "ordering_key")?,
        event: r.try_get("", "event")?,
        body: r.try_get("", "body")?,
        status: r.try_get::<String>("", "status")?.parse()?,
        attempts: r.try_get("", "attempts")?,
        last_error: r.try_get("", "last_error")?,
        created_at: r.try_get("", "created_at")?,
        delivered_at: r.try_get("", "delivered_at")?,
    })
}

/// How many rows the outbox holds, by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Waiting for delivery (or retrying).
    pub pending: u64,
    /// Delivered, kept until the retention passes.
    pub delivered: u64,
    /// Given up on; see [`dead`] and [`requeue`].
    pub dead: u64,
    /// Not sent because a newer event of their row made them stale (latest-wins
    /// coalescing, or a dead event whose row a newer delivered event brought up to date).
    pub superseded: u64,
}

/// What [`requeue`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Requeued {
    /// Dead rows put back in the queue.
    pub requeued: u64,
    /// Dead rows not put back because a newer event of their row, already on its way,
    /// carries newer state: resending them would leave the apps on stale data.
    pub superseded: u64,
}

/// The SQL condition "the row `older` would tell the apps old state once `newer`, a newer
/// event of the same row, has gone out", over the columns `kind` and `event`: always, but
/// for two watch events of different columns (`stock:updated` says nothing of the price).
/// A full-state event is made stale by any newer event of its row (a newer watch event
/// changed a column it carries); a watch event by a newer full-state event (it carries the
/// column) or a newer one of its own name. What requeue and the delivered marks go by.
/// (Latest-wins coalescing of pending events is another rule, the scheduler's: it skips
/// only what a waiting event fully replaces.)
pub(crate) fn stale_after(older: &str, newer: &str) -> String {
    format!(
        "NOT ({older}.kind = 'watch' AND {newer}.kind = 'watch' AND {newer}.event <> {older}.event)"
    )
}

/// Counts the rows of the outbox in `db` by status.
pub async fn counts<C: ConnectionTrait>(db: &C) -> Result<Counts, DbErr> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(statement(backend, |_| {
            format!("SELECT status, COUNT(*) AS n FROM {TABLE} GROUP BY status")
        }))
        .await?;
    let mut counts = Counts::default();
    for r in rows {
        let status: OutboxStatus = r.try_get::<String>("", "status")?.parse()?;
        let n = r.try_get::<i64>("", "n")? as u64;
        match status {
            OutboxStatus::Pending => counts.pending = n,
            OutboxStatus::Delivered => counts.delivered = n,
            OutboxStatus::Dead => counts.dead = n,
            OutboxStatus::Superseded => counts.superseded = n,
        }
    }
    Ok(counts)
}

/// Rows not yet delivered nor given up on (through their partial index: cheap on a table of
/// any size).
pub async fn pending<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    count_status(db, "pending").await
}

/// When the oldest pending row was written, if any.
pub async fn oldest_pending<C: ConnectionTrait>(
    db: &C,
) -> Result<Option<std::time::SystemTime>, DbErr> {
    // The oldest by id through the pending rows' partial index: one index entry read.
    let backend = db.get_database_backend();
    let indexed = super::sql::by_index(backend, "pending");
    let row = db
        .query_one_raw(statement(backend, |_| {
            format!(
                "SELECT created_at FROM {TABLE}{indexed} WHERE status = 'pending' \
                 ORDER BY id LIMIT 1"
            )
        }))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "created_at"))
        .transpose()?
        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)))
}

/// Dead rows (through their partial index: cheap on a table of any size).
pub async fn dead_count<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    count_status(db, "dead").await
}

async fn count_status<C: ConnectionTrait>(db: &C, status: &str) -> Result<u64, DbErr> {
    // One status through its partial index: the delivered rows kept for retention are
    // never counted.
    let row = db
        .query_one_raw(statement(db.get_database_backend(), |_| {
            format!("SELECT COUNT(*) AS n FROM {TABLE} WHERE status = '{status}'")
        }))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0) as u64)
}

/// Dead rows of the outbox in `db`, oldest first, with their last error.
pub async fn dead<C: ConnectionTrait>(db: &C, limit: u64) -> Result<Vec<OutboxRow>, DbErr> {
    let rows = db
        .query_all_raw(statement(db.get_database_backend(), |b| {
            format!(
                "SELECT {ROW_COLUMNS} FROM {TABLE} WHERE status = 'dead' ORDER BY id LIMIT {}",
                b.bind(limit.min(i64::MAX as u64) as i64)
            )
        }))
        .await?;
    rows.iter().map(outbox_row).collect()
}

/// Rows delivered or superseded at or after `since_ms` (milliseconds since the Unix epoch),
/// in the order they finished, at most `limit` (`vendora-observe outbox tail`).
pub async fn finished_since<C: ConnectionTrait>(
    db: &C,
    since_ms: i64,
    limit: u64,
) -> Result<Vec<OutboxRow>, DbErr> {
    // Through the finished rows' partial index on delivered_at: the rows kept for
    // retention before `since_ms` are not read.
    let rows = db
        .query_all_raw(statement(db.get_database_backend(), |b| {
            format!(
                "SELECT {ROW_COLUMNS} FROM {TABLE} WHERE status IN ('delivered', 'superseded') \
                 AND delivered_at >= {} ORDER BY delivered_at, id LIMIT {}",
                b.bind(since_ms),
                b.bind(limit.min(i64::MAX as u64) as i64)
            )
        }))
        .await?;
    rows.iter().map(outbox_row).collect()
}

/// How many rows were delivered or superseded at or after `since_ms`.
pub async fn finished_count_since<C: ConnectionTrait>(db: &C, since_ms: i64) -> Result<u64, DbErr> {
    let row = db
        .query_one_raw(statement(db.get_database_backend(), |b| {
            format!(
                "SELECT COUNT(*) AS n FROM {TABLE} WHERE status IN ('delivered', 'superseded') \
                 AND delivered_at >= {}",
                b.bind(since_ms)
            )
        }))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0) as u64)
}

/// Puts dead rows of the outbox in `db` back in the queue (one by `id`, or all with
/// `None`), attempts reset, and wakes no relay (a running relay finds them at its next
/// poll; [`Outbox::requeue`](super::Outbox::requeue) wakes its own at once).
///
/// Requeued rows keep their `X-Webhook-Id`, and are resent only while they are still
/// current, also when writes go on meanwhile: a requeued row whose row has a newer event on
/// its way (leased by a relay) is marked `superseded` instead, here or when a relay would
/// claim it; a newer event of its row delivered before it is sent marks it `superseded`
/// wherever it stands. (Dead rows made stale by a delivered newer event were marked so when
/// it was delivered.) One statement, retried on a deadlock: requeues may run at once.
pub async fn requeue<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    id: Option<i64>,
) -> Result<Requeued, DbErr> {
    let backend = db.get_database_backend();
    let statement = |now: i64| {
        statement(backend, |b| {
            let mut newer_on_its_way = || {
                format!(
                    "EXISTS (SELECT 1 FROM {TABLE} d WHERE d.ordering_key = {TABLE}.ordering_key \
                     AND d.status = 'pending' AND d.id > {TABLE}.id AND d.claimed_until >= {} \
                     AND {})",
                    b.bind(now),
                    stale_after(TABLE, "d")
                )
            };
            let (superseded, stamped) = (newer_on_its_way(), newer_on_its_way());
            let (now_then, now_next) = (b.bind(now), b.bind(now));
            let filter = match id {
                Some(id) => format!(" AND id = {}", b.bind(id)),
                None => String::new(),
            };
            format!(
                "UPDATE {TABLE} SET \
                   status = CASE WHEN {superseded} THEN 'superseded' ELSE 'pending' END, \
                   delivered_at = CASE WHEN {stamped} THEN {now_then} ELSE NULL END, \
                   attempts = 0, next_attempt_at = {now_next}, claimed_by = NULL, \
                   claimed_until = NULL, requeued = 1 \
                 WHERE status = 'dead'{filter} RETURNING status"
            )
        })
    };
    let mut tries = 0;
    loop {
        match under_requeue_lock(db, RequeueLock::Alone, statement(now_ms())).await {
            Ok(rows) => {
                let mut out = Requeued::default();
                for r in rows {
                    match r.try_get::<String>("", "status")?.as_str() {
                        "pending" => out.requeued += 1,
                        _ => out.superseded += 1,
                    }
                }
                return Ok(out);
            }
            // Two requeues (or a requeue and a relay's marks) locking the same rows in
            // another order: the database gave one of them up; it runs again.
            Err(e) if tries < 5 && e.to_string().contains("deadlock") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10 << tries)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Deletes delivered (and superseded) rows of the outbox in `db` older than `older_than`;
/// returns how many.
pub async fn purge_delivered<C: ConnectionTrait>(
    db: &C,
    older_than: Duration,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let cutoff = now_ms() - older_than.as_millis() as i64;
    let res = db
        .execute_raw(statement(backend, |b| {
            format!(
                "DELETE FROM {TABLE} WHERE status IN ('delivered', 'superseded') \
                 AND delivered_at < {}",
                b.bind(cutoff)
            )
        }))
        .await?;
    Ok(res.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Database};

    /// The rule on every pair of kinds, evaluated by SQLite.
    #[tokio::test]
    async fn stale_after_keeps_only_watch_events_of_other_columns() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        let cases = [
            (
                "updated",
                "product:updated",
                "updated",
                "product:updated",
                true,
            ),
            ("updated", "product:updated", "watch", "stock:updated", true),
            (
                "created",
                "product:created",
                "deleted",
                "product:deleted",
                true,
            ),
            ("watch", "stock:updated", "updated", "product:updated", true),
            ("watch", "stock:updated", "watch", "stock:updated", true),
            ("watch", "stock:updated", "deleted", "product:deleted", true),
            ("watch", "stock:updated", "watch", "price:updated", false),
        ];
        for (ok, oe, nk, ne, stale) in cases {
            let row = db
                .query_one_raw(statement(db.get_database_backend(), |b| {
                    format!(
                        "SELECT CASE WHEN {} THEN 1 ELSE 0 END AS s FROM \
                         (SELECT {} AS kind, {} AS event) o, (SELECT {} AS kind, {} AS event) n",
                        stale_after("o", "n"),
                        b.bind(ok),
                        b.bind(oe),
                        b.bind(nk),
                        b.bind(ne)
                    )
                }))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                row.try_get::<i32>("", "s").unwrap() == 1,
                stale,
                "{oe} after {ne}"
            );
        }
    }
}
