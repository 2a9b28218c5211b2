//! The scheduler both delivery modes run on: chains of events, a ready set, sends in
//! flight, and retries waiting on timers.
//!
//! Each event belongs to one or two chains (its row's and, under causal order, its unit of
//! work's). A chain is a FIFO of the events in it; an event is *ready* when it heads every
//! chain it belongs to. Ready events are sent, up to `concurrency` at once. A failed attempt
//! goes on a timer and stays at the head of its chains, so it holds back exactly the events
//! that must follow it, and nothing else. When an event completes (delivered, dead or
//! superseded) it leaves its chains and the events behind it may become ready.
//!
//! Every step is O(1) in the number of events waiting (hash maps and deques), so a row
//! with a backlog of thousands of events streams at the receiver's pace.
//!
//! Sources: direct mode submits the events of each write; the outbox relay submits the rows
//! it claimed and records what the scheduler [`Report`]s.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::{
    ChainKey, Context, DeadLetter, Decision, Delivered, DeliveryError, EventKind, Job, Leftovers,
    decide,
};

/// What the scheduler is told.
pub(crate) enum Input {
    /// Events in the order their chains must keep (a write's events; a claim's rows).
    Jobs(Vec<Job>),
    /// The outbox could not renew its lease: forget every event not in flight.
    ReleaseAll,
    /// No more input: finish what is there, then stop.
    Close,
}

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
    /// Forgotten unsent (lease lost, or left at the shutdown deadline).
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

type Done =
    Result<(tokio::task::Id, (u64, Result<Delivered, DeliveryError>)), tokio::task::JoinError>;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// How a source wants its events handled.
pub(crate) struct Setup {
    pub(crate) ctx: Arc<Context>,
    /// Where reports go (the outbox's recorder); `None` in direct mode.
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
    input: mpsc::UnboundedSender<Input>,
    abort: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<Leftovers>>>,
}

impl Scheduler {
    pub(crate) fn start(setup: Setup) -> Scheduler {
        let (input, rx) = mpsc::unbounded_channel();
        let (abort, abort_rx) = watch::channel(false);
        let engine = Engine::new(setup);
        let task = tokio::spawn(engine.run(rx, abort_rx));
        Scheduler {
            input,
            abort,
            task: Mutex::new(Some(task)),
        }
    }

    /// Hands events over; `false` once the scheduler has stopped.
    pub(crate) fn submit(&self, jobs: Vec<Job>) -> bool {
        self.input.send(Input::Jobs(jobs)).is_ok()
    }

    pub(crate) fn release_all(&self) {
        let _ = self.input.send(Input::ReleaseAll);
    }

    /// Finishes what was submitted until `deadline`, then cuts what is in flight and
    /// leaves the rest. Returns what was cut and left.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> Leftovers {
        let _ = self.input.send(Input::Close);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut task) = task else {
            return Leftovers::default();
        };
        match tokio::time::timeout(deadline, &mut task).await {
            Ok(result) => result.unwrap_or_default(),
            Err(_) => {
                let _ = self.abort.send(true);
                task.await.unwrap_or_default()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
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
    state: State,
}

impl Entry {
    fn chains(&self) -> impl Iterator<Item = ChainKey> {
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

struct Engine {
    setup: Setup,
    jobs: HashMap<u64, Entry>,
    chains: HashMap<ChainKey, Chain>,
    ready: VecDeque<u64>,
    timers: BinaryHeap<Reverse<(tokio::time::Instant, u64)>>,
    in_flight: JoinSet<(u64, Result<Delivered, DeliveryError>)>,
    flight: HashMap<tokio::task::Id, u64>,
    next_seq: u64,
    /// Attempts are failing and none has succeeded since: log one line per streak.
    failing: bool,
    closed: bool,
}

impl Engine {
    fn new(setup: Setup) -> Engine {
        Engine {
            setup,
            jobs: HashMap::new(),
            chains: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: JoinSet::new(),
            flight: HashMap::new(),
            next_seq: 1,
            failing: false,
            closed: false,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Input>,
        mut abort: watch::Receiver<bool>,
    ) -> Leftovers {
        let mut inputs = Vec::new();
        // Until the handle is dropped; then only the closed input ends the run.
        let mut abort_open = true;
        loop {
            self.dispatch();
            if self.closed && self.jobs.is_empty() {
                return Leftovers::default();
            }
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                biased;
                changed = abort.changed(), if abort_open => {
                    if changed.is_err() {
                        abort_open = false;
                    } else if *abort.borrow_and_update() {
                        return self.abandon().await;
                    }
                }
                Some(done) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => {
                    self.on_done(done);
                }
                n = rx.recv_many(&mut inputs, 256), if !self.closed => {
                    if n == 0 {
                        self.closed = true;
                    }
                    for input in inputs.drain(..) {
                        match input {
                            Input::Jobs(jobs) => self.add(jobs),
                            Input::ReleaseAll => self.release_all(),
                            Input::Close => self.closed = true,
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_timer.unwrap_or_else(tokio::time::Instant::now)), if next_timer.is_some() => {
                    self.fire_timers();
                }
            }
        }
    }

    fn add(&mut self, jobs: Vec<Job>) {
        for job in jobs {
            let seq = self.next_seq;
            self.next_seq += 1;
            let entry = Entry {
                job,
                state: State::Waiting,
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
            self.jobs.insert(seq, entry);
            self.wake(seq);
        }
    }

    /// Moves `seq` to the ready set if it is waiting and heads all its chains.
    fn wake(&mut self, seq: u64) {
        let Some(entry) = self.jobs.get(&seq) else {
            return;
        };
        if entry.state != State::Waiting {
            return;
        }
        let heads = entry
            .chains()
            .all(|k| self.chains.get(&k).and_then(|c| c.queue.front()) == Some(&seq));
        if heads {
            self.jobs.get_mut(&seq).expect("present").state = State::Ready;
            self.ready.push_back(seq);
        }
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

    fn dispatch(&mut self) {
        while self.in_flight.len() < self.setup.ctx.concurrency {
            let Some(seq) = self.ready.pop_front() else {
                break;
            };
            match self.jobs.get(&seq) {
                Some(e) if e.state == State::Ready => {}
                _ => continue,
            }
            if self.jobs[&seq].job.coalesce && self.superseded(seq) {
                self.setup.ctx.counters.superseded();
                self.complete(seq, Report::Superseded);
                continue;
            }
            if let Some(lease) = &self.setup.lease
                && !lease.covers(self.setup.ctx.service.config().timeout())
            {
                // The relay could not renew its lease: another relay may take these rows
                // once it ends, and two relays must never send one row at once.
                self.ready.push_front(seq);
                self.release_all();
                break;
            }
            let entry = self.jobs.get_mut(&seq).expect("checked");
            entry.state = State::InFlight;
            let service = self.setup.ctx.service.clone();
            let webhook = entry.job.webhook.clone();
            let handle = self
                .in_flight
                .spawn(async move { (seq, service.send(&webhook).await) });
            self.flight.insert(handle.id(), seq);
        }
    }

    fn on_done(&mut self, done: Done) {
        let (seq, result) = match done {
            Ok((id, (seq, result))) => {
                self.flight.remove(&id);
                (seq, result)
            }
            Err(e) => {
                // Only a panic in the HTTP stack ends a send this way: count it as a
                // failed attempt, so the event is retried like any other failure.
                let Some(seq) = self.flight.remove(&e.id()) else {
                    return;
                };
                let reason = format!("the send task ended abnormally: {e}");
                (seq, Err(DeliveryError::Transport { reason }))
            }
        };
        let ctx = self.setup.ctx.clone();
        match result {
            Ok(_) => {
                ctx.counters.sent();
                if std::mem::take(&mut self.failing) {
                    tracing::info!(
                        url = ctx.service.endpoint_for_logs(),
                        "webhook receiver reachable again"
                    );
                }
                self.complete(seq, Report::Delivered);
            }
            Err(error) => {
                ctx.counters.failed();
                let entry = self.jobs.get_mut(&seq).expect("in flight");
                entry.job.attempts += 1;
                let attempts = entry.job.attempts;
                let webhook = &entry.job.webhook;
                if !self.failing || !error.is_retryable() {
                    // One line when attempts start failing, not one per attempt; a final
                    // answer (a 401, a 400) always gets its own.
                    ctx.service
                        .log_failure(webhook.event(), Some(webhook.id()), &error);
                    self.failing |= error.is_retryable();
                } else {
                    tracing::debug!(
                        event = webhook.event(),
                        id = webhook.id(),
                        attempts,
                        "webhook attempt failed: {error}"
                    );
                }
                let described = format!("{}: {error}", error.kind());
                match decide(&ctx.policy, attempts, &error) {
                    Decision::Retry(delay) => {
                        ctx.counters.retried();
                        entry.state = State::Retrying;
                        self.timers
                            .push(Reverse((tokio::time::Instant::now() + delay, seq)));
                        self.report(
                            seq,
                            Report::Failed {
                                attempts,
                                delay,
                                error: described,
                            },
                        );
                    }
                    Decision::Dead => {
                        self.dead_letter(seq, described.clone());
                        self.complete(
                            seq,
                            Report::Dead {
                                attempts,
                                error: described,
                            },
                        );
                    }
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(entry) = self.jobs.get_mut(&seq)
                && entry.state == State::Retrying
            {
                entry.state = State::Ready;
                self.ready.push_back(seq);
            }
        }
    }

    fn report(&self, seq: u64, report: Report) {
        if let Some(reports) = &self.setup.reports {
            let _ = reports.send((self.jobs[&seq].job.token, report));
        }
    }

    fn dead_letter(&self, seq: u64, last_error: String) {
        let ctx = &self.setup.ctx;
        let job = &self.jobs[&seq].job;
        ctx.counters.dead();
        let hint = if self.setup.reports.is_some() {
            " (kept in the outbox: requeue it with Outbox::requeue or `vendora-observe outbox retry`)"
        } else {
            ""
        };
        tracing::error!(
            event = job.webhook.event(),
            id = job.webhook.id(),
            attempts = job.attempts,
            url = ctx.service.endpoint_for_logs(),
            "webhook dead-lettered{hint}: {last_error}"
        );
        if let Some(handler) = &ctx.dead_letter {
            handler(DeadLetter {
                webhook: job.webhook.clone(),
                attempts: job.attempts,
                last_error,
            });
        }
    }

    /// `seq` is done: it leaves its chains, and what was behind it may become ready.
    fn complete(&mut self, seq: u64, report: Report) {
        self.report(seq, report);
        let Some(entry) = self.jobs.remove(&seq) else {
            return;
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
        if self.setup.track_pending {
            self.setup.ctx.counters.release(1);
        }
        for seq in next.into_iter().flatten() {
            self.wake(seq);
        }
    }

    /// Forgets every event that is not in flight (reported `Released`).
    fn release_all(&mut self) {
        let mut unsent: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.state != State::InFlight)
            .map(|(s, _)| *s)
            .collect();
        unsent.sort_unstable_by(|a, b| b.cmp(a));
        for seq in unsent {
            self.complete(seq, Report::Released);
        }
        self.ready.clear();
        self.timers.clear();
    }

    /// The shutdown deadline passed: cut what is in flight, leave the rest.
    async fn abandon(mut self) -> Leftovers {
        self.in_flight.abort_all();
        while let Some(done) = self.in_flight.join_next_with_id().await {
            // A send that finished before the abort reached it still counts.
            if let Ok((id, (seq, Ok(_)))) = done {
                self.flight.remove(&id);
                self.setup.ctx.counters.sent();
                self.complete(seq, Report::Delivered);
            }
        }
        let mut out = Leftovers::default();
        let mut cut: Vec<u64> = self.flight.drain().map(|(_, seq)| seq).collect();
        cut.sort_unstable();
        for seq in cut {
            out.unknown += 1;
            let job = &self.jobs[&seq].job;
            tracing::warn!(
                event = job.webhook.event(),
                id = job.webhook.id(),
                "webhook outcome unknown: its request was cut at the shutdown deadline; the \
                 receiver may have processed it (a resend carries the same X-Webhook-Id)"
            );
            self.complete_quietly(seq, Report::Unknown);
        }
        let mut left: Vec<u64> = self.jobs.keys().copied().collect();
        left.sort_unstable();
        for seq in left {
            out.left += 1;
            if self.setup.dead_letter_leftovers {
                self.dead_letter(seq, "shutdown deadline passed before delivery".into());
            }
            self.complete_quietly(seq, Report::Released);
        }
        out
    }

    /// Completes without waking successors (everything is being torn down).
    fn complete_quietly(&mut self, seq: u64, report: Report) {
        self.report(seq, report);
        if self.jobs.remove(&seq).is_some() && self.setup.track_pending {
            self.setup.ctx.counters.release(1);
        }
    }
}
