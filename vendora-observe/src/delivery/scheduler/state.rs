//! The scheduler's state: chains, the ready set, retry timers and the receiver's health,
//! with no I/O and no tasks. The senders and the timers task ([`super`]) take its lock,
//! call a step (add, take, finish, release, let go) and act on what it returns; log
//! lines and callbacks a step produces wait in [`State::later`] until the lock is released.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Later, Report, Setup};
use crate::delivery::{ChainKey, DeadLetter, Decision, DeliveryError, EventKind, Job, decide};
use crate::error::ErrorChain;
use crate::trace::TraceParent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Behind another event of one of its chains.
    Waiting,
    /// In the ready set.
    Ready,
    InFlight,
    /// Waiting on its retry timer.
    Retrying,
}

pub(super) struct Entry {
    pub(super) job: Job,
    pub(super) step: Step,
}

impl Entry {
    fn chains(&self) -> impl Iterator<Item = ChainKey> + use<> {
        std::iter::once(self.job.row).chain(self.job.unit)
    }
}

#[derive(Default)]
pub(super) struct Chain {
    pub(super) queue: VecDeque<u64>,
    /// Row chains: the newest `updated` or `deleted` event and the newest `deleted`, by
    /// sequence number, so that latest-wins coalescing needs no walk of the queue.
    pub(super) newest_update_or_delete: u64,
    pub(super) newest_delete: u64,
    /// Row chains: the newest event of each watch event name.
    pub(super) newest_watch: Vec<(Box<str>, u64)>,
}

/// An event a sender took.
pub(super) struct Taken {
    pub(super) seq: u64,
    pub(super) webhook: Arc<crate::delivery::Webhook>,
    pub(super) span: tracing::Span,
    pub(super) born: SystemTime,
    /// How many events had succeeded when it was taken: if none has since when it fails,
    /// the receiver is down, not this event at fault.
    pub(super) successes: u64,
    /// The last request of its row was slow: this one counts as slow from the start.
    pub(super) known_slow: bool,
}

/// An attempt a sender made, recorded when it next takes the lock.
pub(super) struct Attempted {
    pub(super) seq: u64,
    pub(super) successes: u64,
    pub(super) result: Result<crate::delivery::Delivered, DeliveryError>,
    /// It took long enough to count as slow.
    pub(super) slow: bool,
}

/// What finishing an attempt led to.
pub(super) enum Finished {
    /// The event completed; this many events became ready.
    Woke(usize),
    /// The event waits on a retry timer.
    Retrying,
}

/// Hashes the scheduler's keys, which are sequence numbers and chain keys (themselves
/// hashes): one multiplication, where SipHash's resistance to chosen keys buys nothing.
#[derive(Default)]
pub(super) struct KeyHasher(u64);

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

pub(super) type Keyed<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// The receiver, as the attempts found it. While it is down, sending holds back but for
/// one probe at a time, every `probe_interval` at most: an outage costs one request per
/// interval, not one per waiting event, and no event an attempt.
#[derive(Default)]
pub(super) struct Endpoint {
    /// Since when it is down.
    pub(super) down: Option<Instant>,
    /// When the next probe may go.
    pub(super) probe_at: Option<Instant>,
    /// The probe in flight.
    pub(super) probing: Option<u64>,
    /// The wait before the next probe, doubling up to the policy's `probe_interval`.
    pub(super) backoff: Duration,
}

impl Endpoint {
    /// Whether sending is held back now (down, and no probe due).
    pub(super) fn holds_back(&self, now: Instant) -> bool {
        self.down.is_some() && (self.probing.is_some() || self.probe_at.is_some_and(|at| at > now))
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) jobs: Keyed<u64, Entry>,
    pub(super) chains: Keyed<ChainKey, Chain>,
    pub(super) ready: VecDeque<u64>,
    pub(super) timers: BinaryHeap<Reverse<(Instant, u64)>>,
    pub(super) next_seq: u64,
    /// Whether the receiver is down (and when to probe it again).
    pub(super) endpoint: Endpoint,
    /// Events delivered so far: an attempt that fails with none delivered since it began
    /// found the receiver down.
    pub(super) successes: u64,
    pub(super) closed: bool,
    /// Requests cut in flight at the shutdown deadline.
    pub(super) cut: u64,
    /// Rows let go for want of a lease, not yet taken by the relay to hand back.
    pub(super) let_go: Vec<i64>,
    /// How many times events were let go.
    pub(super) let_go_count: u64,
    /// Events by sequence number with their birth, trimmed from the front as they
    /// complete: the oldest event held, in O(1).
    pub(super) by_age: VecDeque<(u64, SystemTime)>,
    /// The outbox's recorder (see [`Setup::reports`]).
    pub(super) reports: Option<mpsc::UnboundedSender<(i64, Report)>>,
    /// Completed events, dropped by a sender after it let go of the lock: freeing their
    /// bodies and spans need not hold up the other senders.
    pub(super) graveyard: Vec<Entry>,
    /// Rows whose last request was slow (see [`Pace`]); emptied past 4,096.
    pub(super) slow_rows: Keyed<ChainKey, ()>,
    /// Log lines and callbacks to run once the lock is released (see `Locked`).
    pub(super) later: Vec<Later>,
    /// Direct mode: events completed under this lock, released from the pending count
    /// once it is let go and [`State::later`] ran, so that whoever waits for the count
    /// (`flush`) finds each dead letter handed to the callback.
    pub(super) released: u64,
}

impl State {
    /// Adds events in order; returns how many became ready.
    pub(super) fn add(&mut self, jobs: Vec<Job>) -> usize {
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
    pub(super) fn note_pace(&mut self, seq: u64, slow: bool) {
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
    pub(super) fn trim_by_age(&mut self) {
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
    pub(super) fn take(&mut self, setup: &Setup, attempt: Duration) -> Option<Taken> {
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
                && !lease.admits(attempt)
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
    pub(super) fn finish(
        &mut self,
        setup: &Setup,
        seq: u64,
        successes: u64,
        result: Result<crate::delivery::Delivered, DeliveryError>,
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
                "webhook attempt failed: {}",
                ErrorChain(&*error)
            );
        }
        let described = format!("{}: {}", error.kind(), ErrorChain(&*error));
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
            tracing::debug!("webhook receiver still down: {}", ErrorChain(&*error));
        }
        Finished::Retrying
    }

    /// Dead-letters the events past the policy's maximum age that are not in flight (the
    /// receiver has been down that long): how many events became ready behind them.
    pub(super) fn expire(&mut self, setup: &Setup, now: SystemTime) -> usize {
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
    pub(super) fn fire_timers(&mut self, now: Instant) -> (usize, Option<Instant>) {
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
    pub(super) fn dead_letter(
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
        let chain;
        let why: &dyn std::fmt::Display = match cause {
            Some(error) => {
                chain = ErrorChain(error);
                &chain
            }
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
        self.remove(setup.track_pending, seq)
    }

    /// Removes `seq` from its chains; returns how many events behind it became ready.
    fn remove(&mut self, track_pending: bool, seq: u64) -> usize {
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
        if track_pending {
            self.released += 1;
        }
        self.trim_by_age();
        next.into_iter()
            .flatten()
            .map(|seq| usize::from(self.wake(seq)))
            .sum()
    }

    /// Lets go of every event that is not in flight (outbox mode: nothing counts pending
    /// events), newest first so that none of them becomes ready meanwhile.
    pub(super) fn release_all(&mut self) {
        let mut unsent: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.step != Step::InFlight)
            .map(|(s, _)| *s)
            .collect();
        unsent.sort_unstable_by(|a, b| b.cmp(a));
        for seq in unsent {
            self.let_go.push(self.jobs[&seq].job.token);
            self.remove(false, seq);
        }
        self.let_go_count += 1;
        self.ready.clear();
        self.timers.clear();
    }

    /// A request cut in flight at the shutdown deadline.
    pub(super) fn cut(&mut self, setup: &Setup, seq: u64) {
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
    pub(super) fn forget(&mut self, setup: &Setup, seq: u64, report: Report) {
        if self.jobs.contains_key(&seq) {
            self.report(seq, report);
            self.jobs.remove(&seq);
            if setup.track_pending {
                self.released += 1;
            }
            self.trim_by_age();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Context;
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
                counters: Arc::new(crate::delivery::Counters::new(
                    crate::telemetry::Mode::Direct,
                )),
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
                    Ok(crate::delivery::Delivered { status: 200, elapsed: Duration::ZERO })
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

    fn ok() -> Result<crate::delivery::Delivered, DeliveryError> {
        Ok(crate::delivery::Delivered {
            status: 200,
            elapsed: Duration::ZERO,
        })
    }

    #[test]
    fn letting_go_hands_back_every_row_not_in_flight_and_keeps_the_one_in_flight() {
        let setup = setup();
        let mut state = State::default();
        let jobs = (0..4u8)
            .map(|i| Job {
                token: 100 + i64::from(i),
                ..job(i % 2, i)
            })
            .collect();
        state.add(jobs);
        let first = state.take(&setup, Duration::from_secs(5)).expect("ready");
        state.release_all();
        let mut let_go = state.let_go.clone();
        let_go.sort_unstable();
        assert_eq!(let_go, [101, 102, 103]);
        assert_eq!(state.let_go_count, 1);
        assert!(state.take(&setup, Duration::from_secs(5)).is_none());
        // The one in flight still completes, and nothing is left.
        state.finish(&setup, first.seq, first.successes, ok());
        assert!(state.jobs.is_empty() && state.chains.is_empty());
    }

    #[test]
    fn a_newer_update_of_its_row_supersedes_a_waiting_update_but_never_a_created() {
        let setup = setup();
        let mut state = State::default();
        let kinds = [EventKind::Created, EventKind::Updated, EventKind::Updated];
        state.add(
            kinds
                .iter()
                .map(|&kind| Job {
                    kind,
                    coalesce: true,
                    unit: None,
                    ..job(1, 0)
                })
                .collect(),
        );
        let created = state.take(&setup, Duration::from_secs(5)).expect("created");
        assert_eq!(created.seq, 1);
        state.finish(&setup, created.seq, created.successes, ok());
        // The first update is superseded on the way: the second one goes.
        let next = state.take(&setup, Duration::from_secs(5)).expect("update");
        assert_eq!(next.seq, 3);
    }

    #[test]
    fn a_receiver_found_down_holds_back_everything_but_one_probe() {
        let setup = setup();
        let mut state = State::default();
        state.add((0..3).map(|row| job(row, row)).collect());
        let first = state.take(&setup, Duration::from_secs(5)).expect("ready");
        let refused = Err(DeliveryError::Status {
            status: 503,
            retry_after: Some(Duration::ZERO),
        });
        assert!(matches!(
            state.finish(&setup, first.seq, first.successes, refused),
            Finished::Retrying
        ));
        assert!(state.endpoint.down.is_some());
        // The probe is due at once (Retry-After: 0); it is the only request.
        let probe = state.take(&setup, Duration::from_secs(5)).expect("probe");
        assert!(state.take(&setup, Duration::from_secs(5)).is_none());
        assert_eq!(state.jobs[&first.seq].job.attempts, 0, "no attempt spent");
        // It gets through: everything held back goes.
        state.finish(&setup, probe.seq, probe.successes, ok());
        assert!(state.endpoint.down.is_none());
        let mut rest = 0;
        while let Some(t) = state.take(&setup, Duration::from_secs(5)) {
            state.finish(&setup, t.seq, t.successes, ok());
            rest += 1;
        }
        assert_eq!(rest, 2);
        assert!(state.jobs.is_empty());
    }
}
