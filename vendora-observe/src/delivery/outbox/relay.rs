//! The relay: claims rows, hands them to its scheduler, keeps their lease alive, and
//! writes what became of them.
//!
//! The scheduler sends (and retries) on its own task; the relay only decides what to claim
//! next. A recorder task ([`super::record`]) writes outcomes behind the sends, everything
//! that finished meanwhile in one round; a row leaves the relay's hands only once its
//! outcome is written, so no claim ever mistakes a delivered-but-unrecorded row for a
//! pending one.
//!
//! Each turn of the loop is a few named steps: [`Relay::hand_back_let_go`] (rows the
//! scheduler let go when the lease could not be renewed), [`Relay::look_for_work`] (one
//! claim), [`Relay::rest`] (housekeeping when idle), then a wait for whatever comes first:
//! outcomes written ([`Relay::recorded`]), the heartbeat ([`Relay::renew`]), a wake-up, a
//! `NOTIFY`, the poll, retirement ([`Relay::retire`]).

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::claim::{self, ClaimConnection, Claimed, Cursor, Held, Request};
use super::lease::now_ms;
use super::notice::LeaseNotice;
use super::record::{Done, record};
use super::wake::{Listener, Recheck, notified};
use super::{Outbox, TABLE, admin};
use crate::delivery::scheduler::Report;

/// Rows recorded after which a relay that found nothing more to claim looks again.
const REFILL: usize = 16;

/// How often a relay holding rows counts the pending ones ([`crate::Stats::pending`]).
const PENDING_RECOUNT: Duration = Duration::from_secs(1);

/// How often an idle relay deletes the delivered rows past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Rows a relay holds at most (claimed, not yet recorded), in batches of `batch`; a
/// chain holds half of them at most (a hot row's pipeline), and the last `batch` of them
/// go only to chains that hold at most one row (see [`LIGHT_CHAIN`]).
pub(super) fn max_held(batch: usize) -> usize {
    4 * batch
}

/// Rows a chain may hold after a claim of the last `batch` rows of [`max_held`]: its
/// head and the row after it. Chains whose heads wait on slow answers while their rows
/// keep being written fill the relay with their backlogs (64 rows updated every 100 ms
/// and answered after 2 s filled it within seconds, and other rows' events waited up to a
/// minute): without these last rows, no other row would be claimed until one of them was
/// answered. A chain that holds more than its head already has a row waiting to go next.
const LIGHT_CHAIN: usize = 2;

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
    listener: Listener,
) {
    let inner = outbox.inner.clone();
    let options = &inner.options;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    // Stopped with the relay, should the relay be stopped (a shutdown past its deadline).
    let recorder = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(record(
        outbox.clone(),
        reports,
        done_tx,
    )));
    let mut relay = Relay::new(outbox, listener);
    let mut heartbeat = tokio::time::interval(heartbeat_period(
        options.lease,
        inner.ctx.service.config().timeout(),
    ));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While the relay holds rows (a backlog, or requests that hang), the pending rows are
    // counted once a second: no look for work reads them all then.
    let mut count = tokio::time::interval(PENDING_RECOUNT);
    count.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !relay.hand_back_let_go().await {
            continue;
        }
        let looked = relay.look_for_work().await;
        if relay.idle && relay.held.is_empty() {
            relay.rest(looked).await;
        }
        let idle = relay.idle;
        let wait = relay.wait();
        tokio::select! {
            d = done.recv() => match d {
                Some(d) => {
                    let mut round = vec![d];
                    while let Ok(more) = done.try_recv() {
                        round.push(more);
                    }
                    relay.recorded(round).await;
                }
                // The scheduler stopped (shutdown) and every outcome is written.
                None => break,
            },
            _ = heartbeat.tick() => relay.renew().await,
            _ = count.tick(), if !relay.held.is_empty() => relay.count_pending(),
            _ = inner.scheduler.events_let_go() => {}
            _ = std::future::ready(()), if relay.claim_now => relay.claim_now = false,
            _ = inner.retired.cancelled(), if !relay.retiring => relay.retire(),
            _ = inner.wake.notified(), if idle => {
                if relay.listener.is_some() {
                    relay.recheck.woken_awaiting_notify();
                } else {
                    relay.idle = false;
                    relay.recheck.woken();
                }
            }
            _ = relay.recheck.due(), if idle && relay.recheck.pending() => relay.idle = false,
            _ = notified(&mut relay.listener), if idle => {
                relay.idle = false;
                relay.recheck.notified();
            }
            _ = tokio::time::sleep(wait), if idle => relay.idle = false,
        }
    }
    let _ = recorder.await;
    relay.finish().await;
}

/// What a relay keeps between the turns of its loop.
struct Relay {
    outbox: Outbox,
    listener: Listener,
    /// The identity rows are leased to (a new one after a database failure, see
    /// [`Relay::rotate`]).
    relay_id: String,
    held: Held,
    cursor: Cursor,
    /// The connection claims run on (PostgreSQL; see [`ClaimConnection`]).
    conn: ClaimConnection,
    batch: usize,
    max_batch: usize,
    /// Rows the next claim takes at most: `batch`, doubled after each full claim (a
    /// backlog) while four claims of bodies the size of the last ones fit in
    /// `max_held_bytes`, back to `batch` once the relay holds nothing and finds nothing.
    size: usize,
    /// The last look found less than it wanted: wait for something to change.
    idle: bool,
    /// Rows recorded since the last claim: a chain streaming one row at a time is refilled
    /// every [`REFILL`] rows, not after each one.
    freed: usize,
    /// When the first row not yet due (a retry) comes due.
    next_due: Option<i64>,
    claim_failing: bool,
    /// Claim again with no wait: the last claim took all it asked for (more may be
    /// claimable), or rows were taken back from a relay whose process is gone.
    claim_now: bool,
    /// Every handle of the user's is gone, or another observer took this one's place.
    retiring: bool,
    /// A write of this process woke the relay, perhaps before its transaction committed:
    /// a claim that finds nothing looks again shortly, until the commit shows.
    recheck: Recheck,
    notice: LeaseNotice,
    last_prune: Instant,
    last_analyze: Option<Instant>,
    analyzing: Option<JoinHandle<()>>,
    /// The count of pending rows running beside the loop (one at a time: on a large
    /// backlog a count takes a while).
    counting: Option<JoinHandle<()>>,
}

impl Relay {
    fn new(outbox: Outbox, listener: Listener) -> Relay {
        let options = &outbox.inner.options;
        let batch = options.batch.max(1);
        Relay {
            relay_id: outbox.inner.relay_id.clone(),
            max_batch: options.max_batch.max(batch),
            batch,
            size: batch,
            outbox,
            listener,
            held: Held::default(),
            cursor: Cursor::default(),
            conn: ClaimConnection::default(),
            idle: false,
            freed: 0,
            next_due: None,
            claim_failing: false,
            claim_now: false,
            retiring: false,
            recheck: Recheck::default(),
            notice: LeaseNotice::default(),
            last_prune: Instant::now(),
            last_analyze: None,
            analyzing: None,
            counting: None,
        }
    }

    /// Rows the scheduler let go because the lease could not be renewed in time are still
    /// leased to this relay, so no claim would see them; they go back first, or the next
    /// claim would take the rows behind them in their chains and send those first. False
    /// when handing them back failed (the relay took a new identity): the turn starts over.
    async fn hand_back_let_go(&mut self) -> bool {
        let inner = &self.outbox.inner;
        let let_go = inner.scheduler.take_let_go();
        if let_go.is_empty() {
            return true;
        }
        for id in &let_go {
            self.held.remove(*id);
        }
        tracing::warn!(
            "outbox: the lease of {} claimed row(s) could not be renewed in time (the \
             database was slow or unreachable); they were handed back and will be sent \
             in order once claimed again",
            let_go.len()
        );
        if !self.release(&let_go).await {
            return false;
        }
        self.renew().await;
        self.idle = false;
        true
    }

    /// One claim, unless idle, stopping or holding all it may: hands what it took to the
    /// scheduler. Returns whether a look succeeded, and the pending rows it read (when it
    /// read them all and took none).
    async fn look_for_work(&mut self) -> Option<Option<u64>> {
        let inner = self.outbox.inner.clone();
        let options = &inner.options;
        // Rows let go while a claim runs may lie before what it took: then it gives back.
        let let_go_before = inner.scheduler.let_go_count();
        let stopping = inner.stopping.is_cancelled();
        let cap = max_held(self.size);
        // `batch` of the rows it may hold are kept for chains that hold little.
        let room = cap
            .saturating_sub(self.batch)
            .saturating_sub(self.held.len());
        let reserve = cap.saturating_sub(self.held.len());
        let (want, per_chain) = if room > 0 {
            (room.min(self.size), cap / 2)
        } else if reserve > 0 && self.freed < REFILL {
            // Full but for the last rows, and its rows are not being recorded (a draining
            // relay refills as they are): those rows, for chains that hold little.
            (reserve.min(self.batch), LIGHT_CHAIN)
        } else {
            return None;
        };
        if stopping || self.idle {
            return None;
        }
        let req = Request {
            relay: &self.relay_id,
            now: now_ms(),
            lease: options.lease,
            want,
            per_chain,
        };
        let claimed = match claim::claim(
            &options.db,
            &mut self.conn,
            &self.held,
            &mut self.cursor,
            req,
        )
        .await
        {
            Ok(claimed) => claimed,
            Err(claim::Failure { error, leased }) => {
                if !std::mem::replace(&mut self.claim_failing, true) {
                    tracing::warn!("outbox: claiming rows failed (will keep trying): {error}");
                }
                if leased {
                    // Rows may have been leased without our hearing of it: they must count
                    // as another relay's until their lease ends.
                    self.rotate();
                }
                self.idle = true;
                return None;
            }
        };
        let Claimed {
            jobs,
            next_due,
            leased_elsewhere,
            pending_seen,
        } = claimed;
        let looked = Some(pending_seen.filter(|_| jobs.is_empty()));
        let took_back = match self.notice.due(leased_elsewhere, now_ms(), options.lease) {
            Some(tell) => self.notice.tell(&self.outbox, &self.relay_id, tell).await,
            None => false,
        };
        if std::mem::take(&mut self.claim_failing) {
            tracing::info!("outbox: claiming rows works again");
        }
        self.next_due = next_due;
        self.recheck.after_claim(jobs.is_empty());
        self.idle = jobs.len() < want && !took_back;
        // A full claim, or rows taken back (free now): claim again in the next turn, with no
        // wait. The loop otherwise waits for outcomes to be recorded, and rows whose
        // answers are slow bring none: a relay that had filled a claim with slow rows'
        // backlogs claimed nothing else until its pending count's tick a second later, and
        // a running relay that took rows back waited for its heartbeat.
        self.claim_now = !self.idle;
        if !self.idle && room > 0 {
            self.size = (self.size * 2).min(self.max_batch);
        }
        if !jobs.is_empty() {
            self.size = self
                .size
                .min(rows_that_fit(&jobs, options.max_held_bytes, self.batch));
        }
        self.freed = 0;
        if jobs.len() >= self.batch {
            self.outbox
                .refresh_statistics(&mut self.last_analyze, &mut self.analyzing);
        }
        self.hand_over(jobs, let_go_before).await;
        looked
    }

    /// Hands claimed rows to the scheduler; they go back at once if it refuses them
    /// (shutting down, or rows were let go while the claim ran).
    async fn hand_over(&mut self, jobs: Vec<crate::delivery::Job>, let_go_before: u64) {
        if jobs.is_empty() {
            return;
        }
        for job in &jobs {
            self.held.insert(job.token, job.row, job.unit);
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.token).collect();
        if self
            .outbox
            .inner
            .scheduler
            .submit_claimed(jobs, let_go_before)
            .is_err()
        {
            for id in &ids {
                self.held.remove(*id);
            }
            let _ = self.hand_back(&ids).await;
        }
    }

    /// Idle and holding nothing: sets the pending count, tells waiters of progress, and
    /// prunes delivered rows past their retention now and then.
    async fn rest(&mut self, looked: Option<Option<u64>>) {
        let inner = self.outbox.inner.clone();
        self.size = self.batch;
        // An idle relay looks every poll: the count that look read saves a statement each
        // time (and a line each in a log that shows statements); woken without looking (a
        // heartbeat), it has nothing new to count.
        match looked {
            Some(Some(n)) => inner.ctx.counters.set_pending(n),
            Some(None) => {
                self.outbox.refresh_pending().await;
            }
            None => {}
        }
        inner.progress.notify_waiters();
        if self.last_prune.elapsed() > PRUNE_EVERY {
            self.last_prune = Instant::now();
            if let Err(e) = admin::purge_delivered(&inner.options.db, inner.options.retention).await
            {
                tracing::warn!("outbox: pruning delivered rows failed: {e}");
            }
        }
    }

    /// How long an idle relay waits at most: until the poll, or a row's retry time.
    fn wait(&self) -> Duration {
        let poll = self.outbox.inner.options.poll_interval;
        self.next_due
            .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
            .unwrap_or(poll)
            .min(poll)
    }

    /// The recorder wrote outcomes, or the scheduler left rows unsent at shutdown: those
    /// rows are no longer the relay's (the latter handed back).
    async fn recorded(&mut self, round: Vec<Done>) {
        for done in round {
            match done {
                Done::Recorded(ids) => {
                    self.freed += ids.len();
                    for id in ids {
                        self.held.finish(id);
                    }
                }
                Done::Released(ids) => {
                    self.freed += ids.len();
                    for id in &ids {
                        self.held.remove(*id);
                    }
                    self.release(&ids).await;
                }
            }
        }
        // Later rows of those chains may be claimable now.
        if self.freed >= REFILL || self.held.is_empty() {
            self.idle = false;
        }
    }

    /// Counts the pending rows beside the loop, unless a count still runs.
    fn count_pending(&mut self) {
        if self.counting.as_ref().is_none_or(|t| t.is_finished()) {
            let outbox = self.outbox.clone();
            self.counting = Some(tokio::spawn(async move {
                outbox.refresh_pending().await;
            }));
        }
    }

    /// Every handle of the user's is gone, or another observer took this one's place: the
    /// relay stops, as a shutdown would, within a request timeout.
    fn retire(&mut self) {
        self.retiring = true;
        let outbox = self.outbox.clone();
        let grace = outbox.inner.ctx.service.config().timeout();
        tokio::spawn(async move {
            outbox.stop(Instant::now() + grace).await;
        });
    }

    /// Hands rows back: their lease ends now.
    async fn hand_back(&self, ids: &[i64]) -> Result<(), sea_orm::DbErr> {
        let inner = &self.outbox.inner;
        inner
            .options
            .db
            .execute_raw(claim::release_statement(inner.backend, &self.relay_id, ids))
            .await
            .map(drop)
    }

    /// Hands rows back; on failure the relay takes a new identity (the rows wait for their
    /// lease): false.
    async fn release(&mut self, ids: &[i64]) -> bool {
        match self.hand_back(ids).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(
                    "outbox: handing rows back failed ({e}); they wait for their lease"
                );
                self.rotate();
                false
            }
        }
    }

    /// A new identity for the relay, after rows may have stayed leased to the old one
    /// without its holding them: those rows then block their chains until their lease
    /// ends, as any other relay's would. What the scheduler holds under the old identity is
    /// no longer renewed, so it is let go (every row not in flight; the lease ends the
    /// rest): those rows stay leased to the old identity until their lease ends, so they
    /// block their chains meanwhile.
    fn rotate(&mut self) {
        let scheduler = &self.outbox.inner.scheduler;
        scheduler.release_all();
        for id in scheduler.take_let_go() {
            self.held.remove(id);
        }
        self.relay_id = super::holder::new_relay_id();
    }

    /// Extends the lease of every row held, so a row waiting on a long retry is never taken
    /// by another relay; the scheduler stops sending if this keeps failing.
    async fn renew(&mut self) {
        let inner = &self.outbox.inner;
        let until = now_ms() + inner.options.lease.as_millis() as i64;
        let ids = self.held.ids();
        for chunk in ids.chunks(500) {
            if let Err(e) = inner
                .options
                .db
                .execute_raw(claim::renew_statement(
                    inner.backend,
                    &self.relay_id,
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

    /// The loop ended (every outcome written): nothing of the relay's outlives it, and what
    /// it still holds goes back.
    async fn finish(mut self) {
        for task in [self.analyzing.take(), self.counting.take()]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
        if !self.held.is_empty() {
            let _ = self.hand_back(&self.held.ids()).await;
        }
        std::mem::take(&mut self.conn).close().await;
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
