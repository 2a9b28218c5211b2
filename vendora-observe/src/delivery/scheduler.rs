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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::trace::TraceParent;

use super::{
    ChainKey, Context, DeadLetter, Decision, DeliveryError, EventKind, Job, Leftovers, decide,
};

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

    fn covers(&self, attempt: Duration) -> bool {
        self.valid_until_ms.load(Ordering::Acquire) > now_ms() + attempt.as_millis() as i64
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
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
    pub(crate) lease: Option<Arc<Lease>>,
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
    abort: AtomicBool,
    aborted: Notify,
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
            abort: AtomicBool::new(false),
            aborted: Notify::new(),
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
        self.shared.abort.store(true, Ordering::Release);
        self.shared.aborted.notify_waiters();
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
struct Locked<'a>(Option<MutexGuard<'a, State>>);

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
        drop(state);
        for work in later {
            work();
        }
    }
}

impl Shared {
    fn lock(&self) -> Locked<'_> {
        Locked(Some(self.state.lock().unwrap_or_else(|p| p.into_inner())))
    }

    fn aborting(&self) -> bool {
        self.abort.load(Ordering::Acquire)
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

/// The senders: `concurrency` of them, and one more for each request counted slow, up to
/// the slow slots. A request is slow once it has taken 8 times the usual answer time
/// (25 ms to 1 s), or from the start when the last request of its row was slow; the
/// sender that waits on it no longer counts, and a stand-in takes the ready events
/// meanwhile. When fewer are wanted, a sender leaves instead of taking its next event.
struct Pace {
    concurrency: usize,
    slots: usize,
    /// Sender tasks running.
    senders: AtomicUsize,
    /// Requests in flight counted slow.
    slow: AtomicUsize,
    /// A moving average (1/16 weight) of how long requests that were not slow took, in µs.
    usual_us: AtomicU64,
}

impl Pace {
    const FLOOR: Duration = Duration::from_millis(25);
    const CEILING: Duration = Duration::from_secs(1);

    fn new(concurrency: usize, slots: usize) -> Pace {
        Pace {
            concurrency,
            slots,
            senders: AtomicUsize::new(concurrency),
            slow: AtomicUsize::new(0),
            usual_us: AtomicU64::new(10_000),
        }
    }

    fn enabled(&self) -> bool {
        self.slots > 0
    }

    /// How long a request may take before it counts as slow.
    fn slow_after(&self) -> Duration {
        Duration::from_micros(8 * self.usual_us.load(Ordering::Relaxed))
            .clamp(Self::FLOOR, Self::CEILING)
    }

    /// A request that did not count as slow took `took`.
    fn answered(&self, took: Duration) {
        let took = took.as_micros().min(u128::from(u32::MAX)) as u64;
        let _ = self
            .usual_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |usual| {
                Some(usual - usual / 16 + took / 16)
            });
    }

    fn wanted(&self) -> usize {
        self.concurrency + self.slow.load(Ordering::Acquire).min(self.slots)
    }

    /// One more sender, if fewer run than are wanted.
    fn take_sender_slot(&self) -> bool {
        self.senders
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.wanted()).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether this sender should leave: more run than are wanted.
    fn leave(&self) -> bool {
        self.senders
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > self.wanted()).then_some(n - 1)
            })
            .is_ok()
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
    let aborted = shared.aborted.notified();
    tokio::pin!(aborted);
    aborted.as_mut().enable();
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Behind another event of one of its chains.
    Waiting,
    /// In the ready set.
    Ready,
    InFlight,
    /// Waiting on its retry timer.
    Retrying,
}

struct Entry {
    job: Job,
    step: Step,
}

impl Entry {
    fn chains(&self) -> impl Iterator<Item = ChainKey> + use<> {
        std::iter::once(self.job.row).chain(self.job.unit)
    }
}

#[derive(Default)]
struct Chain {
    queue: VecDeque<u64>,
    /// Row chains: the newest `updated` or `deleted` event and the newest `deleted`, by
    /// sequence number, so that latest-wins coalescing needs no walk of the queue.
    newest_update_or_delete: u64,
    newest_delete: u64,
    /// Row chains: the newest event of each watch event name.
    newest_watch: Vec<(Box<str>, u64)>,
}

/// An event a sender took.
struct Taken {
    seq: u64,
    webhook: Arc<super::Webhook>,
    span: tracing::Span,
    born: SystemTime,
    /// How many events had succeeded when it was taken: if none has since when it fails,
    /// the receiver is down, not this event at fault.
    successes: u64,
    /// The last request of its row was slow: this one counts as slow from the start.
    known_slow: bool,
}

/// An attempt a sender made, recorded when it next takes the lock.
struct Attempted {
    seq: u64,
    successes: u64,
    result: Result<super::Delivered, DeliveryError>,
    /// It took long enough to count as slow.
    slow: bool,
}

/// What finishing an attempt led to.
enum Finished {
    /// The event completed; this many events became ready.
    Woke(usize),
    /// The event waits on a retry timer.
    Retrying,
}

/// Hashes the scheduler's keys, which are sequence numbers and chain keys (themselves
/// hashes): one multiplication, where SipHash's resistance to chosen keys buys nothing.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: distinct keys stay distinct, and their high bits (where the
        // map looks first) vary.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Keyed<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// The receiver, as the attempts found it. While it is down, sending holds back but for
/// one probe at a time, every `probe_interval` at most: an outage costs one request per
/// interval, not one per waiting event, and no event an attempt.
#[derive(Default)]
struct Endpoint {
    /// Since when it is down.
    down: Option<Instant>,
    /// When the next probe may go.
    probe_at: Option<Instant>,
    /// The probe in flight.
    probing: Option<u64>,
    /// The wait before the next probe, doubling up to the policy's `probe_interval`.
    backoff: Duration,
}

impl Endpoint {
    /// Whether sending is held back now (down, and no probe due).
    fn holds_back(&self, now: Instant) -> bool {
        self.down.is_some() && (self.probing.is_some() || self.probe_at.is_some_and(|at| at > now))
    }
}

#[derive(Default)]
struct State {
    jobs: Keyed<u64, Entry>,
    chains: Keyed<ChainKey, Chain>,
    ready: VecDeque<u64>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    next_seq: u64,
    /// Whether the receiver is down (and when to probe it again).
    endpoint: Endpoint,
    /// Events delivered so far: an attempt that fails with none delivered since it began
    /// found the receiver down.
    successes: u64,
    closed: bool,
    /// Requests cut in flight at the shutdown deadline.
    cut: u64,
    /// Rows let go for want of a lease, not yet taken by the relay to hand back.
    let_go: Vec<i64>,
    /// How many times events were let go.
    let_go_count: u64,
    /// Events by sequence number with their birth, trimmed from the front as they
    /// complete: the oldest event held, in O(1).
    by_age: VecDeque<(u64, SystemTime)>,
    /// The outbox's recorder (see [`Setup::reports`]).
    reports: Option<mpsc::UnboundedSender<(i64, Report)>>,
    /// Completed events, dropped by a sender after it let go of the lock: freeing their
    /// bodies and spans need not hold up the other senders.
    graveyard: Vec<Entry>,
    /// Rows whose last request was slow (see [`Pace`]); emptied past 4,096.
    slow_rows: Keyed<ChainKey, ()>,
    /// Log lines and callbacks to run once the lock is released (see [`Locked`]).
    later: Vec<Later>,
}

impl State {
    /// Adds events in order; returns how many became ready.
    fn add(&mut self, jobs: Vec<Job>) -> usize {
        let mut woken = 0;
        for mut job in jobs {
            self.next_seq += 1;
            let seq = self.next_seq;
            // The delivery's span, a child of the write's: its attempts and log lines are
            // found under the request that made the write.
            // Without an OpenTelemetry context of its own (an outbox row, read back with no
            // write span; a write outside any traced span), the delivery continues the
            // event's trace, the one its `traceparent` carries.
            let orphan = TraceParent::of_span(&job.span).is_none();
            job.span = tracing::info_span!(
                parent: &job.span,
                "webhook.deliver",
                event = job.webhook.event(),
                id = job.webhook.id(),
                trace_id = %job.webhook.trace().trace_id(),
                queued_ms = tracing::field::Empty,
            );
            if orphan {
                job.webhook.trace().adopt(&job.span);
            }
            let entry = Entry {
                job,
                step: Step::Waiting,
            };
            for key in entry.chains() {
                self.chains.entry(key).or_default().queue.push_back(seq);
            }
            let chain = self.chains.get_mut(&entry.job.row).expect("just added");
            match entry.job.kind {
                EventKind::Updated => chain.newest_update_or_delete = seq,
                EventKind::Deleted => {
                    chain.newest_update_or_delete = seq;
                    chain.newest_delete = seq;
                }
                EventKind::Watch => {
                    let name = entry.job.webhook.event();
                    match chain.newest_watch.iter_mut().find(|(n, _)| &**n == name) {
                        Some(slot) => slot.1 = seq,
                        None => chain.newest_watch.push((name.into(), seq)),
                    }
                }
                EventKind::Created => {}
            }
            self.by_age.push_back((seq, entry.job.born));
            self.jobs.insert(seq, entry);
            woken += usize::from(self.wake(seq));
        }
        woken
    }

    /// Remembers whether the row of `seq`, whose attempt ended, answers slowly.
    fn note_pace(&mut self, seq: u64, slow: bool) {
        let Some(entry) = self.jobs.get(&seq) else {
            return;
        };
        if !slow {
            self.slow_rows.remove(&entry.job.row);
            return;
        }
        if self.slow_rows.len() >= 4_096 {
            self.slow_rows.clear();
        }
        self.slow_rows.insert(entry.job.row, ());
    }

    /// Drops completed events from the front of `by_age`.
    fn trim_by_age(&mut self) {
        while let Some((seq, _)) = self.by_age.front() {
            if self.jobs.contains_key(seq) {
                return;
            }
            self.by_age.pop_front();
        }
    }

    /// Moves `seq` to the ready set if it is waiting and heads all its chains.
    fn wake(&mut self, seq: u64) -> bool {
        let Some(entry) = self.jobs.get(&seq) else {
            return false;
        };
        if entry.step != Step::Waiting {
            return false;
        }
        let heads = entry
            .chains()
            .all(|k| self.chains.get(&k).and_then(|c| c.queue.front()) == Some(&seq));
        if heads {
            self.jobs.get_mut(&seq).expect("present").step = Step::Ready;
            self.ready.push_back(seq);
        }
        heads
    }

    /// Whether a newer event of the same row makes `seq` stale (latest-wins).
    fn superseded(&self, seq: u64) -> bool {
        let entry = &self.jobs[&seq];
        let Some(chain) = self.chains.get(&entry.job.row) else {
            return false;
        };
        match entry.job.kind {
            EventKind::Updated => chain.newest_update_or_delete > seq,
            EventKind::Watch => {
                chain.newest_delete > seq
                    || chain
                        .newest_watch
                        .iter()
                        .any(|(n, s)| &**n == entry.job.webhook.event() && *s > seq)
            }
            // Apps learn of a row by its `created`, and a `deleted` is the last word.
            EventKind::Created | EventKind::Deleted => false,
        }
    }

    /// The next ready event to send, marked in flight; superseded events met on the way
    /// are completed.
    fn take(&mut self, setup: &Setup, attempt: Duration) -> Option<Taken> {
        if self.endpoint.holds_back(Instant::now()) {
            return None;
        }
        while let Some(seq) = self.ready.pop_front() {
            match self.jobs.get(&seq) {
                Some(e) if e.step == Step::Ready => {}
                _ => continue,
            }
            if self.jobs[&seq].job.coalesce && self.superseded(seq) {
                setup
                    .ctx
                    .counters
                    .superseded(self.jobs[&seq].job.webhook.event());
                self.complete(setup, seq, Report::Superseded);
                continue;
            }
            if let Some(lease) = &setup.lease
                && !lease.covers(attempt)
            {
                // The relay could not renew its lease: another relay may take these rows
                // once it ends, and two relays must never send one row at once.
                self.ready.push_front(seq);
                self.release_all();
                return None;
            }
            if self.endpoint.down.is_some() {
                // The receiver is down: this event is the probe, and the only request.
                self.endpoint.probing = Some(seq);
            }
            let entry = self.jobs.get_mut(&seq).expect("checked");
            entry.step = Step::InFlight;
            if entry.job.attempts == 0 && !entry.job.span.is_disabled() {
                let queued = SystemTime::now()
                    .duration_since(entry.job.born)
                    .unwrap_or_default();
                entry
                    .job
                    .span
                    .record("queued_ms", queued.as_millis() as u64);
            }
            let known_slow = self.slow_rows.contains_key(&entry.job.row);
            return Some(Taken {
                seq,
                webhook: entry.job.webhook.clone(),
                span: entry.job.span.clone(),
                born: entry.job.born,
                successes: self.successes,
                known_slow,
            });
        }
        None
    }

    /// Records an attempt's outcome. `successes`: the count of delivered events when the
    /// attempt began.
    fn finish(
        &mut self,
        setup: &Setup,
        seq: u64,
        successes: u64,
        result: Result<super::Delivered, DeliveryError>,
    ) -> Finished {
        let ctx = &setup.ctx;
        if self.endpoint.probing == Some(seq) {
            self.endpoint.probing = None;
        }
        let error = match result {
            // Counted as sent by the sender, before it took the lock.
            Ok(_) => {
                self.successes += 1;
                let mut woken = self.complete(setup, seq, Report::Delivered);
                if let Some(since) = self.endpoint.down.take() {
                    // Everything held back goes now, in order.
                    woken += self.ready.len();
                    self.endpoint.probe_at = None;
                    let message = format!(
                        "webhook receiver {} reachable again after {:.1} s; the {} event(s) \
                         waiting go out now",
                        ctx.service.endpoint_for_logs(),
                        since.elapsed().as_secs_f64(),
                        self.jobs.len()
                    );
                    self.later.push(Box::new(move || {
                        crate::diagnostics::info(format_args!("{message}"));
                    }));
                }
                return Finished::Woke(woken);
            }
            Err(e) => e,
        };
        let error = Arc::new(error);
        let entry = self.jobs.get_mut(&seq).expect("in flight");
        ctx.counters.failed(entry.job.webhook.event());
        if error.is_retryable() && self.successes == successes {
            return self.endpoint_failed(setup, seq, error);
        }
        entry.job.attempts += 1;
        let attempts = entry.job.attempts;
        let span = entry.job.span.clone();
        let _span = span.enter();
        let webhook = &entry.job.webhook;
        let decision = decide(&ctx.policy, attempts, &error);
        if matches!(decision, Decision::Retry(_)) {
            // This event fails while others get through: its own failure, told once per
            // event (a last attempt gets the dead-letter line alone, which names the
            // error).
            if attempts == 1 {
                let (service, webhook, error) =
                    (ctx.service.clone(), webhook.clone(), error.clone());
                let span = span.clone();
                self.later.push(Box::new(move || {
                    let _span = span.enter();
                    service.log_failure(webhook.event(), Some(webhook.id()), &error);
                }));
            }
        } else {
            tracing::debug!(
                event = webhook.event(),
                id = webhook.id(),
                attempts,
                "webhook attempt failed: {error}"
            );
        }
        let described = format!("{}: {error}", error.kind());
        match decision {
            Decision::Retry(delay) => {
                ctx.counters.retried(webhook.event());
                entry.step = Step::Retrying;
                self.timers.push(Reverse((Instant::now() + delay, seq)));
                self.report(
                    seq,
                    Report::Failed {
                        attempts,
                        delay,
                        error: described,
                    },
                );
                Finished::Retrying
            }
            Decision::Dead => {
                self.dead_letter(setup, seq, described.clone(), Some(&error));
                Finished::Woke(self.complete(
                    setup,
                    seq,
                    Report::Dead {
                        attempts,
                        error: described,
                    },
                ))
            }
        }
    }

    /// An attempt found the receiver down (nothing got through since it began): the event
    /// goes back to the head of the ready set, its attempts untouched, and sending holds
    /// back until a probe gets through.
    fn endpoint_failed(&mut self, setup: &Setup, seq: u64, error: Arc<DeliveryError>) -> Finished {
        let ctx = &setup.ctx;
        let policy = &ctx.policy;
        let now = Instant::now();
        let waiting = self.jobs.len();
        let entry = self.jobs.get_mut(&seq).expect("in flight");
        ctx.counters.retried(entry.job.webhook.event());
        entry.step = Step::Ready;
        // Behind the other ready events: the next probe is another one when there is one,
        // so that a body the receiver fails on alone does not stand for the receiver.
        self.ready.push_back(seq);
        let first = self.endpoint.down.is_none();
        self.endpoint.backoff = if first {
            policy.base_delay.min(policy.probe_interval)
        } else {
            (self.endpoint.backoff * 2).min(policy.probe_interval)
        };
        let wait = match error.retry_after() {
            Some(after) => after.min(policy.max_retry_after),
            None => self.endpoint.backoff,
        };
        self.endpoint.probe_at = Some(now + wait);
        if first {
            self.endpoint.down = Some(now);
            let (span, service, probe) = (
                entry.job.span.clone(),
                ctx.service.clone(),
                policy.probe_interval,
            );
            self.later.push(Box::new(move || {
                let _span = span.enter();
                service.log_down(&error, waiting, probe);
            }));
        } else {
            tracing::debug!("webhook receiver still down: {error}");
        }
        Finished::Retrying
    }

    /// Dead-letters the events past the policy's maximum age that are not in flight (the
    /// receiver has been down that long): how many events became ready behind them.
    fn expire(&mut self, setup: &Setup, now: SystemTime) -> usize {
        let max_age = setup.ctx.policy.max_age;
        let mut woken = 0;
        self.trim_by_age();
        while let Some(&(seq, born)) = self.by_age.front() {
            if now.duration_since(born).unwrap_or_default() < max_age {
                break;
            }
            match self.jobs.get(&seq) {
                Some(e) if e.step != Step::InFlight => {}
                // In flight: its outcome decides; the next ones wait for it.
                _ => break,
            }
            let attempts = self.jobs[&seq].job.attempts;
            let why = format!(
                "not delivered within its maximum age ({} s): the receiver was down",
                max_age.as_secs()
            );
            self.dead_letter(setup, seq, why.clone(), None);
            self.ready.retain(|s| *s != seq);
            woken += self.complete(
                setup,
                seq,
                Report::Dead {
                    attempts,
                    error: why,
                },
            );
            self.trim_by_age();
        }
        woken
    }

    /// Moves events whose retry time came to the ready set: how many, and the next time.
    fn fire_timers(&mut self, now: Instant) -> (usize, Option<Instant>) {
        let mut woken = 0;
        while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
            if at > now {
                return (woken, Some(at));
            }
            self.timers.pop();
            if let Some(entry) = self.jobs.get_mut(&seq)
                && entry.step == Step::Retrying
            {
                entry.step = Step::Ready;
                self.ready.push_back(seq);
                woken += 1;
            }
        }
        (woken, None)
    }

    fn report(&self, seq: u64, report: Report) {
        if let Some(reports) = &self.reports {
            let _ = reports.send((self.jobs[&seq].job.token, report));
        }
    }

    /// Gives up on `seq`: counted, told in one line (with the error that ended it, if one
    /// did), handed to the dead-letter handler.
    fn dead_letter(
        &mut self,
        setup: &Setup,
        seq: u64,
        last_error: String,
        cause: Option<&DeliveryError>,
    ) {
        let ctx = &setup.ctx;
        let job = &self.jobs[&seq].job;
        ctx.counters.dead(job.webhook.event());
        let hint = if setup.dead_letter_leftovers {
            ""
        } else {
            " (kept in the outbox: requeue it with Outbox::requeue or `vendora-observe outbox retry`)"
        };
        let (event, id, attempts) = (job.webhook.event(), job.webhook.id(), job.attempts);
        let url = ctx.service.endpoint_for_logs().to_string();
        let why: &dyn std::fmt::Display = match cause {
            Some(error) => error,
            None => &last_error,
        };
        let after = match attempts {
            0 => String::new(),
            n => format!(" after {n} attempt(s)"),
        };
        let message = format!(
            "webhook {event} (X-Webhook-Id {id}) to {url} dead-lettered{after}{hint}: {why}"
        );
        let (kind, status) = (
            cause.map(DeliveryError::kind),
            cause.and_then(DeliveryError::status),
        );
        let (span, webhook) = (job.span.clone(), job.webhook.clone());
        let handler = ctx.dead_letter.clone();
        self.later.push(Box::new(move || {
            let _span = span.enter();
            let (event, id) = (webhook.event(), webhook.id());
            tracing::error!(
                target: "vendora_observe",
                event,
                id,
                url = url.as_str(),
                attempts,
                kind,
                status,
                "{message}"
            );
            crate::diagnostics::fallback(
                crate::diagnostics::Kind::Delivery,
                "error",
                format_args!("{message}"),
            );
            if let Some(handler) = handler {
                handler(DeadLetter {
                    webhook: (*webhook).clone(),
                    attempts,
                    last_error,
                    status,
                });
            }
        }));
    }

    /// `seq` is done: it leaves its chains, and what was behind it may become ready.
    /// Returns how many became ready.
    fn complete(&mut self, setup: &Setup, seq: u64, report: Report) -> usize {
        self.report(seq, report);
        self.remove(setup.track_pending.then_some(&setup.ctx), seq)
    }

    /// Removes `seq` from its chains; returns how many events behind it became ready.
    fn remove(&mut self, pending: Option<&Context>, seq: u64) -> usize {
        let Some(entry) = self.jobs.remove(&seq) else {
            return 0;
        };
        let mut next = [None, None];
        for (slot, key) in next.iter_mut().zip(entry.chains()) {
            if let Some(chain) = self.chains.get_mut(&key) {
                if chain.queue.front() == Some(&seq) {
                    chain.queue.pop_front();
                } else {
                    // Released out of order (lease lost): it is somewhere in the queue.
                    chain.queue.retain(|s| *s != seq);
                }
                match chain.queue.front() {
                    Some(front) => *slot = Some(*front),
                    None => {
                        self.chains.remove(&key);
                    }
                }
            }
        }
        self.graveyard.push(entry);
        if let Some(ctx) = pending {
            ctx.counters.release(1);
        }
        self.trim_by_age();
        next.into_iter()
            .flatten()
            .map(|seq| usize::from(self.wake(seq)))
            .sum()
    }

    /// Lets go of every event that is not in flight (outbox mode: nothing counts pending
    /// events), newest first so that none of them becomes ready meanwhile.
    fn release_all(&mut self) {
        let mut unsent: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.step != Step::InFlight)
            .map(|(s, _)| *s)
            .collect();
        unsent.sort_unstable_by(|a, b| b.cmp(a));
        for seq in unsent {
            self.let_go.push(self.jobs[&seq].job.token);
            self.remove(None, seq);
        }
        self.let_go_count += 1;
        self.ready.clear();
        self.timers.clear();
    }

    /// A request cut in flight at the shutdown deadline.
    fn cut(&mut self, setup: &Setup, seq: u64) {
        self.cut += 1;
        if let Some(entry) = self.jobs.get(&seq) {
            let message = format!(
                "webhook {} (X-Webhook-Id {}): outcome unknown, its request was cut at the \
                 shutdown deadline; the receiver may have processed it (a resend carries the \
                 same X-Webhook-Id)",
                entry.job.webhook.event(),
                entry.job.webhook.id()
            );
            self.later.push(Box::new(move || {
                crate::diagnostics::warn(
                    crate::diagnostics::Kind::Delivery,
                    format_args!("{message}"),
                );
            }));
        }
        self.forget(setup, seq, Report::Unknown);
    }

    /// Removes an event without waking what follows it (everything is being torn down).
    fn forget(&mut self, setup: &Setup, seq: u64, report: Report) {
        if self.jobs.contains_key(&seq) {
            self.report(seq, report);
            self.jobs.remove(&seq);
            if setup.track_pending {
                setup.ctx.counters.release(1);
            }
            self.trim_by_age();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the property test does to the scheduler's state, as a sender would.
    #[derive(Debug, Clone)]
    enum Op {
        /// An event of row `.0` written by unit of work `.1`.
        Add(u8, u8),
        /// A sender takes the next ready event.
        Take,
        /// One of the events in flight (by position) is answered: 2xx, or a 400 (dead).
        Finish(usize, bool),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            (0u8..4, 0u8..3).prop_map(|(r, u)| Op::Add(r, u)),
            Just(Op::Take),
            (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
        ];
        prop::collection::vec(op, 1..120)
    }

    fn setup() -> Setup {
        let config = crate::WebhookConfig::builder()
            .url("http://127.0.0.1:9/webhook")
            .secret("s")
            .build()
            .unwrap();
        Setup {
            ctx: Arc::new(Context {
                service: crate::WebhookService::new(config).unwrap(),
                policy: crate::RetryPolicy::default(),
                counters: Arc::new(super::super::Counters::new(crate::telemetry::Mode::Direct)),
                dead_letter: None,
                concurrency: 8,
                slow_slots: 0,
            }),
            reports: None,
            track_pending: false,
            lease: None,
            dead_letter_leftovers: true,
        }
    }

    fn job(row: u8, unit: u8) -> Job {
        Job {
            webhook: Arc::new(
                crate::Webhook::build("product:created", &serde_json::json!({"id": row})).unwrap(),
            ),
            row: ChainKey(u64::from(row) + 1),
            unit: Some(ChainKey(1_000 + u64::from(unit))),
            kind: EventKind::Created,
            coalesce: false,
            attempts: 0,
            token: 0,
            born: SystemTime::now(),
            span: tracing::Span::none(),
        }
    }

    proptest! {
        /// Against a model of causal order: an event is handed to a sender only once every
        /// earlier event of its row and of its unit of work is complete (delivered or
        /// dead), never twice, and every event is handed out once the others complete.
        #[test]
        fn events_go_out_in_causal_order_once_each(ops in ops()) {
            let setup = setup();
            let mut state = State::default();
            // (seq, row, unit) in the order added, and what became of them.
            let mut added: Vec<(u64, u8, u8)> = Vec::new();
            let mut complete = std::collections::HashSet::new();
            let mut taken = std::collections::HashSet::new();
            let mut in_flight: Vec<(u64, u64)> = Vec::new();
            let check = |seq: u64, added: &[(u64, u8, u8)], complete: &std::collections::HashSet<u64>| {
                let &(_, row, unit) = added.iter().find(|a| a.0 == seq).expect("added");
                for &(earlier, r, u) in added.iter().take_while(|a| a.0 < seq) {
                    prop_assert!(
                        !(r == row || u == unit) || complete.contains(&earlier),
                        "event {seq} went out before {earlier} of its chains completed"
                    );
                }
                Ok(())
            };
            let take = |state: &mut State, added: &[(u64, u8, u8)], complete: &std::collections::HashSet<u64>, taken: &mut std::collections::HashSet<u64>, in_flight: &mut Vec<(u64, u64)>| {
                match state.take(&setup, Duration::from_secs(5)) {
                    Some(t) => {
                        check(t.seq, added, complete)?;
                        prop_assert!(taken.insert(t.seq), "event {} handed out twice", t.seq);
                        in_flight.push((t.seq, t.successes));
                        Ok(true)
                    }
                    None => Ok(false),
                }
            };
            let finish = |state: &mut State, (seq, successes): (u64, u64), ok: bool, complete: &mut std::collections::HashSet<u64>| {
                let result = if ok {
                    Ok(super::super::Delivered { status: 200, elapsed: Duration::ZERO })
                } else {
                    Err(DeliveryError::Status { status: 400, retry_after: None })
                };
                state.finish(&setup, seq, successes, result);
                complete.insert(seq);
            };
            for op in ops {
                match op {
                    Op::Add(row, unit) => {
                        state.add(vec![job(row, unit)]);
                        added.push((state.next_seq, row, unit));
                    }
                    Op::Take => {
                        take(&mut state, &added, &complete, &mut taken, &mut in_flight)?;
                    }
                    Op::Finish(i, ok) if !in_flight.is_empty() => {
                        let at = i % in_flight.len();
                        let done = in_flight.remove(at);
                        finish(&mut state, done, ok, &mut complete);
                    }
                    Op::Finish(..) => {}
                }
            }
            // Everything left goes out once what is before it completes.
            loop {
                while take(&mut state, &added, &complete, &mut taken, &mut in_flight)? {}
                if in_flight.is_empty() {
                    break;
                }
                for done in std::mem::take(&mut in_flight) {
                    finish(&mut state, done, true, &mut complete);
                }
            }
            prop_assert_eq!(taken.len(), added.len(), "events never handed out");
            prop_assert!(state.jobs.is_empty());
        }
    }

    #[test]
    fn senders_follow_the_slow_requests_up_to_the_slots() {
        let pace = Pace::new(8, 2);
        // Eight run, eight wanted.
        assert!(!pace.take_sender_slot());
        assert!(!pace.leave());
        pace.slow.fetch_add(1, Ordering::AcqRel);
        assert!(pace.take_sender_slot());
        assert!(!pace.take_sender_slot());
        // Three slow requests, two slots: ten senders at most.
        pace.slow.fetch_add(2, Ordering::AcqRel);
        assert!(pace.take_sender_slot());
        assert!(!pace.take_sender_slot());
        assert_eq!(pace.senders.load(Ordering::Acquire), 10);
        // Answered: the stand-ins leave, the eight stay.
        pace.slow.fetch_sub(3, Ordering::AcqRel);
        assert!(pace.leave());
        assert!(pace.leave());
        assert!(!pace.leave());
        assert_eq!(pace.senders.load(Ordering::Acquire), 8);
    }

    #[test]
    fn slow_is_eight_times_the_usual_answer_within_bounds() {
        let pace = Pace::new(8, 128);
        assert_eq!(pace.slow_after(), Duration::from_millis(80));
        for _ in 0..200 {
            pace.answered(Duration::from_millis(5));
        }
        let after = pace.slow_after();
        assert!(
            (Duration::from_millis(39)..=Duration::from_millis(41)).contains(&after),
            "{after:?}"
        );
        for _ in 0..200 {
            pace.answered(Duration::from_micros(300));
        }
        assert_eq!(pace.slow_after(), Pace::FLOOR);
        for _ in 0..200 {
            pace.answered(Duration::from_millis(400));
        }
        assert_eq!(pace.slow_after(), Pace::CEILING);
    }
}
