//! The scheduler both delivery modes run on: chains of events, a ready set, senders, and
//! retries waiting on timers.
//!
//! Each event belongs to one or two chains (its row's and, under causal order, its unit of
//! work's). A chain is a FIFO of the events in it; an event is *ready* when it heads every
//! chain it belongs to. `concurrency` senders take ready events and send them; a sender that
//! finishes an event takes the next ready one at once, most often the next event of the
//! same chain, so a chain's backlog goes out back to back. A failed attempt goes on a timer
//! and stays at the head of its chains: it holds back exactly the events that must follow
//! it, and no sender. When an event completes (delivered, dead or superseded) it leaves its
//! chains and the events behind it may become ready.
//!
//! The state sits behind one mutex, held for a few hash-map operations per event; every
//! step is O(1) in the number of events waiting, so a row with a backlog of thousands
//! streams at the receiver's pace.
//!
//! Sources: direct mode submits the events of each write; the outbox relay submits the rows
//! it claimed and records what the scheduler [`Report`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod pace;
mod state;

use pace::Pace;
use state::{Attempted, Finished, State, Step, Taken};

use super::{Context, Job, Leftovers};

/// What became of an event, for a source that records it (the outbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Report {
    /// Answered 2xx.
    Delivered,
    /// An attempt failed; the next one waits `delay`.
    Failed {
        attempts: u32,
        delay: Duration,
        error: String,
    },
    /// Given up on after its last attempt.
    Dead { attempts: u32, error: String },
    /// Not sent: a newer event of its row superseded it.
    Superseded,
    /// Left unsent at the shutdown deadline. (Rows let go for want of a lease are not
    /// reported: the relay takes them with [`Scheduler::take_let_go`].)
    Released,
    /// Cut in flight at the shutdown deadline: the receiver may have processed it.
    Unknown,
}

/// What a source's attempts must fit in (the outbox's lease on the rows it handed over):
/// an attempt that would outlast it does not start, and everything not in flight is let go
/// instead ([`Scheduler::take_let_go`]).
pub(crate) trait Gate: Send + Sync {
    /// Whether an attempt that may take `attempt` can start now.
    fn admits(&self, attempt: Duration) -> bool;
}

/// How a source wants its events handled.
pub(crate) struct Setup {
    pub(crate) ctx: Arc<Context>,
    /// Where reports go (the outbox's recorder); `None` in direct mode. Kept in the state
    /// and dropped at the end of shutdown, which tells the recorder that every report is in.
    pub(crate) reports: Option<mpsc::UnboundedSender<(i64, Report)>>,
    /// Direct mode: the scheduler releases the pending count as events complete.
    pub(crate) track_pending: bool,
    /// Outbox mode: the lease every attempt must fit in.
    pub(crate) lease: Option<Arc<dyn Gate>>,
    /// Direct mode: events left at the shutdown deadline are dead-lettered (the outbox
    /// keeps them in its table instead).
    pub(crate) dead_letter_leftovers: bool,
}

/// The handle sources hold: submit events, shut down.
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
}

struct Shared {
    setup: Setup,
    state: Mutex<State>,
    /// The senders and the timers task, awaited at shutdown.
    tasks: TaskTracker,
    pace: Pace,
    /// Signalled for each event that becomes ready (one sender per event).
    work: Notify,
    /// Signalled when a timer earlier than the timer task's sleep is set.
    timers_changed: Notify,
    /// Signalled when the last event completes (shutdown waits for it).
    drained: Notify,
    /// Signalled when rows were let go for want of a lease (the relay hands them back).
    let_go: Notify,
    /// Set at the shutdown deadline: senders cut what they send and stop.
    abort: CancellationToken,
    /// Whether the events lost to a stopped runtime were reported (once).
    reported_exit: AtomicBool,
}

impl Scheduler {
    pub(crate) fn start(mut setup: Setup) -> Scheduler {
        let concurrency = setup.ctx.concurrency.max(1);
        let pace = Pace::new(concurrency, setup.ctx.slow_slots);
        let state = State {
            reports: setup.reports.take(),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            setup,
            state: Mutex::new(state),
            tasks: TaskTracker::new(),
            pace,
            work: Notify::new(),
            timers_changed: Notify::new(),
            drained: Notify::new(),
            let_go: Notify::new(),
            abort: CancellationToken::new(),
            reported_exit: AtomicBool::new(false),
        });
        for _ in 0..concurrency {
            shared.tasks.spawn(sender(shared.clone()));
        }
        shared.tasks.spawn(timers(shared.clone()));
        Scheduler { shared }
    }

    /// Hands over events, in the order their chains must keep (a write's events, a
    /// claim's rows); given back once the scheduler is closed.
    pub(crate) fn submit(&self, jobs: Vec<Job>) -> Result<(), Vec<Job>> {
        self.submit_unless(jobs, |_| false)
    }

    /// Hands over the rows of a claim that began when [`Scheduler::let_go_count`] was
    /// `seen`; given back if rows were let go since (the claim may have passed them: they
    /// were still leased to the relay, so it could not see them) or once closed.
    pub(crate) fn submit_claimed(&self, jobs: Vec<Job>, seen: u64) -> Result<(), Vec<Job>> {
        self.submit_unless(jobs, |state| state.let_go_count != seen)
    }

    fn submit_unless(
        &self,
        jobs: Vec<Job>,
        refuse: impl FnOnce(&State) -> bool,
    ) -> Result<(), Vec<Job>> {
        let mut state = self.shared.lock();
        if state.closed || refuse(&state) {
            return Err(jobs);
        }
        let woken = state.add(jobs);
        // The receiver is down: the new events wait for the next probe, which the timers
        // task sends them (it may be asleep, with nothing left to probe with).
        let down = state.endpoint.down.is_some();
        drop(state);
        for _ in 0..woken {
            self.shared.work.notify_one();
        }
        if down {
            self.shared.timers_changed.notify_one();
        }
        Ok(())
    }

    /// When the oldest event still held was made.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn oldest(&self) -> Option<SystemTime> {
        let mut state = self.shared.lock();
        state.trim_by_age();
        state.by_age.front().map(|(_, born)| *born)
    }

    /// Lets go of every event that is not in flight: the outbox could not renew its lease.
    /// Their rows are then the relay's to hand back ([`Scheduler::take_let_go`]).
    pub(crate) fn release_all(&self) {
        let mut state = self.shared.lock();
        state.release_all();
        if state.jobs.is_empty() {
            self.shared.drained.notify_waiters();
        }
    }

    /// The rows (tokens) let go since the last call. Until they are handed back they are
    /// still leased to the relay, invisible to its claims, and held by no one: no claim
    /// may run before they are handed back, or it would pass them.
    pub(crate) fn take_let_go(&self) -> Vec<i64> {
        std::mem::take(&mut self.shared.lock().let_go)
    }

    /// How many times events were let go so far (see [`Scheduler::submit_claimed`]).
    pub(crate) fn let_go_count(&self) -> u64 {
        self.shared.lock().let_go_count
    }

    /// Resolves when events were let go since the last call.
    pub(crate) async fn events_let_go(&self) {
        self.shared.let_go.notified().await
    }

    /// Finishes what was submitted until `deadline`, then cuts what is in flight and
    /// leaves the rest. Returns what was cut and left.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> Leftovers {
        let deadline = Instant::now() + deadline;
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let mut state = self.shared.lock();
                state.closed = true;
                if state.jobs.is_empty() {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                break;
            }
        }
        self.shared.abort.cancel();
        self.shared.work.notify_waiters();
        self.shared.timers_changed.notify_one();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        let mut state = self.shared.lock();
        let mut out = Leftovers {
            unknown: state.cut,
            left: 0,
        };
        let mut left: Vec<u64> = state.jobs.keys().copied().collect();
        left.sort_unstable();
        for seq in left {
            out.left += 1;
            if self.shared.setup.dead_letter_leftovers {
                state.dead_letter(
                    &self.shared.setup,
                    seq,
                    "not sent before the shutdown deadline: give `Observer::shutdown` a longer \
                     deadline if the receiver needs it, or use outbox mode, which keeps such \
                     events for the next start"
                        .into(),
                    None,
                );
            }
            state.forget(&self.shared.setup, seq, Report::Released);
        }
        state.reports = None;
        out
    }
}

/// The last handle is gone (the observer was dropped without `shutdown`): what is queued
/// is still delivered in the background, then the senders stop.
impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_waiters();
        self.shared.timers_changed.notify_one();
    }
}

/// Held by each sender task. Dropped without `clean`, the task was cancelled: its runtime
/// stopped (the program left `main`) with events still in hand. Says so, once.
struct ExitGuard {
    shared: Arc<Shared>,
    clean: bool,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if self.clean || self.shared.aborting() {
            return;
        }
        let (left, in_flight) = {
            let state = self.shared.lock();
            let in_flight = state
                .jobs
                .values()
                .filter(|e| e.step == Step::InFlight)
                .count();
            (state.jobs.len(), in_flight)
        };
        if left == 0 || self.shared.reported_exit.swap(true, Ordering::AcqRel) {
            return;
        }
        let kind = crate::diagnostics::Kind::Delivery;
        if self.shared.setup.dead_letter_leftovers {
            let unsent = left - in_flight;
            // A request cut without an answer may have reached the receiver: not "lost".
            let cut = match in_flight {
                0 => String::new(),
                n => format!(
                    ", and {n} cut in flight without an answer (the receiver may have processed \
                     those)"
                ),
            };
            crate::diagnostics::error(
                kind,
                format_args!(
                    "{unsent} webhook(s) were never sent{cut}: the program ended (its Tokio \
                     runtime stopped) first; call `observer.shutdown(Duration::from_secs(5)).await` \
                     before returning from main: it delivers what is queued and reports what it could not"
                ),
            );
        } else {
            crate::diagnostics::warn(
                kind,
                format_args!(
                    "the program ended with {left} outbox event(s) claimed and not yet delivered; they \
                     stay in vendora_outbox and go out at the next start, after their lease; call \
                     `observer.shutdown(Duration::from_secs(5)).await` before returning from main to \
                     deliver them now"
                ),
            );
        }
    }
}

/// Work that must not run under the scheduler's lock: log lines (a subscriber may write
/// to a slow terminal), stderr, the user's dead-letter callback. Queued while the lock is
/// held ([`State::later`]), run once it is released.
type Later = Box<dyn FnOnce() + Send>;

/// The scheduler's state, locked. Released on drop, after which the work queued meanwhile
/// ([`State::later`]) runs, outside the lock.
struct Locked<'a>(Option<MutexGuard<'a, State>>, &'a Shared);

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.0.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut state) = self.0.take() else {
            return;
        };
        let later = std::mem::take(&mut state.later);
        let released = std::mem::take(&mut state.released);
        drop(state);
        for work in later {
            work();
        }
        // After the callbacks: `flush` returns once each dead letter was handed over.
        self.1.setup.ctx.counters.release(released);
    }
}

impl Shared {
    fn lock(&self) -> Locked<'_> {
        Locked(
            Some(self.state.lock().unwrap_or_else(|p| p.into_inner())),
            self,
        )
    }

    fn aborting(&self) -> bool {
        self.abort.is_cancelled()
    }

    /// A request in flight counts as slow from now: a sender stands in for it while the
    /// slow slots last.
    fn went_slow(self: &Arc<Self>) {
        self.pace.slow.fetch_add(1, Ordering::AcqRel);
        while self.pace.take_sender_slot() {
            self.tasks.spawn(sender(self.clone()));
        }
    }
}

/// One sender: records the outcome of its last attempt and takes the next ready event under
/// one lock, sends it, and so on. A busy sender touches no notifier: it registers for a
/// wake-up only when nothing is ready, and for the shutdown's abort once.
async fn sender(shared: Arc<Shared>) {
    let mut guard = ExitGuard {
        shared: shared.clone(),
        clean: false,
    };
    let setup = &shared.setup;
    let timeout = setup.ctx.service.config().timeout();
    // Registered once: the abort comes once, and ends the task.
    let aborted = shared.abort.cancelled();
    tokio::pin!(aborted);
    let mut last: Option<Attempted> = None;
    let mut graveyard = Vec::new();
    loop {
        let (mut woken, mut retrying) = (0, false);
        // Fewer senders are wanted (a slow request this one stood in for was answered):
        // this one records its last outcome and leaves.
        let leave = shared.pace.leave();
        let (taken, empty, closed, let_go) = {
            let mut state = shared.lock();
            std::mem::swap(&mut graveyard, &mut state.graveyard);
            if let Some(Attempted {
                seq,
                successes,
                result,
                slow,
            }) = last.take()
            {
                state.note_pace(seq, slow);
                match state.finish(setup, seq, successes, result) {
                    Finished::Woke(n) => woken = n,
                    Finished::Retrying => retrying = true,
                }
            }
            let taken = if shared.aborting() || leave {
                None
            } else {
                state.take(setup, timeout)
            };
            let let_go = !state.let_go.is_empty();
            (taken, state.jobs.is_empty(), state.closed, let_go)
        };
        graveyard.clear();
        // Events that became ready beyond the one this sender took go to other senders.
        for _ in usize::from(taken.is_some())..woken {
            shared.work.notify_one();
        }
        if retrying {
            shared.timers_changed.notify_one();
        }
        if let_go {
            shared.let_go.notify_one();
        }
        if empty {
            // The last events may have completed unsent (superseded, released).
            shared.drained.notify_waiters();
        }
        if shared.aborting() {
            guard.clean = true;
            return;
        }
        if leave {
            // A wake-up this sender may have taken goes to another one.
            shared.work.notify_one();
            guard.clean = true;
            return;
        }
        let Some(Taken {
            seq,
            webhook,
            span,
            born,
            successes,
            known_slow,
        }) = taken
        else {
            if empty && closed {
                // Nothing left and nothing more to come.
                shared.work.notify_waiters();
                shared.timers_changed.notify_one();
                guard.clean = true;
                return;
            }
            // Registered before looking once more, so that no wake-up is missed.
            let work = shared.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            let idle = {
                let state = shared.lock();
                (state.ready.is_empty() || state.endpoint.holds_back(Instant::now()))
                    && !(state.closed && state.jobs.is_empty())
            };
            if idle && !shared.aborting() {
                tokio::select! {
                    _ = work => {}
                    _ = aborted.as_mut() => {}
                }
            }
            continue;
        };
        let started = std::time::Instant::now();
        let slow_after = shared.pace.slow_after();
        let mut counted_slow = known_slow && shared.pace.enabled();
        if counted_slow {
            shared.went_slow();
        }
        let send = setup.ctx.service.send(&webhook).instrument(span);
        tokio::pin!(send);
        let slow_timer = tokio::time::sleep(slow_after);
        tokio::pin!(slow_timer);
        let result = loop {
            tokio::select! {
                biased;
                r = &mut send => break r,
                _ = aborted.as_mut() => {
                    shared.lock().cut(setup, seq);
                    guard.clean = true;
                    return;
                }
                _ = &mut slow_timer, if !counted_slow && shared.pace.enabled() => {
                    counted_slow = true;
                    shared.went_slow();
                }
            }
        };
        let took = started.elapsed();
        if counted_slow {
            shared.pace.slow.fetch_sub(1, Ordering::AcqRel);
        } else {
            shared.pace.answered(took);
        }
        crate::telemetry::attempt(
            setup.ctx.counters.mode(),
            webhook.event(),
            took,
            result.is_ok(),
        );
        if result.is_ok() {
            // Before the event completes: whoever sees it complete sees it counted.
            setup.ctx.counters.sent(webhook.event(), born);
        }
        last = Some(Attempted {
            seq,
            successes,
            result,
            slow: took >= slow_after,
        });
    }
}

/// Moves events whose retry time came back to the ready set.
async fn timers(shared: Arc<Shared>) {
    loop {
        let changed = shared.timers_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if shared.aborting() {
            return;
        }
        let (woken, next, done) = {
            let mut state = shared.lock();
            let now = Instant::now();
            let (mut woken, mut next) = state.fire_timers(now);
            if state.endpoint.down.is_some() {
                woken += state.expire(&shared.setup, SystemTime::now());
                if !state.ready.is_empty() && state.endpoint.probing.is_none() {
                    match state.endpoint.probe_at {
                        Some(at) if at > now => {
                            next = Some(next.map_or(at, |n: Instant| n.min(at)));
                        }
                        // One sender takes the probe.
                        _ => woken += 1,
                    }
                }
            }
            (woken, next, state.closed && state.jobs.is_empty())
        };
        if done {
            return;
        }
        for _ in 0..woken {
            shared.work.notify_one();
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}
