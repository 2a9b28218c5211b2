//! Direct mode: the in-memory source. The hooks hand each write's events to the scheduler
//! through a bounded count of pending events; nothing touches the network on the way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::scheduler::{Scheduler, Setup};
use super::{Context, Counters, Job, Leftovers, Overflow};
use crate::diagnostics::Kind;

pub(crate) struct DirectQueue {
    scheduler: Scheduler,
    capacity: usize,
    overflow: Overflow,
    closed: AtomicBool,
    counters: Arc<Counters>,
    shed: Arc<ShedLog>,
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Full,
    Closed,
}

impl Refused {
    fn why(self) -> &'static str {
        match self {
            Refused::Full => {
                "the queue is full (raise ObserverBuilder::queue_capacity, use Overflow::Wait, \
                 or outbox mode, which keeps every event)"
            }
            Refused::Closed => "the observer is shut down (Observer::shutdown was called)",
        }
    }
}

impl DirectQueue {
    pub(crate) fn start(ctx: Arc<Context>, capacity: usize, overflow: Overflow) -> DirectQueue {
        let counters = ctx.counters.clone();
        let scheduler = Scheduler::start(Setup {
            ctx,
            reports: None,
            track_pending: true,
            lease: None,
            dead_letter_leftovers: true,
        });
        DirectQueue {
            scheduler,
            capacity: capacity.max(1),
            overflow,
            closed: AtomicBool::new(false),
            counters,
            shed: Arc::new(ShedLog::default()),
        }
    }

    /// Queues the events of one write, all or none, without waiting on the network. With
    /// [`Overflow::Wait`] it may wait for room in the queue. Refused events are counted and
    /// logged here.
    pub(crate) async fn enqueue(&self, jobs: Vec<Job>) {
        let n = jobs.len() as u64;
        if let Err(refused) = self.reserve(n).await {
            self.counters.shed(&jobs);
            self.shed.record(n, jobs[0].webhook.event(), refused.why());
            return;
        }
        if let Err(jobs) = self.scheduler.submit(jobs) {
            self.counters.release(n);
            self.counters.shed(&jobs);
            self.shed
                .record(n, jobs[0].webhook.event(), Refused::Closed.why());
        }
    }

    async fn reserve(&self, n: u64) -> Result<(), Refused> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Refused::Closed);
            }
            if self.counters.try_reserve(n, self.capacity) {
                return Ok(());
            }
            if self.overflow == Overflow::Shed {
                return Err(Refused::Full);
            }
            // Registered, then counted, then a last look (see `Counters::release`).
            let room = self.counters.space.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let _waiting = self.counters.waiting_for_space();
            if self.counters.try_reserve(n, self.capacity) {
                return Ok(());
            }
            if !self.closed.load(Ordering::Acquire) {
                room.await;
            }
        }
    }

    /// When the oldest event not yet delivered was made.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn oldest(&self) -> Option<std::time::SystemTime> {
        self.scheduler.oldest()
    }

    /// Stops taking events and delivers until `deadline`; what is still in flight then is
    /// cut (outcome unknown) and what never left is dead-lettered.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> Leftovers {
        self.closed.store(true, Ordering::Release);
        self.counters.space.notify_waiters();
        self.scheduler.shutdown(deadline).await
    }
}

/// Sums shed events and logs each burst once, within a second, with its count: a burst of
/// thousands makes one line, not thousands, and none goes unreported.
#[derive(Default)]
struct ShedLog {
    count: AtomicU64,
    scheduled: AtomicBool,
    first: std::sync::Mutex<Option<(String, &'static str)>>,
}

/// How long shed events are summed before they are logged.
const SHED_WINDOW: Duration = Duration::from_millis(500);

impl ShedLog {
    fn record(self: &Arc<Self>, n: u64, event: &str, why: &'static str) {
        self.count.fetch_add(n, Ordering::AcqRel);
        {
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| (event.to_owned(), why));
        }
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let log = self.clone();
        let report = async move {
            tokio::time::sleep(SHED_WINDOW).await;
            // Clear the flag first: a shed racing with this report schedules the next one.
            log.scheduled.store(false, Ordering::Release);
            let n = log.count.swap(0, Ordering::AcqRel);
            let first = log.first.lock().unwrap_or_else(|p| p.into_inner()).take();
            if n > 0 {
                let (event, why) = first.unwrap_or_else(|| ("-".into(), ""));
                crate::diagnostics::error(
                    Kind::Shed,
                    format_args!(
                        "{n} webhook(s) shed in the last {} ms (first: {event}): {why}",
                        SHED_WINDOW.as_millis()
                    ),
                );
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(report);
            }
            Err(_) => {
                self.scheduled.store(false, Ordering::Release);
                let n = self.count.swap(0, Ordering::AcqRel);
                crate::diagnostics::error(Kind::Shed, format_args!("{n} webhook(s) shed: {why}"));
            }
        }
    }
}
