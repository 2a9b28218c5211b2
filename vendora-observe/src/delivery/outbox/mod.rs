//! Outbox mode: events are rows of a table in the application's own database, written by
//! the hook through the hook's own connection, so they commit and roll back with the
//! change. A relay delivers committed rows.
//!
//! # The table
//!
//! `vendora_outbox` is created when the observer starts (idempotently, SQLite or
//! PostgreSQL, safely when several instances start at once): `id` (insertion order),
//! `event_id` (the `X-Webhook-Id`), `ordering_key` (entity and primary key: the row's
//! chain), `unit_key` (the unit of work's chain, NULL under [`Order::PerRow`]), `event`,
//! `kind` and `latest_wins` (what supersedes the event), `body` (the exact bytes to sign and
//! send), `status` (`pending`, `delivered`, `dead`, `superseded`), `attempts`,
//! `next_attempt_at`, `last_error`, `created_at`, `delivered_at`, and the lease
//! `claimed_by` / `claimed_until`. Times are Unix milliseconds. Its indexes are partial
//! (pending rows by id, by key and by unit; finished rows by time; dead rows), so the claim
//! never reads the delivered rows kept for the retention period.
//!
//! # Order and several relays
//!
//! A relay takes a row only when every earlier pending row of its chains is delivered,
//! dead, or already its own, so events of one row, and of one unit of work, leave in the
//! order they were written, across retries and across relays (the claim's steps are
//! described in `src/delivery/outbox/claim.rs`). A relay keeps its rows leased while it
//! holds them (renewed every quarter of the lease). The rows of a relay whose process is
//! gone are taken back by a relay on the same machine, at its start or, running, within a
//! second (Linux: relay ids name their process, see `holder.rs`); a relay elsewhere claims them again once their lease runs
//! out, and says at its start how many wait and for how long.
//!
//! # Dead rows
//!
//! A dead row does not hold its chains: the events after it go out. When a newer event of
//! its row that carries newer state is delivered, the dead row is marked `superseded`, and
//! [`requeue`] resends only the dead rows still current, so after a requeue the last event
//! the apps saw of every row is the row's final state.
//!
//! # Wake-ups
//!
//! The hook wakes the relay of its own process at once; on PostgreSQL a trigger sends
//! `NOTIFY vendora_outbox` at commit, which wakes every relay (`LISTEN`), also for
//! transactions. Otherwise the relay polls (`poll_interval`), or wakes when a row's retry
//! time comes.
//!
//! [`Order::PerRow`]: crate::Order::PerRow

mod admin;
pub(crate) mod claim;
mod holder;
#[cfg(feature = "internals")]
pub(crate) mod internals;
mod lease;
mod notice;
mod record;
mod relay;
mod schema;
mod sql;
mod wake;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use admin::{
    Counts, OutboxRow, OutboxStatus, Requeued, counts, dead, dead_count, finished_count_since,
    finished_since, oldest_pending, pending, purge_delivered, requeue,
};
pub use schema::{create_table, table_exists};

use super::scheduler::{Scheduler, Setup};
use super::{Context, Job, Leftovers};
use crate::error::StartError;
use lease::{Lease, now_ms};
use sql::Binds;

/// The outbox table's name.
pub const TABLE: &str = "vendora_outbox";
const CHANNEL: &str = "vendora_outbox";

/// Settings of outbox mode, given to [`ObserverBuilder::outbox`](crate::ObserverBuilder::outbox).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxOptions {
    pub(crate) db: DatabaseConnection,
    /// How often the relay looks for work when nothing woke it (default 250 ms).
    pub poll_interval: Duration,
    /// How long a claim lasts unless renewed; the rows of a relay that died are taken up
    /// by another after it (default 60 s, longer than the request timeout).
    pub lease: Duration,
    /// How long delivered rows are kept before they are deleted (default 24 h).
    pub retention: Duration,
    /// Rows claimed at once when a relay starts on a backlog (default 128). While claims
    /// come back full (a backlog), each claim takes twice as many rows as the one before,
    /// up to [`max_batch`](Self::max_batch) and [`max_held_bytes`](Self::max_held_bytes);
    /// once the relay has nothing left, it starts again from `batch`. A relay holds
    /// four claims' worth of rows at most, a chain half of them at most, and the last
    /// `batch` of them go only to chains holding at most one row (so that slow rows'
    /// backlogs never take all of it).
    pub batch: usize,
    /// The most rows one claim takes (default 2,048). Larger claims drain a backlog faster
    /// (fewer statements per row) and let one relay hold more rows (4 × `max_batch`, each
    /// with its body, at most); the README's *Delivery* section gives measured rates. Set it
    /// to `batch` for claims of a fixed size (a smaller value counts as `batch`).
    pub max_batch: usize,
    /// About how many bytes of bodies one relay holds (default 32 MiB): claims grow only
    /// while four of them, with bodies the size of the last claim's, fit in it. Claims
    /// never shrink below `batch`, so with very large bodies a relay holds 4 × `batch`.
    pub max_held_bytes: usize,
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
            max_batch: 2048,
            max_held_bytes: 32 << 20,
        }
    }
}

/// The outbox of an observer in outbox mode: its relay, and the dead-letter API.
///
/// The relay runs while a handle of the observer (or of this) is alive: once the last one is
/// dropped, it stops claiming rows, delivers what it holds within the request timeout and
/// hands the rest back to the table, then ends.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
    /// Held by the user's handles, not by the relay's own: the last one dropped retires
    /// the relay (`None` in the relay's handles).
    _alive: Option<Arc<DropGuard>>,
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
    ctx: Arc<Context>,
    scheduler: Scheduler,
    lease: Arc<Lease>,
    relay_id: String,
    wake: Notify,
    progress: Notify,
    stopping: CancellationToken,
    /// Cancelled when the relay must stop without a `shutdown`: every user handle was
    /// dropped, or another observer was installed in place of this one.
    retired: CancellationToken,
    relay: Mutex<Option<JoinHandle<()>>>,
}

impl Outbox {
    pub(crate) async fn start(
        options: OutboxOptions,
        ctx: Arc<Context>,
    ) -> Result<Outbox, StartError> {
        let timeout = ctx.service.config().timeout();
        if options.lease <= timeout {
            return Err(StartError::OutboxLease {
                lease: options.lease,
                timeout,
            });
        }
        let backend = options.db.get_database_backend();
        if let Some(warning) = feature_warning(backend, cfg!(feature = "postgres")) {
            crate::diagnostics::warn(crate::diagnostics::Kind::Setup, format_args!("{warning}"));
        }
        create_table(&options.db)
            .await
            .map_err(|source| StartError::Outbox { source })?;
        if let Some(note) = journal_note(&options.db).await {
            tracing::info!("{note}");
        }
        let lease = Arc::new(Lease::new(now_ms() + options.lease.as_millis() as i64));
        let (reports, reports_rx) = tokio::sync::mpsc::unbounded_channel();
        let scheduler = Scheduler::start(Setup {
            ctx: ctx.clone(),
            reports: Some(reports),
            track_pending: false,
            lease: Some(lease.clone() as Arc<dyn super::scheduler::Gate>),
            dead_letter_leftovers: false,
        });
        let inner = Arc::new(Inner {
            options,
            backend,
            ctx,
            scheduler,
            lease,
            relay_id: holder::new_relay_id(),
            wake: Notify::new(),
            progress: Notify::new(),
            stopping: CancellationToken::new(),
            retired: CancellationToken::new(),
            relay: Mutex::new(None),
        });
        let alive = Some(Arc::new(inner.retired.clone().drop_guard()));
        let outbox = Outbox {
            inner,
            _alive: alive,
        };
        outbox.refresh_pending().await;
        let listener = wake::listen(&outbox.inner.options.db).await;
        let task = tokio::spawn(relay::run(outbox.worker(), reports_rx, listener));
        *outbox.relay_task() = Some(task);
        Ok(outbox)
    }

    /// A handle for the relay's own tasks: it does not keep the relay running.
    fn worker(&self) -> Outbox {
        Outbox {
            inner: self.inner.clone(),
            _alive: None,
        }
    }

    /// Stops the relay without waiting for it (see [`Outbox`]): another observer was
    /// installed in place of this one.
    pub(crate) fn retire(&self) {
        self.inner.retired.cancel();
    }

    /// Writes the events of one write through the hook's `db`: they commit or roll back
    /// with the change.
    pub(crate) async fn insert<C: ConnectionTrait>(
        &self,
        db: &C,
        ordering_key: &str,
        unit_key: Option<&str>,
        jobs: &[Job],
    ) -> Result<(), DbErr> {
        let backend = db.get_database_backend();
        let now = now_ms();
        let mut b = Binds::new(backend);
        let rows: Vec<String> = jobs
            .iter()
            .map(|job| {
                let w = &job.webhook;
                let row: [Value; 10] = [
                    w.id().into(),
                    ordering_key.into(),
                    unit_key.map(str::to_owned).into(),
                    w.event().into(),
                    job.kind.as_str().into(),
                    i16::from(job.coalesce).into(),
                    w.body().as_str().into(),
                    now.into(),
                    now.into(),
                    w.trace().to_string().into(),
                ];
                format!("({})", b.list(row))
            })
            .collect();
        let text = format!(
            "INSERT INTO {TABLE} (event_id, ordering_key, unit_key, event, kind, latest_wins, \
             body, next_attempt_at, created_at, traceparent) VALUES {}",
            rows.join(", ")
        );
        db.execute_raw(b.statement(text)).await?;
        // Wakes this process's relay now; an uncommitted row is simply not seen yet, and
        // PostgreSQL's trigger wakes every relay at commit (a relay listening for it waits
        // for it rather than look before the commit).
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn refresh_pending(&self) -> u64 {
        match pending(&self.inner.options.db).await {
            Ok(n) => {
                self.inner.ctx.counters.set_pending(n);
                n
            }
            Err(_) => self.inner.ctx.counters.pending(),
        }
    }

    /// Pending rows and when the oldest of them was written (the metrics' backlog gauges).
    #[cfg(feature = "metrics")]
    pub(crate) async fn backlog(&self) -> (u64, Option<std::time::SystemTime>) {
        // Counted by the relay: at each look for work when idle, each second while busy.
        let pending = self.inner.ctx.counters.pending();
        let oldest = if pending == 0 {
            None
        } else {
            admin::oldest_pending(&self.inner.options.db)
                .await
                .ok()
                .flatten()
        };
        (pending, oldest)
    }

    /// Puts dead rows back in the queue (all of them with `None`), attempts reset, except
    /// those a newer event of their row has made stale, as [`requeue`] does, and wakes this
    /// observer's relay at once to send them. They keep their `X-Webhook-Id`, so receivers
    /// can still dedupe. (Counts, dead rows and purges are the free functions of this
    /// module, which need no relay: [`pending`], [`dead`], [`purge_delivered`].)
    pub async fn requeue(&self, id: Option<i64>) -> Result<Requeued, DbErr> {
        let n = requeue(&self.inner.options.db, id).await?;
        self.inner.wake.notify_one();
        Ok(n)
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

    /// The relay's task, while it runs.
    fn relay_task(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.inner.relay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers the backlog until no row is pending or `deadline` passes (claiming as
    /// usual: a backlog is more than the rows a relay holds), then stops claiming, delivers
    /// what the relay still holds in the time left and cuts what is in flight; every row
    /// not delivered stays in the table (its lease handed back) for the next start.
    /// Returns what was cut and left, and the rows still pending.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> (Leftovers, u64) {
        let deadline = Instant::now() + deadline;
        let relay_running = self.relay_task().is_some();
        if relay_running {
            self.flush(deadline).await;
        }
        self.stop(deadline).await
    }

    /// Stops claiming, delivers what the relay holds until `deadline`, cuts what is in
    /// flight then, and waits for the relay to write the outcomes and hand the rest back
    /// (until the deadline, [`OUTCOMES_GRACE`] at least).
    async fn stop(&self, deadline: Instant) -> (Leftovers, u64) {
        self.inner.stopping.cancel();
        self.inner.wake.notify_one();
        let leftovers = self
            .inner
            .scheduler
            .shutdown(deadline.saturating_duration_since(Instant::now()))
            .await;
        let task = self.relay_task().take();
        // The relay ends once the outcomes are written and its leases handed back; past
        // that, it and its recorder are stopped (the rows stay pending, their lease runs
        // out).
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(OUTCOMES_GRACE);
        if let Some(mut task) = task
            && tokio::time::timeout(wait, &mut task).await.is_err()
        {
            task.abort();
            let _ = task.await;
        }
        let pending = self.refresh_pending().await;
        if leftovers.unknown + leftovers.left == 0 {
            // Rows this relay did not hold: other relays' (a rolling restart of several
            // instances), or written since; nothing for this program to act on.
            if pending > 0 {
                tracing::info!(
                    "outbox: {pending} event(s) pending in the outbox table at shutdown, none \
                     of them held here: other relays, or the next start, send them"
                );
            }
        } else {
            // Not lost, but not delivered either: say so, or a program that prints only what
            // was sent would look as if its events were gone.
            crate::diagnostics::warn(
                crate::diagnostics::Kind::Delivery,
                format_args!(
                    "outbox: {pending} event(s) still pending in the outbox table at shutdown \
                     ({} cut in flight, {} not yet sent); nothing is lost: a relay sends them, \
                     with the same X-Webhook-Id, when it next runs on this database \
                     (`vendora-observe outbox status` counts them)",
                    leftovers.unknown, leftovers.left,
                ),
            );
        }
        (leftovers, pending)
    }
}

/// How long `shutdown` waits, past its deadline if need be, for the relay to write the
/// outcomes of the last requests and hand its leases back: a statement or two.
pub(crate) const OUTCOMES_GRACE: Duration = Duration::from_secs(1);

/// What an outbox on PostgreSQL says at start-up when this crate was built without its
/// `postgres` feature: the claims then run as SeaORM's prepared statements, whose cached
/// generic plans read every pending row (5 s per claim with 20,000 pending), and the relay
/// polls instead of waking on `NOTIFY`.
fn feature_warning(backend: DbBackend, postgres_feature: bool) -> Option<String> {
    (backend == DbBackend::Postgres && !postgres_feature).then(|| {
        "outbox: this database is PostgreSQL but vendora-observe was built without its \
         `postgres` feature: the relay's claims get cached generic plans (seconds per claim \
         once thousands of events are pending) and it polls instead of waking on NOTIFY; \
         enable it: vendora-observe = { version = \"0.1\", features = [\"postgres\"] }"
            .to_owned()
    })
}

/// On a SQLite file in a rollback journal (SQLite's default), what WAL mode would change:
/// each commit, the relay's leases and marks included, waits for the disk, and events reach
/// the receiver 3.2–7.3 ms after the write at p99 instead of 1.6–3.7 ms (BENCHMARKS.md).
async fn journal_note(db: &DatabaseConnection) -> Option<String> {
    if db.get_database_backend() != DbBackend::Sqlite {
        return None;
    }
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "PRAGMA journal_mode",
        ))
        .await
        .ok()??;
    let mode: String = row.try_get_by_index(0).ok()?;
    matches!(
        mode.to_ascii_lowercase().as_str(),
        "delete" | "truncate" | "persist"
    )
    .then(|| {
        format!(
            "outbox: this SQLite database uses a rollback journal (journal_mode={mode}): every \
             commit, the relay's included, waits for the disk, and events reach the receiver \
             about twice as late as in WAL mode (p99 3.2-7.3 ms against 1.6-3.7 ms); \
             for WAL, run PRAGMA journal_mode=WAL once (it stays with the file)"
        )
    })
}

/// Warns once per entity that its outbox rows are written outside a transaction.
pub(crate) fn warn_autocommit(entity: &'static str) {
    static WARNED: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut warned = WARNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if warned.contains(&entity) {
        return;
    }
    warned.push(entity);
    crate::diagnostics::warn(
        crate::diagnostics::Kind::Setup,
        format_args!(
            "outbox: `{entity}` is written outside a transaction: the change commits before its \
             outbox row, so a crash between the two commits loses the event (a window of one \
             round trip and one commit); write it inside `db.transaction(…)` / `db.begin()` \
             so that the change and its event commit together"
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgresql_without_the_feature_is_told_what_to_enable() {
        let warning = feature_warning(DbBackend::Postgres, false).expect("a warning");
        assert!(warning.contains("`postgres` feature"), "{warning}");
        assert!(warning.contains(r#"features = ["postgres"]"#), "{warning}");
        assert_eq!(feature_warning(DbBackend::Postgres, true), None);
        assert_eq!(feature_warning(DbBackend::Sqlite, false), None);
        assert_eq!(feature_warning(DbBackend::MySql, false), None);
    }

    #[tokio::test]
    async fn a_sqlite_file_in_a_rollback_journal_is_told_about_wal() {
        let path = std::env::temp_dir().join(format!("vo-journal-{}.sqlite", std::process::id()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let db = sea_orm::Database::connect(&url).await.unwrap();
        let note = journal_note(&db).await.expect("a note");
        assert!(note.contains("journal_mode=delete"), "{note}");
        assert!(note.contains("PRAGMA journal_mode=WAL"), "{note}");
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .unwrap();
        assert_eq!(journal_note(&db).await, None);
        let memory = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        assert_eq!(journal_note(&memory).await, None);
        drop((db, memory));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
