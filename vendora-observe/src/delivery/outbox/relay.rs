//! The relay: claims rows, hands them to its scheduler, keeps their lease alive, and
//! writes what became of them.
//!
//! The scheduler sends (and retries) on its own task; the relay only decides what to claim
//! next. A recorder task writes outcomes behind the sends, everything that finished
//! meanwhile in one round; a row leaves the relay's hands only once its outcome is written,
//! so no claim ever mistakes a delivered-but-unrecorded row for a pending one.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, TransactionTrait};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::claim::{self, Claimed, Cursor, Held, Request};
use super::holder::Holder;
use super::lease::now_ms;
use super::sql::{Binds, statement};
use super::{Outbox, TABLE, admin};
use crate::delivery::scheduler::Report;

/// What the recorder tells the relay.
pub(super) enum Done {
    /// Outcomes written: these rows are no longer the relay's.
    Recorded(Vec<i64>),
    /// Left unsent at shutdown: their leases should end now.
    Released(Vec<i64>),
}

#[cfg(feature = "postgres")]
pub(super) type Listener = Option<sqlx::postgres::PgListener>;
#[cfg(not(feature = "postgres"))]
pub(super) type Listener = Option<()>;

#[cfg(feature = "postgres")]
pub(super) async fn listen(db: &sea_orm::DatabaseConnection) -> Listener {
    if db.get_database_backend() != DbBackend::Postgres {
        return None;
    }
    let pool = db.get_postgres_connection_pool();
    match sqlx::postgres::PgListener::connect_with(pool).await {
        Ok(mut l) => match l.listen(super::CHANNEL).await {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::warn!("outbox: LISTEN failed, polling instead: {e}");
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
pub(super) async fn listen(_db: &sea_orm::DatabaseConnection) -> Listener {
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

/// Rows recorded after which a relay that found nothing more to claim looks again.
const REFILL: usize = 16;

/// How often a relay holding rows counts the pending ones ([`crate::Stats::pending`]).
const PENDING_RECOUNT: Duration = Duration::from_secs(1);

/// Rows a relay holds at most (claimed, not yet recorded), in batches of `batch`.
fn max_held(batch: usize) -> usize {
    4 * batch
}

/// The largest claim such that a relay holding four of them, with bodies the size of
/// `jobs`', stays within `budget` bytes; never below `batch`.
fn rows_that_fit(jobs: &[crate::delivery::Job], budget: usize, batch: usize) -> usize {
    let bytes: usize = jobs.iter().map(|j| j.webhook.body().len()).sum();
    let per_row = (bytes / jobs.len().max(1)).max(1);
    (budget / max_held(1) / per_row).max(batch)
}

pub(super) async fn run(
    outbox: Outbox,
    reports: mpsc::UnboundedReceiver<(i64, Report)>,
    mut listener: Listener,
) {
    let inner = outbox.inner.clone();
    let options = &inner.options;
    let db = &options.db;
    let batch = options.batch.max(1);
    let max_batch = options.max_batch.max(batch);
    // Rows the next claim takes at most: `batch`, doubled after each full claim (a
    // backlog) while four claims of bodies the size of the last ones fit in
    // `max_held_bytes`, back to `batch` once the relay holds nothing and finds nothing.
    let mut size = batch;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    // Stopped with the relay, should the relay be stopped (a shutdown past its deadline).
    let recorder = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(record(
        outbox.clone(),
        reports,
        done_tx,
    )));
    // Every handle of the user's is gone, or another observer took this one's place.
    let mut retiring = false;
    let mut relay_id = inner.relay_id.clone();
    let mut held = Held::default();
    let mut cursor = Cursor::default();
    let mut idle = false;
    // Rows recorded since the last claim: a chain streaming one row at a time is refilled
    // every REFILL rows, not after each one.
    let mut freed = 0usize;
    let mut next_due: Option<i64> = None;
    let mut claim_failing = false;
    let mut last_prune = Instant::now();
    let mut last_analyze: Option<Instant> = None;
    let mut analyzing: Option<JoinHandle<()>> = None;
    let mut notice = LeaseNotice::default();
    let mut claim_now = false;
    // A write of this process woke the relay, perhaps before its transaction committed:
    // a claim that finds nothing looks again shortly, until the commit shows.
    let mut recheck = Recheck::default();
    let mut heartbeat = tokio::time::interval(heartbeat_period(
        options.lease,
        inner.ctx.service.config().timeout(),
    ));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While the relay holds rows (a backlog, or requests that hang), the pending rows are
    // counted once a second: no look for work reads them all then. Beside the loop, one
    // count at a time: on a large backlog a count takes a while.
    let mut count = tokio::time::interval(PENDING_RECOUNT);
    count.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counting: Option<JoinHandle<()>> = None;
    loop {
        // Rows the scheduler let go because the lease could not be renewed in time are
        // still leased to this relay, so no claim would see them; they go back first, or
        // the next claim would take the rows behind them in their chains and send those
        // first.
        let let_go = inner.scheduler.take_let_go();
        if !let_go.is_empty() {
            for id in &let_go {
                held.remove(*id);
            }
            tracing::warn!(
                "outbox: the lease of {} claimed row(s) could not be renewed in time (the \
                 database was slow or unreachable); they were handed back and will be sent \
                 in order once claimed again",
                let_go.len()
            );
            if let Err(e) = db
                .execute_raw(claim::release_statement(inner.backend, &relay_id, &let_go))
                .await
            {
                tracing::debug!(
                    "outbox: handing rows back failed ({e}); they wait for their lease"
                );
                relay_id = rotate(&outbox, &mut held);
                continue;
            }
            renew(&outbox, &relay_id, &held).await;
            idle = false;
        }
        // Rows let go while a claim runs may lie before what it took: then it gives back.
        let let_go_before = inner.scheduler.let_go_count();
        let stopping = inner.stopping.load(std::sync::atomic::Ordering::Acquire);
        let room = max_held(size).saturating_sub(held.len());
        // Whether this round looked for work, and the pending rows the look read (when it
        // read them all and took none).
        let mut looked: Option<Option<u64>> = None;
        if !stopping && !idle && room > 0 {
            let want = room.min(size);
            let req = Request {
                relay: &relay_id,
                now: now_ms(),
                lease: options.lease,
                want,
                per_chain: max_held(size) / 2,
            };
            match claim::claim(db, &held, &mut cursor, req).await {
                Ok(Claimed {
                    jobs,
                    next_due: due,
                    leased_elsewhere,
                    pending_seen,
                }) => {
                    looked = Some(pending_seen.filter(|_| jobs.is_empty()));
                    let took_back = match notice.due(leased_elsewhere, now_ms(), options.lease) {
                        Some(tell) => notice.tell(&outbox, &relay_id, tell).await,
                        None => false,
                    };
                    if std::mem::take(&mut claim_failing) {
                        tracing::info!("outbox: claiming rows works again");
                    }
                    next_due = due;
                    recheck.after_claim(jobs.is_empty());
                    idle = jobs.len() < want && !took_back;
                    // The rows taken back are free now: claim them in the next turn, with
                    // no wait (a running relay waited for its heartbeat).
                    claim_now = took_back;
                    if !idle {
                        size = (size * 2).min(max_batch);
                    }
                    if !jobs.is_empty() {
                        size = size.min(rows_that_fit(&jobs, options.max_held_bytes, batch));
                    }
                    freed = 0;
                    if jobs.len() >= batch {
                        outbox.refresh_statistics(&mut last_analyze, &mut analyzing);
                    }
                    for job in &jobs {
                        held.insert(job.token, job.row, job.unit);
                    }
                    if !jobs.is_empty() {
                        let ids: Vec<i64> = jobs.iter().map(|j| j.token).collect();
                        if inner.scheduler.submit_claimed(jobs, let_go_before).is_err() {
                            // Shutting down, or rows were let go meanwhile: the rows go
                            // back at once.
                            for id in &ids {
                                held.remove(*id);
                            }
                            let _ = db
                                .execute_raw(claim::release_statement(
                                    inner.backend,
                                    &relay_id,
                                    &ids,
                                ))
                                .await;
                        }
                    }
                }
                Err(claim::Failure { error, leased }) => {
                    if !std::mem::replace(&mut claim_failing, true) {
                        tracing::warn!("outbox: claiming rows failed (will keep trying): {error}");
                    }
                    if leased {
                        // Rows may have been leased without our hearing of it: they must
                        // count as another relay's until their lease ends.
                        relay_id = rotate(&outbox, &mut held);
                    }
                    idle = true;
                }
            }
        }
        if idle && held.is_empty() {
            size = batch;
            // An idle relay looks every poll: the count that look read saves a statement
            // each time (and a line each in a log that shows statements); woken without
            // looking (a heartbeat), it has nothing new to count.
            match looked {
                Some(Some(n)) => inner.ctx.counters.set_pending(n),
                Some(None) => {
                    outbox.refresh_pending().await;
                }
                None => {}
            }
            inner.progress.notify_waiters();
            if last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                if let Err(e) = admin::purge_delivered(db, options.retention).await {
                    tracing::warn!("outbox: pruning delivered rows failed: {e}");
                }
            }
        }
        // Idle: until a wake-up, a NOTIFY, the poll, or a row's retry time.
        let wait = next_due
            .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
            .unwrap_or(options.poll_interval)
            .min(options.poll_interval);
        tokio::select! {
            d = done.recv() => match d {
                Some(d) => {
                    let mut batch_done = vec![d];
                    while let Ok(more) = done.try_recv() {
                        batch_done.push(more);
                    }
                    for d in batch_done {
                        match d {
                            Done::Recorded(ids) => {
                                freed += ids.len();
                                for id in ids {
                                    held.finish(id);
                                }
                            }
                            Done::Released(ids) => {
                                freed += ids.len();
                                for id in &ids {
                                    held.remove(*id);
                                }
                                if let Err(e) = db
                                    .execute_raw(claim::release_statement(inner.backend, &relay_id, &ids))
                                    .await
                                {
                                    tracing::debug!("outbox: handing rows back failed ({e}); they wait for their lease");
                                    relay_id = rotate(&outbox, &mut held);
                                }
                            }
                        }
                    }
                    // Later rows of those chains may be claimable now.
                    if freed >= REFILL || held.is_empty() {
                        idle = false;
                    }
                }
                // The scheduler stopped (shutdown) and every outcome is written.
                None => break,
            },
            _ = heartbeat.tick() => renew(&outbox, &relay_id, &held).await,
            _ = count.tick(), if !held.is_empty() => {
                if counting.as_ref().is_none_or(|t| t.is_finished()) {
                    let outbox = outbox.clone();
                    counting = Some(tokio::spawn(async move {
                        outbox.refresh_pending().await;
                    }));
                }
            }
            _ = inner.scheduler.events_let_go() => {}
            _ = std::future::ready(()), if claim_now => claim_now = false,
            _ = inner.retired.cancelled(), if !retiring => {
                retiring = true;
                let outbox = outbox.clone();
                let grace = inner.ctx.service.config().timeout();
                tokio::spawn(async move {
                    outbox.stop(Instant::now() + grace).await;
                });
            }
            _ = inner.wake.notified(), if idle => {
                idle = false;
                recheck.woken();
            }
            _ = recheck.due(), if idle && recheck.pending() => idle = false,
            _ = notified(&mut listener), if idle => idle = false,
            _ = tokio::time::sleep(wait), if idle => idle = false,
        }
    }
    let _ = recorder.await;
    // Nothing of the relay's outlives it.
    for task in [analyzing, counting].into_iter().flatten() {
        let _ = task.await;
    }
    if !held.is_empty() {
        let _ = db
            .execute_raw(claim::release_statement(
                inner.backend,
                &relay_id,
                &held.ids(),
            ))
            .await;
    }
}

/// The looks again after a wake-up by a write of this process that found nothing. The hook
/// writes the outbox row, and wakes the relay, before the write's transaction commits (no
/// commit hook reaches it): the relay then looks 1, 2, 4 … 64 ms later, until it finds
/// work, rather than at its next poll (SQLite has no NOTIFY).
#[derive(Debug, Default)]
struct Recheck {
    /// When to look again, and how many looks found nothing since the wake-up.
    next: Option<(tokio::time::Instant, u32)>,
    /// A wake-up came since the last claim.
    woken: bool,
}

impl Recheck {
    /// The looks after a wake-up, at most: 1 + 2 + … + 64 ms, 127 ms in all.
    const LOOKS: u32 = 7;

    fn woken(&mut self) {
        self.woken = true;
    }

    fn after_claim(&mut self, found_nothing: bool) {
        let looks = match (std::mem::take(&mut self.woken), self.next) {
            _ if !found_nothing => {
                self.next = None;
                return;
            }
            (true, _) => 0,
            (false, Some((_, n))) => n + 1,
            (false, None) => return,
        };
        self.next = (looks < Self::LOOKS).then(|| {
            (
                tokio::time::Instant::now() + Duration::from_millis(1 << looks),
                looks,
            )
        });
    }

    fn pending(&self) -> bool {
        self.next.is_some()
    }

    async fn due(&self) {
        match self.next {
            Some((at, _)) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// How often the relay renews its lease: a quarter of the lease, and often enough that
/// the lease still covers a whole attempt (the request timeout) between two renewals
/// delayed by a slow database.
fn heartbeat_period(lease: Duration, timeout: Duration) -> Duration {
    (lease / 4)
        .min(lease.saturating_sub(timeout) / 3)
        .max(Duration::from_millis(10))
}

/// What [`LeaseNotice`] tells of.
#[derive(Debug, Clone, Copy)]
enum Tell {
    /// Every row leased elsewhere, at start-up.
    AtStart,
    /// A look at the relays holding rows: those of a process gone are taken back, and
    /// those whose lease ends before `below` (no longer renewed) are told of.
    Unrenewed { below: i64 },
}

/// How often a relay looks at the relays holding rows of its frontier: a process that
/// died on this machine has its rows taken back within this.
const LOOK_EVERY_MS: i64 = 1_000;

/// Says when rows leased to other relays hold this one's chains, once per relay: at
/// start-up (rows a process left when it stopped without `shutdown` — a crash, kill -9 —
/// and then nothing of their chains goes out for up to a lease), and later of a relay
/// whose rows' lease is no longer renewed (a live relay renews every quarter of the lease
/// at least). Rows of a relay whose process is gone from this machine are taken back.
#[derive(Debug, Default)]
struct LeaseNotice {
    /// A claim ran since this relay started.
    started: bool,
    /// Relays told of (a bounded set: emptied when it grows past 1,024).
    told: HashSet<String>,
    /// When the rows leased elsewhere were last read (at most every second).
    looked_at: i64,
}

impl LeaseNotice {
    /// After each claim: whether to read the rows leased elsewhere, given when the first
    /// lease of the frontier's such rows ends (`first`): at most once a second while there
    /// are some. A relay's unrenewed leases stay within half a lease of their end for half
    /// a lease, so every one is told of; a dead process's are taken back within a second.
    fn due(&mut self, first: Option<i64>, now: i64, lease: Duration) -> Option<Tell> {
        let started = std::mem::replace(&mut self.started, true);
        first?;
        let lease = lease.as_millis() as i64;
        // A live relay's leases end at least three quarters of a lease from now.
        let below = now + lease / 2;
        let tell = if !started {
            Tell::AtStart
        } else if now - self.looked_at >= LOOK_EVERY_MS {
            Tell::Unrenewed { below }
        } else {
            return None;
        };
        self.looked_at = now;
        Some(tell)
    }

    /// Reads the pending rows leased elsewhere by relay: takes back those of a relay whose
    /// process is gone (see [`super::holder`]), and tells of the others, of relays not told
    /// of yet. Returns whether rows were taken back.
    async fn tell(&mut self, outbox: &Outbox, relay: &str, tell: Tell) -> bool {
        let inner = &outbox.inner;
        let now = now_ms();
        let (whose, below) = match tell {
            Tell::AtStart => ("another relay", i64::MAX),
            Tell::Unrenewed { below } => ("a relay that no longer renews its lease", below),
        };
        // Every holder is read, so that a dead process's rows are taken back at once; only
        // those whose lease ends before `below` are told of.
        let rows = match inner
            .options
            .db
            .query_all_raw(claim::leased_elsewhere_statement(
                inner.backend,
                relay,
                now,
                i64::MAX,
            ))
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!("outbox: reading rows leased elsewhere failed: {e}");
                return false;
            }
        };
        if self.told.len() > 1024 {
            self.told.clear();
        }
        let (mut events, mut until, mut took_back, mut running) = (0, None::<i64>, false, 0);
        for r in rows {
            let (Ok(holder), Ok(n), Ok(last)) = (
                r.try_get::<String>("", "relay"),
                r.try_get::<i64>("", "n"),
                r.try_get::<i64>("", "until"),
            ) else {
                continue;
            };
            let pid = match super::holder::judge(&holder) {
                // A relay of a process that runs on this machine (this one included, under
                // an earlier identity) renews its leases or lets them end.
                // Said once per relay: the look runs every second.
                Holder::Running => {
                    if self.told.insert(holder) {
                        running += n;
                    }
                    continue;
                }
                Holder::Gone(pid) => Some(pid),
                Holder::Unknown => None,
            };
            if let Some(pid) = pid
                && take_back(outbox, &holder, pid).await
            {
                took_back = true;
                continue;
            }
            if last >= below {
                // Renewed lately: a live relay elsewhere.
                continue;
            }
            if self.told.insert(holder) {
                events += n;
                until = until.max(Some(last));
            }
        }
        if running > 0 {
            tracing::info!(
                "outbox: {running} pending event(s) are leased to relays of processes running \
                 on this machine (this one included); their chains wait for those relays"
            );
        }
        let Some(until) = until else {
            return took_back;
        };
        crate::diagnostics::warn(
            crate::diagnostics::Kind::Setup,
            format_args!(
                "outbox: {events} pending event(s) are leased to {whose}, for up to {} s \
                 more, and the events after them in their chains wait for them. With no \
                 other instance running, they were left by a process that stopped without \
                 `Observer::shutdown` (a crash, kill -9) and go out when their lease ends \
                 (OutboxOptions::lease, {} s)",
                ((until - now).max(0) as u64).div_ceil(1000),
                inner.options.lease.as_secs()
            ),
        );
        took_back
    }
}

/// Hands back every pending row leased to `holder`, a relay whose process (`pid`) is gone,
/// and says so. Whether it did.
async fn take_back(outbox: &Outbox, holder: &str, pid: u32) -> bool {
    let inner = &outbox.inner;
    match inner
        .options
        .db
        .execute_raw(claim::release_all_statement(inner.backend, holder))
        .await
    {
        Ok(done) => {
            crate::diagnostics::warn(
                crate::diagnostics::Kind::Setup,
                format_args!(
                    "outbox: took back {} pending event(s) leased to a relay whose process \
                     (pid {pid}, this machine) is gone: it stopped without \
                     `Observer::shutdown` (a crash, kill -9); they go out now",
                    done.rows_affected()
                ),
            );
            true
        }
        Err(e) => {
            tracing::debug!("outbox: taking back the rows of relay {holder}: {e}");
            false
        }
    }
}

/// A new identity for the relay, after rows may have stayed leased to the old one without
/// its holding them: those rows then block their chains until their lease ends, as any other
/// relay's would. What the scheduler holds under the old identity is no longer renewed, so
/// it is let go (every row not in flight; the lease ends the rest): those rows stay leased
/// to the old identity until their lease ends, so they block their chains meanwhile.
fn rotate(outbox: &Outbox, held: &mut Held) -> String {
    let scheduler = &outbox.inner.scheduler;
    scheduler.release_all();
    for id in scheduler.take_let_go() {
        held.remove(id);
    }
    super::holder::new_relay_id()
}

/// Extends the lease of every row held, so a row waiting on a long retry is never taken by
/// another relay; the scheduler stops sending if this keeps failing.
async fn renew(outbox: &Outbox, relay_id: &str, held: &Held) {
    let inner = &outbox.inner;
    let started = now_ms();
    let until = started + inner.options.lease.as_millis() as i64;
    let ids = held.ids();
    for chunk in ids.chunks(500) {
        if let Err(e) = inner
            .options
            .db
            .execute_raw(claim::renew_statement(
                inner.backend,
                relay_id,
                until,
                chunk,
            ))
            .await
        {
            tracing::warn!("outbox: renewing the lease of claimed rows failed: {e}");
            return;
        }
    }
    inner.lease.extend_to(until);
}

/// Writes outcomes as they come, all that arrived meanwhile in one round, then tells the
/// relay which rows are done. A write that fails is retried until it succeeds: until then
/// the rows stay the relay's. A failed attempt is written only on a row still pending: a
/// relay that lost the database past its lease may find its row taken over and delivered
/// by another, and a dead mark then would make `requeue` resend stale state.
async fn record(
    outbox: Outbox,
    mut reports: mpsc::UnboundedReceiver<(i64, Report)>,
    done: mpsc::UnboundedSender<Done>,
) {
    let backend = outbox.inner.backend;
    let mut round = Vec::new();
    while reports.recv_many(&mut round, usize::MAX).await > 0 {
        let mut delivered = Vec::new();
        let mut released = Vec::new();
        let mut finished = Vec::new();
        let mut writes: Vec<Statement> = Vec::new();
        // Where each dead mark is in `writes`, and its row.
        let mut dead_writes: Vec<(usize, i64)> = Vec::new();
        let now = now_ms();
        for (id, report) in round.drain(..) {
            match report {
                Report::Delivered => delivered.push(id),
                Report::Released | Report::Unknown => released.push(id),
                Report::Failed {
                    attempts,
                    delay,
                    error,
                } => writes.push(statement(backend, |b| {
                    format!(
                        "UPDATE {TABLE} SET attempts = {}, next_attempt_at = {}, last_error = {} \
                         WHERE id = {} AND status = 'pending'",
                        b.bind(attempts as i32),
                        b.bind(now + delay.as_millis() as i64),
                        b.bind(error),
                        b.bind(id)
                    )
                })),
                Report::Dead { attempts, error } => {
                    finished.push(id);
                    dead_writes.push((writes.len(), id));
                    writes.push(statement(backend, |b| {
                        format!(
                            "UPDATE {TABLE} SET status = 'dead', attempts = {}, last_error = {}, \
                             claimed_by = NULL, claimed_until = NULL \
                             WHERE id = {} AND status = 'pending'",
                            b.bind(attempts as i32),
                            b.bind(error),
                            b.bind(id)
                        )
                    }));
                }
                Report::Superseded => {
                    finished.push(id);
                    writes.push(statement(backend, |b| {
                        format!(
                            "UPDATE {TABLE} SET status = 'superseded', delivered_at = {}, \
                             claimed_by = NULL, claimed_until = NULL \
                             WHERE id = {} AND status = 'pending'",
                            b.bind(now),
                            b.bind(id)
                        )
                    }));
                }
            }
        }
        // Dead first: a delivery in the same round may make them stale.
        let mut attempt = 0;
        let changed = loop {
            match write_all(&outbox, &writes).await {
                Ok(changed) => break changed,
                Err(e) => retry_later("failed attempts", &mut attempt, e).await,
            }
        };
        for (at, id) in dead_writes {
            if changed[at] == 0 {
                tell_taken_over(&outbox, id).await;
            }
        }
        if !delivered.is_empty() {
            while let Err(e) = mark_delivered(&outbox.inner.options.db, &delivered).await {
                retry_later("delivered rows", &mut attempt, e).await;
            }
            finished.extend(delivered);
        }
        if attempt >= 5 {
            tracing::info!("outbox: writing the outcome of deliveries works again");
        }
        if !finished.is_empty() {
            let _ = done.send(Done::Recorded(finished));
        }
        if !released.is_empty() {
            let _ = done.send(Done::Released(released));
        }
        outbox.inner.progress.notify_waiters();
    }
}

/// A dead letter this relay logged for a row another relay had taken over (its lease had
/// lapsed) is not recorded: says so, with the event's id and the row's status now.
async fn tell_taken_over(outbox: &Outbox, id: i64) {
    let inner = &outbox.inner;
    let now = inner
        .options
        .db
        .query_one_raw(statement(inner.backend, |b| {
            format!(
                "SELECT event_id, status FROM {TABLE} WHERE id = {}",
                b.bind(id)
            )
        }))
        .await;
    let (event_id, status) = match now {
        Ok(Some(r)) => (
            r.try_get::<String>("", "event_id").unwrap_or_default(),
            r.try_get::<String>("", "status").unwrap_or_default(),
        ),
        _ => (String::new(), "gone".to_owned()),
    };
    tracing::warn!(
        "outbox: the dead letter of X-Webhook-Id {event_id} (row {id}) is not recorded: another \
         relay took the row over when this relay's lease lapsed, and the row is now {status}"
    );
}

/// After a failed write of outcomes: logs (once loudly) and waits before the next try.
/// Outcomes are retried until written: until then the rows stay the relay's.
async fn retry_later(what: &str, attempt: &mut u32, e: DbErr) {
    *attempt += 1;
    if *attempt == 5 {
        tracing::error!(
            "outbox: the outcome of deliveries ({what}) cannot be written ({e}); retrying; if \
             this process stops first, the rows are sent again after their lease, with the \
             same X-Webhook-Id"
        );
    } else {
        tracing::debug!("outbox: writing {what} failed, retrying: {e}");
    }
    tokio::time::sleep(Duration::from_millis(20u64 << (*attempt).min(8))).await;
}

/// Writes `writes` in one transaction; returns the rows each changed.
async fn write_all(outbox: &Outbox, writes: &[Statement]) -> Result<Vec<u64>, DbErr> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let txn = outbox.inner.options.db.begin().await?;
    let mut changed = Vec::with_capacity(writes.len());
    for write in writes {
        let done = txn.execute_raw(write.clone()).await?;
        changed.push(done.rows_affected());
    }
    txn.commit().await?;
    Ok(changed)
}

/// Marks rows delivered, 500 per statement (per-row commits would cap the relay at the
/// database's commit rate), after marking `superseded` the rows of the same rows that these
/// deliveries made stale, so that apps never get old state after new:
///
/// - dead rows, so that a later requeue cannot resend them. Always, whoever left the dead
///   rows: a relay that asked only while it knew of dead rows (its own, or counted when
///   idle) missed those another relay left while it was busy. With no dead row the look is a
///   probe of the dead rows' partial index;
/// - requeued rows still pending and not leased (a requeue committed while a newer event of
///   their row was on its way): a probe of the requeued rows' partial index.
///
/// The stale rows are marked first, each step committing on its own: a requeue between the
/// steps finds them already superseded (the deliveries happened), and a crash between them
/// leaves the deliveries pending, sent again with the same ids.
async fn mark_delivered(db: &sea_orm::DatabaseConnection, ids: &[i64]) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    let now = now_ms();
    for chunk in ids.chunks(500) {
        let made_stale = |status: &str, index: &str, extra: &dyn Fn(&mut Binds) -> String| {
            statement(backend, |b| {
                format!(
                    "UPDATE {TABLE}{} SET status = 'superseded', delivered_at = {}, \
                     last_error = COALESCE(last_error, '') || ' (superseded by a newer delivered event of its row)', \
                     claimed_by = NULL, claimed_until = NULL \
                     WHERE {status} AND EXISTS (SELECT 1 FROM {TABLE} d \
                       WHERE d.id IN ({}) AND d.ordering_key = {TABLE}.ordering_key \
                       AND d.id > {TABLE}.id AND {}){}",
                    claim::by_index(backend, index),
                    b.bind(now),
                    b.list(chunk.iter().copied()),
                    admin::stale_after(TABLE, "d"),
                    extra(b)
                )
            })
        };
        db.execute_raw(made_stale("status = 'dead'", "dead", &|_| String::new()))
            .await?;
        db.execute_raw(made_stale(
            "status = 'pending' AND requeued = 1",
            "requeued",
            &|b| {
                format!(
                    " AND (claimed_until IS NULL OR claimed_until < {})",
                    b.bind(now)
                )
            },
        ))
        .await?;
        db.execute_raw(statement(backend, |b| {
            format!(
                "UPDATE {TABLE} SET status = 'delivered', delivered_at = {}, \
                 attempts = attempts + 1, last_error = NULL, claimed_by = NULL, \
                 claimed_until = NULL WHERE id IN ({})",
                b.bind(now),
                b.list(chunk.iter().copied())
            )
        }))
        .await?;
    }
    Ok(())
}

impl Outbox {
    /// PostgreSQL: takes the outbox's planner statistics again, in the background, at most
    /// once a minute, when a claim comes back full (a burst). A table that grew from a few
    /// rows to thousands within autovacuum's one-minute nap was planned as if it still held
    /// a few (50 ms per claim at 20,000 pending instead of 3 ms).
    ///
    /// A role that does not own the table (an application role, see
    /// [`create_table`](crate::outbox::create_table)) may not analyze it: PostgreSQL skips it
    /// with a `WARNING` notice, which sqlx logs at `warn`, once a minute through a backlog.
    /// The statement lowers `client_min_messages` for its own (implicit) transaction, so
    /// the skip is silent; the claim does not need the statistics (see
    /// [`claim::frontier_settings`]).
    fn refresh_statistics(&self, last: &mut Option<Instant>, task: &mut Option<JoinHandle<()>>) {
        if self.inner.backend != DbBackend::Postgres
            || last.is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        *last = Some(Instant::now());
        let db = self.inner.options.db.clone();
        *task = Some(tokio::spawn(async move {
            let sql = format!("SET LOCAL client_min_messages = error; ANALYZE {TABLE}");
            if let Err(e) = db.execute_unprepared(&sql).await {
                tracing::debug!("outbox: ANALYZE {TABLE} failed (autovacuum will do it): {e}");
            }
        }));
    }
}

/// The relay's database work alone, for the bench's ceiling: claims `want` rows at a time
/// (the statements a relay runs, bodies included) and writes them delivered, without
/// sending anything, until nothing is left. Returns the rows it went through. On
/// PostgreSQL it first takes the table's statistics, as a relay does at a backlog's first
/// full claim.
#[cfg(feature = "internals")]
pub async fn drain_without_sending(
    db: &sea_orm::DatabaseConnection,
    want: usize,
) -> Result<u64, DbErr> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(&format!("ANALYZE {TABLE}")).await?;
    }
    let relay = uuid::Uuid::now_v7().to_string();
    let mut cursor = Cursor::default();
    let mut total = 0u64;
    loop {
        let req = Request {
            relay: &relay,
            now: now_ms(),
            lease: Duration::from_secs(60),
            want,
            per_chain: max_held(want) / 2,
        };
        let Claimed { jobs, .. } = claim::claim(db, &Held::default(), &mut cursor, req)
            .await
            .map_err(|f| f.error)?;
        if jobs.is_empty() {
            return Ok(total);
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.token).collect();
        mark_delivered(db, &ids).await?;
        total += ids.len() as u64;
    }
}

/// The ceiling of any relay, for the bench: reads the pending rows once, by an id cursor,
/// `want` at a time with their bodies, and hands them to `observer` (direct mode) to send,
/// writing nothing, neither lease nor mark. Returns the rows read; `observer` then sends
/// them (wait at the receiver, or [`Observer::flush`](crate::Observer::flush)).
#[cfg(feature = "internals")]
pub async fn send_without_writing(
    db: &sea_orm::DatabaseConnection,
    observer: &crate::Observer,
    want: usize,
) -> Result<u64, DbErr> {
    let crate::observer::Sink::Direct(queue) = &observer.inner.sink else {
        return Err(DbErr::Custom(
            "send_without_writing needs a direct-mode observer".into(),
        ));
    };
    let backend = db.get_database_backend();
    let (mut after, mut total) = (0i64, 0u64);
    loop {
        let rows = db
            .query_all_raw(claim::read_pending_statement(backend, after, want))
            .await?;
        let jobs = rows
            .iter()
            .map(claim::job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(last) = jobs.last() else {
            return Ok(total);
        };
        after = last.token;
        total += jobs.len() as u64;
        queue.enqueue(jobs).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_wake_that_finds_nothing_looks_again_1_2_4_to_64_ms_later() {
        let mut r = Recheck::default();
        r.after_claim(true);
        assert!(!r.pending(), "no wake-up, no look again");
        r.woken();
        let mut waits = Vec::new();
        r.after_claim(true);
        while r.pending() {
            let before = tokio::time::Instant::now();
            r.due().await;
            waits.push(before.elapsed().as_millis());
            r.after_claim(true);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64]);
        r.woken();
        r.after_claim(true);
        r.due().await;
        r.after_claim(false);
        assert!(!r.pending(), "work found: no more looks");
    }

    #[test]
    fn rows_leased_elsewhere_are_read_at_start_then_once_a_second() {
        let mut notice = LeaseNotice::default();
        // The first claim finds another relay's rows: read whatever their lease.
        assert!(matches!(
            notice.due(Some(1_060_000), 1_000_000, LEASE),
            Some(Tell::AtStart)
        ));
        // Within a second of the last look: not read again.
        assert!(notice.due(Some(1_046_000), 1_000_500, LEASE).is_none());
        // A second later: read, telling only of leases ending within half a lease.
        assert!(matches!(
            notice.due(Some(1_080_000), 1_001_000, LEASE),
            Some(Tell::Unrenewed { below: 1_031_000 })
        ));
        assert!(notice.due(Some(1_080_000), 1_001_999, LEASE).is_none());
        assert!(notice.due(Some(1_080_000), 1_002_000, LEASE).is_some());
        // Nothing leased elsewhere: nothing to read.
        assert!(notice.due(None, 1_095_000, LEASE).is_none());
    }

    #[test]
    fn a_first_claim_without_leased_rows_ends_the_start_up_notice() {
        let mut notice = LeaseNotice::default();
        assert!(notice.due(None, 1_000_000, LEASE).is_none());
        // Another relay's rows, later: read as a look (told of only when unrenewed), not
        // as the start-up notice.
        assert!(matches!(
            notice.due(Some(1_061_000), 1_001_000, LEASE),
            Some(Tell::Unrenewed { .. })
        ));
    }
}
