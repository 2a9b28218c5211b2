//! Outbox mode: events are rows of a table in the application's own database, written by
//! the hook through the hook's own connection, so they commit and roll back with the
//! change. A relay delivers committed rows.
//!
//! # The table
//!
//! `vendora_outbox` is created when the observer starts (idempotently, SQLite or
//! PostgreSQL): `id` (insertion order), `event_id` (the `X-Webhook-Id`), `ordering_key`
//! (entity and primary key), `event` and `body` (the exact bytes to sign and send),
//! `status` (`pending`, `delivered`, `dead`), `attempts`, `next_attempt_at`, `last_error`,
//! `created_at`, `delivered_at`, and the claim `claimed_by` / `claimed_until`. Times are
//! Unix milliseconds. Its indexes are partial (pending rows by id and by key, delivered
//! rows by time, dead rows by id), so the relay's claim never reads the delivered rows
//! kept for the retention period.
//!
//! # Order and several relays
//!
//! A relay claims only the *head* of each ordering key: the oldest pending row of its key.
//! The next row of that key becomes claimable once the head is delivered or dead, so
//! events of one row leave in insertion order, across retries and across relays. On
//! PostgreSQL the claim uses `FOR UPDATE SKIP LOCKED`, so concurrent relays never claim
//! the same row; a claim is a lease, and the rows of a relay that died are claimed again
//! once their lease runs out.
//!
//! # Throughput
//!
//! The relay claims a batch, sends up to `lanes` rows at once, and claims the next batch
//! while the current one is still being sent; a recorder writes outcomes behind the
//! sends, all that finished meanwhile in one statement. A claimed row whose lease could
//! run out during its attempt (it waited behind a slow receiver) is left for the next
//! claim rather than sent.
//!
//! # Wake-ups
//!
//! The hook wakes the relay of its own process at once; on PostgreSQL a trigger sends
//! `NOTIFY vendora_outbox` at commit, which wakes every relay (`LISTEN`), also for
//! transactions. Otherwise the relay polls (`poll_interval`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait, Value,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::body::WebhookBody;
use crate::config::ConfigError;
use crate::direct::LaneContext;
use crate::observer::DeadLetter;
use crate::service::Webhook;

/// The outbox table's name.
pub const TABLE: &str = "vendora_outbox";
const CHANNEL: &str = "vendora_outbox";

/// Settings of outbox mode, given to [`ObserverBuilder::outbox`](crate::ObserverBuilder::outbox).
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    pub(crate) db: DatabaseConnection,
    /// How often the relay looks for work when nothing woke it (default 250 ms).
    pub poll_interval: Duration,
    /// How long a claim lasts before another relay may take the row (default 60 s).
    pub lease: Duration,
    /// How long delivered rows are kept before they are deleted (default 24 h).
    pub retention: Duration,
    /// Rows claimed at once (default 128).
    pub batch: usize,
}

impl OutboxOptions {
    /// The defaults, for events stored in `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        OutboxOptions {
            db,
            poll_interval: Duration::from_millis(250),
            lease: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 3600),
            batch: 128,
        }
    }
}

/// One row of the outbox, as [`Outbox::dead`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// The outbox of an observer in outbox mode: its relay, and the dead-letter API.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("relay", &self.inner.relay_id)
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

struct Inner {
    options: OutboxOptions,
    backend: DbBackend,
    ctx: LaneContext,
    lanes: usize,
    relay_id: String,
    wake: Notify,
    progress: Notify,
    stopping: AtomicBool,
    relay: Mutex<Option<JoinHandle<()>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// `?` placeholders become `$1, $2, …` on PostgreSQL.
fn sql(backend: DbBackend, text: &str) -> String {
    if backend != DbBackend::Postgres {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut n = 0;
    for c in text.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

fn stmt(backend: DbBackend, text: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(backend, sql(backend, text), values)
}

/// Creates the outbox table, its indexes and (PostgreSQL) its NOTIFY trigger, when missing.
pub async fn create_table<C: ConnectionTrait>(db: &C) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    // PostgreSQL: room on each page for the claim's new row versions. The claim changes
    // no indexed column, so with room it is a HOT update (no index entries); on full pages
    // a claim of 512 rows took 17 ms instead of 3 ms.
    let (id, with) = match backend {
        DbBackend::Postgres => ("id BIGSERIAL PRIMARY KEY", " WITH (fillfactor = 50)"),
        DbBackend::Sqlite => ("id INTEGER PRIMARY KEY AUTOINCREMENT", ""),
        _ => {
            return Err(DbErr::Custom(
                "the vendora-observe outbox supports SQLite and PostgreSQL".into(),
            ));
        }
    };
    let ddl = [
        format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} ({id}, event_id VARCHAR(64) NOT NULL UNIQUE, \
             ordering_key TEXT NOT NULL, event TEXT NOT NULL, body TEXT NOT NULL, \
             status VARCHAR(16) NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, \
             next_attempt_at BIGINT NOT NULL, last_error TEXT, created_at BIGINT NOT NULL, \
             delivered_at BIGINT, claimed_by VARCHAR(64), claimed_until BIGINT){with}"
        ),
        // Partial indexes over pending rows only: the relay's claim walks pending rows in id
        // order and looks for an earlier pending row of the same key. Delivered rows are kept
        // for `retention` (a day by default, so often millions of them) and must cost the
        // claim nothing; with a full index the claim filtered every retained row.
        format!(
            "CREATE INDEX IF NOT EXISTS {TABLE}_pending ON {TABLE} (id) WHERE status = 'pending'"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {TABLE}_pending_key ON {TABLE} (ordering_key, id) \
             WHERE status = 'pending'"
        ),
        // Pruning walks delivered rows by age; the dead-letter list and requeue read dead rows.
        format!(
            "CREATE INDEX IF NOT EXISTS {TABLE}_delivered ON {TABLE} (delivered_at) \
             WHERE status = 'delivered'"
        ),
        format!("CREATE INDEX IF NOT EXISTS {TABLE}_dead ON {TABLE} (id) WHERE status = 'dead'"),
        // Full indexes of tables made before the partial ones: a (status, …) index offers the
        // planners a worse path for the claim (SQLite took it and sorted every pending row).
        format!("DROP INDEX IF EXISTS {TABLE}_by_key"),
        format!("DROP INDEX IF EXISTS {TABLE}_by_time"),
    ];
    for statement in &ddl {
        if let Err(e) = db.execute_unprepared(statement).await {
            // Two instances starting at once may race on CREATE ... IF NOT EXISTS in
            // PostgreSQL; what matters is that the table is there afterwards.
            if !table_exists(db).await? {
                return Err(e);
            }
        }
    }
    if backend == DbBackend::Postgres {
        let function = format!(
            "CREATE OR REPLACE FUNCTION {TABLE}_notify() RETURNS trigger AS $$ \
             BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END; $$ LANGUAGE plpgsql"
        );
        if !trigger_exists(db).await? {
            let trigger = format!(
                "CREATE TRIGGER {TABLE}_notify AFTER INSERT ON {TABLE} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_notify()"
            );
            let created = async {
                db.execute_unprepared(&function).await?;
                db.execute_unprepared(&trigger).await
            }
            .await;
            // Another instance may have created it meanwhile.
            if let Err(e) = created
                && !trigger_exists(db).await?
            {
                return Err(e);
            }
        }
    }
    Ok(())
}

async fn trigger_exists<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    Ok(db
        .query_one_raw(stmt(
            db.get_database_backend(),
            "SELECT 1 AS one FROM pg_trigger WHERE tgname = ?",
            vec![format!("{TABLE}_notify").into()],
        ))
        .await?
        .is_some())
}

/// Whether `db` has the outbox table.
pub async fn table_exists<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let q = match backend {
        DbBackend::Postgres => "SELECT 1 AS one FROM pg_tables WHERE tablename = ?",
        _ => "SELECT 1 AS one FROM sqlite_master WHERE type = 'table' AND name = ?",
    };
    Ok(db
        .query_one_raw(stmt(backend, q, vec![TABLE.into()]))
        .await?
        .is_some())
}

/// How many rows the outbox holds, by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting for delivery (or retrying).
    pub pending: u64,
    /// Delivered, kept until the retention passes.
    pub delivered: u64,
    /// Given up on; see [`dead`] and [`requeue`].
    pub dead: u64,
}

/// Counts the rows of the outbox in `db` by status. Works without a running relay (the
/// CLI's `outbox status`).
pub async fn counts<C: ConnectionTrait>(db: &C) -> Result<Counts, DbErr> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            &format!("SELECT status, COUNT(*) AS n FROM {TABLE} GROUP BY status"),
            vec![],
        ))
        .await?;
    let mut counts = Counts::default();
    for r in rows {
        let status: String = r.try_get("", "status")?;
        let n = r.try_get::<i64>("", "n")? as u64;
        match status.as_str() {
            "pending" => counts.pending = n,
            "delivered" => counts.delivered = n,
            "dead" => counts.dead = n,
            _ => {}
        }
    }
    Ok(counts)
}

/// Dead rows of the outbox in `db`, oldest first, with their last error.
pub async fn dead<C: ConnectionTrait>(db: &C, limit: u64) -> Result<Vec<OutboxRow>, DbErr> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            &format!(
                "SELECT id, event_id, ordering_key, event, body, status, attempts, last_error \
                 FROM {TABLE} WHERE status = 'dead' ORDER BY id LIMIT ?"
            ),
            vec![(limit.min(i64::MAX as u64) as i64).into()],
        ))
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("", "id")?,
                event_id: r.try_get("", "event_id")?,
                ordering_key: r.try_get("", "ordering_key")?,
                event: r.try_get("", "event")?,
                body: r.try_get("", "body")?,
                status: r.try_get("", "status")?,
                attempts: r.try_get("", "attempts")?,
                last_error: r.try_get("", "last_error")?,
            })
        })
        .collect()
}

/// Puts dead rows of the outbox in `db` back in the queue (one by `id`, or all with
/// `None`), attempts reset; returns how many. A running relay picks them up at its next
/// poll.
pub async fn requeue<C: ConnectionTrait>(db: &C, id: Option<i64>) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let mut values = vec![Value::from(now_ms())];
    let filter = match id {
        Some(id) => {
            values.push(id.into());
            " AND id = ?"
        }
        None => "",
    };
    let res = db
        .execute_raw(stmt(
            backend,
            &format!(
                "UPDATE {TABLE} SET status = 'pending', attempts = 0, next_attempt_at = ?, \
                 claimed_by = NULL, claimed_until = NULL WHERE status = 'dead'{filter}"
            ),
            values,
        ))
        .await?;
    Ok(res.rows_affected())
}

/// Deletes delivered rows of the outbox in `db` older than `older_than`; returns how many.
pub async fn purge_delivered<C: ConnectionTrait>(
    db: &C,
    older_than: Duration,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let cutoff = now_ms() - older_than.as_millis() as i64;
    let res = db
        .execute_raw(stmt(
            backend,
            &format!("DELETE FROM {TABLE} WHERE status = 'delivered' AND delivered_at < ?"),
            vec![cutoff.into()],
        ))
        .await?;
    Ok(res.rows_affected())
}

struct Claimed {
    id: i64,
    webhook: Webhook,
    attempts: i32,
    /// When this relay's lease on the row ends (measured before the claim, so early).
    leased_until: Instant,
}

impl Outbox {
    pub(crate) async fn start(
        options: OutboxOptions,
        ctx: LaneContext,
        lanes: usize,
    ) -> Result<Outbox, ConfigError> {
        let timeout = ctx.service.config().timeout();
        if options.lease <= timeout {
            return Err(ConfigError::OutboxLease {
                lease: options.lease,
                timeout,
            });
        }
        let backend = options.db.get_database_backend();
        create_table(&options.db)
            .await
            .map_err(|e| ConfigError::Outbox {
                reason: e.to_string(),
            })?;
        let inner = Arc::new(Inner {
            options,
            backend,
            ctx,
            lanes: lanes.max(1),
            relay_id: uuid::Uuid::now_v7().to_string(),
            wake: Notify::new(),
            progress: Notify::new(),
            stopping: AtomicBool::new(false),
            relay: Mutex::new(None),
        });
        let outbox = Outbox { inner };
        outbox.refresh_pending().await;
        let listener = listen(&outbox.inner.options.db).await;
        let task = tokio::spawn(run_relay(outbox.clone(), listener));
        *outbox.inner.relay.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(outbox)
    }

    /// Writes the events of one write through the hook's `db`: they commit or roll back
    /// with the change.
    pub(crate) async fn insert<C: ConnectionTrait>(
        &self,
        db: &C,
        key: &str,
        webhooks: &[Webhook],
    ) -> Result<(), DbErr> {
        let backend = db.get_database_backend();
        let now = now_ms();
        let mut text = format!(
            "INSERT INTO {TABLE} (event_id, ordering_key, event, body, next_attempt_at, created_at) VALUES "
        );
        let mut values: Vec<Value> = Vec::with_capacity(webhooks.len() * 6);
        for (i, w) in webhooks.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            text.push_str("(?, ?, ?, ?, ?, ?)");
            values.push(w.id().into());
            values.push(key.into());
            values.push(w.event().into());
            values.push(w.body().as_str().into());
            values.push(now.into());
            values.push(now.into());
        }
        db.execute_raw(stmt(backend, &text, values)).await?;
        // Wakes this process's relay now; an uncommitted row is simply not seen yet, and
        // PostgreSQL's trigger wakes every relay at commit.
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Rows not yet delivered nor dead.
    pub async fn pending(&self) -> Result<u64, DbErr> {
        // Only the pending rows: the relay asks this whenever it goes idle, and a GROUP BY
        // over every status would also count the delivered rows kept for retention.
        let inner = &self.inner;
        let row = inner
            .options
            .db
            .query_one_raw(stmt(
                inner.backend,
                &format!("SELECT COUNT(*) AS n FROM {TABLE} WHERE status = 'pending'"),
                vec![],
            ))
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or(0) as u64)
    }

    async fn refresh_pending(&self) -> u64 {
        match self.pending().await {
            Ok(n) => {
                self.inner.ctx.counters.set_pending(n);
                n
            }
            Err(_) => self.inner.ctx.counters.pending(),
        }
    }

    /// Dead rows (given up on after their last attempt), oldest first, with their last
    /// error.
    pub async fn dead(&self, limit: u64) -> Result<Vec<OutboxRow>, DbErr> {
        dead(&self.inner.options.db, limit).await
    }

    /// Puts dead rows back in the queue (all of them with `None`), attempts reset; returns
    /// how many. They keep their `X-Webhook-Id`, so receivers can still dedupe.
    pub async fn requeue(&self, id: Option<i64>) -> Result<u64, DbErr> {
        let n = requeue(&self.inner.options.db, id).await?;
        self.inner.wake.notify_one();
        Ok(n)
    }

    /// Deletes delivered rows older than `older_than`; returns how many.
    pub async fn purge_delivered(&self, older_than: Duration) -> Result<u64, DbErr> {
        purge_delivered(&self.inner.options.db, older_than).await
    }

    pub(crate) async fn flush(&self, deadline: Instant) -> bool {
        loop {
            let progress = self.inner.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.refresh_pending().await == 0 {
                return true;
            }
            self.inner.wake.notify_one();
            let wait =
                Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(wait, progress).await;
        }
    }

    pub(crate) async fn shutdown(&self, deadline: Duration) -> u64 {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let task = self
            .inner
            .relay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(deadline, &mut task).await.is_err()
        {
            // Rows it had claimed are taken up again after their lease.
            task.abort();
        }
        self.refresh_pending().await
    }

    /// PostgreSQL: takes the outbox's planner statistics again, in the background, at most
    /// once a minute, when a claim comes back full (a burst). The claim is planned from
    /// them; a table that grew from a few rows to thousands within autovacuum's one-minute
    /// nap was planned as if it still held a few: a sort of every pending row per claim
    /// (50 ms at 20,000 pending, instead of 3 ms).
    fn refresh_statistics(&self, last: &mut Option<Instant>) {
        if self.inner.backend != DbBackend::Postgres
            || last.is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        *last = Some(Instant::now());
        let db = self.inner.options.db.clone();
        tokio::spawn(async move {
            if let Err(e) = db.execute_unprepared(&format!("ANALYZE {TABLE}")).await {
                tracing::debug!("outbox: ANALYZE {TABLE} failed (autovacuum will do it): {e}");
            }
        });
    }

    /// Leases up to `limit` heads of keys to this relay.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, DbErr> {
        let inner = &self.inner;
        let leased_until = Instant::now() + inner.options.lease;
        let claim = claim_statement(
            inner.backend,
            &inner.relay_id,
            now_ms(),
            inner.options.lease,
            limit,
        );
        let rows = query_planned_each_time(&inner.options.db, claim).await?;
        let mut claimed = rows
            .into_iter()
            .map(|r| {
                let event: String = r.try_get("", "event")?;
                let body: String = r.try_get("", "body")?;
                Ok(Claimed {
                    id: r.try_get("", "id")?,
                    webhook: Webhook::with_id(
                        r.try_get("", "event_id")?,
                        WebhookBody::from_stored(&event, body.into_bytes()),
                    ),
                    attempts: r.try_get("", "attempts")?,
                    leased_until,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    /// Marks rows delivered, in one statement per 500 rows: per-row commits would cap the
    /// relay at the database's commit rate.
    async fn mark_delivered(&self, ids: &[i64]) {
        for chunk in ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let text = format!(
                "UPDATE {TABLE} SET status = 'delivered', delivered_at = ?, attempts = attempts + 1, \
                 last_error = NULL, claimed_by = NULL, claimed_until = NULL WHERE id IN ({marks})"
            );
            let mut values: Vec<Value> = Vec::with_capacity(chunk.len() + 1);
            values.push(now_ms().into());
            values.extend(chunk.iter().map(|id| Value::from(*id)));
            self.write_outcome(&text, values, "delivered rows").await;
        }
    }

    /// Writes an outcome, retrying briefly if the database is busy.
    async fn write_outcome(&self, text: &str, values: Vec<Value>, what: &str) {
        let inner = &self.inner;
        for attempt in 0..5 {
            match inner
                .options
                .db
                .execute_raw(stmt(inner.backend, text, values.clone()))
                .await
            {
                Ok(_) => return,
                Err(e) if attempt < 4 => {
                    tracing::debug!("outbox: writing {what} failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(e) => tracing::error!(
                    "outbox: the outcome of a delivery ({what}) could not be written ({e}); \
                     the rows will be sent again after their lease, with the same X-Webhook-Id"
                ),
            }
        }
    }

    /// Writes the failures of a batch in one transaction (one commit, not one per row).
    async fn write_failures(&self, failures: Vec<(String, Vec<Value>)>) {
        if failures.is_empty() {
            return;
        }
        let inner = &self.inner;
        let backend = inner.backend;
        for attempt in 0..5 {
            let result = async {
                let txn = inner.options.db.begin().await?;
                for (text, values) in &failures {
                    txn.execute_raw(stmt(backend, text, values.clone())).await?;
                }
                txn.commit().await
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) if attempt < 4 => {
                    tracing::debug!("outbox: writing failed attempts failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(e) => tracing::error!(
                    "outbox: {} failed attempts could not be recorded ({e}); the rows will be \
                     tried again after their lease",
                    failures.len()
                ),
            }
        }
    }

    /// One attempt at one claimed row: its id when delivered (marked with the batch), or
    /// the statement recording the failure (written with the batch).
    async fn deliver(&self, row: Claimed) -> Result<i64, (String, Vec<Value>)> {
        let inner = &self.inner;
        let ctx = &inner.ctx;
        let attempts = row.attempts + 1;
        let result = ctx.service.send(&row.webhook).await;
        let now = now_ms();
        let (text, values): (String, Vec<Value>) = match result {
            Ok(_) => {
                ctx.counters.sent();
                return Ok(row.id);
            }
            Err(error) => {
                ctx.counters.failed();
                let described = format!("{}: {error}", error.kind());
                if attempts == 1 || !error.is_retryable() {
                    ctx.service
                        .log_failure(row.webhook.event(), Some(row.webhook.id()), &error);
                }
                if error.is_retryable() && (attempts as u32) < ctx.policy.max_attempts {
                    ctx.counters.retried();
                    let delay = ctx.policy.delay(attempts as u32, error.retry_after());
                    (
                        format!(
                            "UPDATE {TABLE} SET attempts = ?, next_attempt_at = ?, last_error = ?, \
                             claimed_by = NULL, claimed_until = NULL WHERE id = ?"
                        ),
                        vec![
                            attempts.into(),
                            (now + delay.as_millis() as i64).into(),
                            described.into(),
                            row.id.into(),
                        ],
                    )
                } else {
                    ctx.counters.dead();
                    tracing::error!(
                        event = row.webhook.event(),
                        id = row.webhook.id(),
                        attempts,
                        "webhook dead-lettered in the outbox (requeue with Outbox::requeue): {described}"
                    );
                    if let Some(handler) = &ctx.dead_letter {
                        handler(DeadLetter {
                            webhook: row.webhook.clone(),
                            attempts: attempts as u32,
                            last_error: described.clone(),
                        });
                    }
                    (
                        format!(
                            "UPDATE {TABLE} SET status = 'dead', attempts = ?, last_error = ?, \
                             claimed_by = NULL, claimed_until = NULL WHERE id = ?"
                        ),
                        vec![attempts.into(), described.into(), row.id.into()],
                    )
                }
            }
        };
        Err((text, values))
    }
}

/// The claim: the oldest pending, unleased rows that have no earlier pending row of their
/// key (the heads), leased to `relay` at `now`.
#[doc(hidden)] // public for the query-plan tests
pub fn claim_statement(
    backend: DbBackend,
    relay: &str,
    now: i64,
    lease: Duration,
    batch: usize,
) -> Statement {
    // SQLite plans from `sqlite_stat1`, which, when taken mid-burst, says that most rows are
    // pending: it then scans the whole table. The pending rows' indexes are always right.
    // PostgreSQL hash-joined `id IN (…)` against a scan of the whole table; `= ANY(ARRAY(…))`
    // looks the claimed ids up in the primary key.
    let (open, close, lock, by_id, by_key) = if backend == DbBackend::Postgres {
        (
            "= ANY(ARRAY(",
            "))",
            " FOR UPDATE SKIP LOCKED",
            String::new(),
            String::new(),
        )
    } else {
        (
            "IN (",
            ")",
            "",
            format!(" INDEXED BY {TABLE}_pending"),
            format!(" INDEXED BY {TABLE}_pending_key"),
        )
    };
    let text = format!(
        "UPDATE {TABLE} SET claimed_by = ?, claimed_until = ? WHERE id {open}\
           SELECT o.id FROM {TABLE} o{by_id} \
           WHERE o.status = 'pending' AND o.next_attempt_at <= ? \
             AND (o.claimed_until IS NULL OR o.claimed_until < ?) \
             AND NOT EXISTS (SELECT 1 FROM {TABLE} p{by_key} WHERE p.ordering_key = o.ordering_key \
                             AND p.status = 'pending' AND p.id < o.id) \
           ORDER BY o.id LIMIT ?{lock}{close} \
         RETURNING id, event_id, event, body, attempts"
    );
    stmt(
        backend,
        &text,
        vec![
            relay.into(),
            (now + lease.as_millis() as i64).into(),
            now.into(),
            now.into(),
            (batch as i64).into(),
        ],
    )
}

/// Runs `query` so that PostgreSQL plans it for the table as it is now. A prepared statement
/// (what SeaORM runs) gets a generic plan after five executions and keeps it: planned while
/// the outbox was nearly empty, the claim's plan scanned every pending row's key for each
/// candidate (5 s per claim once 20,000 rows were pending). An unnamed statement is planned
/// at each execution, still in one round trip.
#[cfg(feature = "postgres")]
async fn query_planned_each_time(
    db: &DatabaseConnection,
    query: Statement,
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    use sqlx::Arguments;
    if db.get_database_backend() != DbBackend::Postgres {
        return db.query_all_raw(query).await;
    }
    let mut args = sqlx::postgres::PgArguments::default();
    for value in query.values.iter().flat_map(|v| v.0.iter()) {
        let bound = match value {
            Value::BigInt(v) => args.add(*v),
            Value::String(v) => args.add(v.as_deref()),
            other => {
                return Err(DbErr::Custom(format!(
                    "unexpected claim parameter {other:?}"
                )));
            }
        };
        bound.map_err(|e| DbErr::Custom(e.to_string()))?;
    }
    let rows = sqlx::query_with(sqlx::AssertSqlSafe(query.sql), args)
        .persistent(false)
        .fetch_all(db.get_postgres_connection_pool())
        .await
        .map_err(|e| DbErr::Query(sea_orm::RuntimeErr::SqlxError(e.into())))?;
    Ok(rows.into_iter().map(Into::into).collect())
}

#[cfg(not(feature = "postgres"))]
async fn query_planned_each_time(
    db: &DatabaseConnection,
    query: Statement,
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    db.query_all_raw(query).await
}

#[cfg(feature = "postgres")]
type Listener = Option<sqlx::postgres::PgListener>;
#[cfg(not(feature = "postgres"))]
type Listener = Option<()>;

#[cfg(feature = "postgres")]
async fn listen(db: &DatabaseConnection) -> Listener {
    if db.get_database_backend() != DbBackend::Postgres {
        return None;
    }
    let pool = db.get_postgres_connection_pool();
    match sqlx::postgres::PgListener::connect_with(pool).await {
        Ok(mut l) => match l.listen(CHANNEL).await {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::warn!("outbox: LISTEN {CHANNEL} failed, polling instead: {e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("outbox: no LISTEN connection, polling instead: {e}");
            None
        }
    }
}

#[cfg(not(feature = "postgres"))]
async fn listen(_db: &DatabaseConnection) -> Listener {
    None
}

/// Waits for a NOTIFY, or forever without a listener.
async fn notified(listener: &mut Listener) {
    #[cfg(feature = "postgres")]
    if let Some(l) = listener {
        if l.recv().await.is_err() {
            // The listener reconnects by itself on the next recv; do not spin meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return;
    }
    let _ = listener;
    std::future::pending::<()>().await
}

/// What became of one attempt: the row's id when delivered, or the statement recording the
/// failure.
type Outcome = Result<i64, (String, Vec<Value>)>;

/// A claim in progress, polled beside the sends.
type Claiming = Pin<Box<dyn Future<Output = (usize, Result<Vec<Claimed>, DbErr>)> + Send>>;

/// Writes outcomes as they come, all that arrived meanwhile in one round (one statement for
/// the delivered rows, one transaction for the failures), while the relay keeps sending.
/// `recorded` counts the outcomes written.
async fn run_recorder(
    outbox: Outbox,
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    recorded: watch::Sender<u64>,
) {
    let mut round = Vec::new();
    while outcomes.recv_many(&mut round, usize::MAX).await > 0 {
        let n = round.len() as u64;
        let (mut delivered, mut failures) = (Vec::new(), Vec::new());
        for outcome in round.drain(..) {
            match outcome {
                Ok(id) => delivered.push(id),
                Err(failure) => failures.push(failure),
            }
        }
        outbox.mark_delivered(&delivered).await;
        outbox.write_failures(failures).await;
        recorded.send_modify(|total| *total += n);
        outbox.inner.progress.notify_waiters();
    }
}

/// The relay: claims heads of keys in batches, sends up to `lanes` at once, and claims the
/// next batch while the current one is still being sent; outcomes are written behind it by
/// the recorder. The network never waits for the database, nor the database for the
/// network. Order holds because a claim takes only rows with no earlier pending row of
/// their key, and a row stays pending until its outcome is written.
async fn run_relay(outbox: Outbox, mut listener: Listener) {
    let inner = outbox.inner.clone();
    let batch = inner.options.batch.max(1);
    let timeout = inner.ctx.service.config().timeout();
    let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
    let (recorded_tx, mut recorded) = watch::channel(0u64);
    let recorder = tokio::spawn(run_recorder(outbox.clone(), outcomes_rx, recorded_tx));
    let mut queue: VecDeque<Claimed> = VecDeque::new();
    let mut sending: JoinSet<Outcome> = JoinSet::new();
    let mut claiming: Option<Claiming> = None;
    // Outcomes handed to the recorder.
    let mut handed: u64 = 0;
    // The last claim took all there was: wait for a wake-up before claiming again.
    let mut idle = false;
    // The last claim ran while some rows were sent or being recorded, or took some: later
    // rows of their keys were not claimable then, and may be once those outcomes are written.
    let mut behind_unrecorded = false;
    let mut last_prune = Instant::now();
    let mut last_analyze: Option<Instant> = None;
    let mut claim_failing_since: Option<Instant> = None;
    // Attempts failed and none succeeded since: the receiver looks down. Once everything
    // claimed has had its attempt, the relay pauses before claiming again, longer each
    // round, whatever wakes it, instead of trying each new row at once and competing with
    // the application's writes for the database.
    let mut failing = false;
    let mut failed_rounds: u32 = 0;
    let mut pause_until: Option<tokio::time::Instant> = None;
    loop {
        let stopping = inner.stopping.load(Ordering::Acquire);
        // Start sends while lanes are free.
        while sending.len() < inner.lanes
            && let Some(row) = queue.pop_front()
        {
            // A row claimed long ago (a slow receiver ahead of it) whose lease would run
            // out during its attempt is left for the next claim: another relay may take it
            // once the lease ends, and two relays must not send it at once.
            if row.leased_until <= Instant::now() + timeout {
                continue;
            }
            let outbox = outbox.clone();
            sending.spawn(async move { outbox.deliver(row).await });
        }
        let unrecorded = queue.len() as u64 + sending.len() as u64 + handed - *recorded.borrow();
        if stopping {
            if queue.is_empty() && sending.is_empty() {
                break;
            }
        } else if failing && queue.is_empty() && sending.is_empty() && pause_until.is_none() {
            failed_rounds = failed_rounds.saturating_add(1);
            let pause = inner
                .ctx
                .policy
                .delay(failed_rounds, None)
                .max(inner.options.poll_interval)
                .min(Duration::from_secs(5));
            pause_until = Some(tokio::time::Instant::now() + pause);
        }
        let paused = pause_until.is_some_and(|t| t > tokio::time::Instant::now());
        // Claim the next batch when the queue runs low, with a bound on what is claimed
        // but not yet recorded.
        if claiming.is_none()
            && !stopping
            && !idle
            && !paused
            && queue.len() < batch.div_ceil(2).max(inner.lanes)
            && unrecorded < 2 * batch as u64
        {
            pause_until = None;
            recorded.borrow_and_update();
            let outbox = outbox.clone();
            let want = batch.min(2 * batch - unrecorded as usize);
            behind_unrecorded = unrecorded > 0;
            claiming = Some(Box::pin(async move { (want, outbox.claim(want).await) }));
        }
        if idle && queue.is_empty() && sending.is_empty() && unrecorded == 0 {
            outbox.refresh_pending().await;
            inner.progress.notify_waiters();
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                if let Err(e) = outbox.purge_delivered(inner.options.retention).await {
                    tracing::warn!("outbox: pruning delivered rows failed: {e}");
                }
            }
        }
        tokio::select! {
            Some(done) = sending.join_next(), if !sending.is_empty() => {
                // A panicked task: its row is taken up again after its lease.
                if let Ok(outcome) = done {
                    if outcome.is_ok() {
                        failing = false;
                        failed_rounds = 0;
                    } else {
                        failing = true;
                    }
                    handed += 1;
                    let _ = outcomes.send(outcome);
                }
            }
            (want, claimed) = async { claiming.as_mut().expect("guarded").await }, if claiming.is_some() => {
                claiming = None;
                match claimed {
                    Ok(rows) => {
                        claim_failing_since = None;
                        // Fewer rows than asked for: nothing else is claimable now, except
                        // later rows of the keys just claimed, once these are written.
                        idle = rows.len() < want;
                        behind_unrecorded |= !rows.is_empty();
                        if rows.len() >= batch {
                            outbox.refresh_statistics(&mut last_analyze);
                        }
                        queue.extend(rows);
                    }
                    Err(e) => {
                        if claim_failing_since.is_none() {
                            tracing::warn!("outbox: claiming rows failed (will keep trying): {e}");
                            claim_failing_since = Some(Instant::now());
                        }
                        idle = true;
                    }
                }
            }
            // Written outcomes make room under the bound of unrecorded rows, and may have
            // made later rows of their keys claimable.
            _ = recorded.changed() => idle &= !behind_unrecorded,
            _ = inner.wake.notified(), if idle => idle = false,
            _ = notified(&mut listener), if idle => idle = false,
            _ = tokio::time::sleep(inner.options.poll_interval), if idle => idle = false,
            _ = tokio::time::sleep_until(pause_until.unwrap_or_else(tokio::time::Instant::now)), if paused => {}
        }
    }
    drop(outcomes);
    let _ = recorder.await;
}
