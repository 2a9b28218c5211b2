//! [`Observer`]: where the hooks of `#[derive(Observed)]` entities send their events.
//!
//! One observer is installed for the process at start-up ([`Observer::install`]); a task
//! can use another for the futures it runs ([`Observer::scope`]), which is how tests
//! running in parallel each talk to their own receiver. Hooks find the observer in that
//! order: the task's, then the installed one. Without either, events are dropped and one
//! warning says how to install one.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbErr};

use crate::config::WebhookConfig;
use crate::delivery::direct::DirectQueue;
use crate::delivery::outbox::{Outbox, OutboxOptions};
use crate::delivery::{
    Context, Counters, DeadLetter, DeadLetterHandler, Job, Order, Overflow, RetryPolicy, Stats,
    WebhookService,
};
use crate::error::StartError;
use crate::telemetry::Mode;

/// What [`Observer::shutdown`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Whether every accepted event was delivered (or dead-lettered after its last
    /// attempt) before the deadline; in outbox mode, whether no row is left pending in
    /// the table.
    pub drained: bool,
    /// Requests still in flight at the deadline, cut: the receiver may or may not have
    /// processed them. In outbox mode they stay pending and are sent again (same
    /// `X-Webhook-Id`) at the next start.
    pub outcome_unknown: u64,
    /// Events never delivered: queued or waiting to retry at the deadline. Direct mode
    /// dead-letters them (logged, counted, handed to the dead-letter handler); outbox mode
    /// leaves them in the table for the next start.
    pub left: u64,
    /// Outbox mode: rows still pending in the table after shutdown (left by this instance,
    /// or written since by others). Zero in direct mode.
    pub pending_in_outbox: u64,
    /// The counters after shutdown.
    pub stats: Stats,
    /// See [`ShutdownReport::undelivered`].
    undelivered: u64,
}

impl ShutdownReport {
    /// Events that did not reach the receiver: dead-lettered (during the run or at the
    /// deadline), cut in flight with their outcome unknown, or left pending in the outbox.
    /// Zero when every event was delivered. (`drained` only says that nothing was left
    /// waiting: a run whose every event was dead-lettered is drained too.)
    ///
    /// ```no_run
    /// # async fn f(observer: vendora_observe::Observer) {
    /// let report = observer.shutdown(std::time::Duration::from_secs(5)).await;
    /// if report.undelivered() > 0 {
    ///     eprintln!("{} webhook(s) not delivered: see the errors above", report.undelivered());
    /// }
    /// # }
    /// ```
    pub fn undelivered(&self) -> u64 {
        self.undelivered
    }
}

pub(crate) enum Sink {
    Direct(DirectQueue),
    Outbox(Outbox),
}

pub(crate) struct ObserverInner {
    pub(crate) service: WebhookService,
    pub(crate) sink: Sink,
    pub(crate) counters: Arc<Counters>,
    pub(crate) order: Order,
}

/// Receives the events of observed entities and delivers them in the background.
///
/// Cheap to clone. Build it once at start-up, inside the Tokio runtime, and install it:
///
/// ```no_run
/// use vendora_observe::Observer;
///
/// # async fn start() -> Result<(), vendora_observe::StartError> {
/// // WEBSOCKET_SERVER_URL, WEBHOOK_SECRET, WEBHOOK_TIMEOUT_MS from the environment or .env
/// let observer = Observer::from_env().await?;
/// observer.install();
/// // … run the application; on the way out:
/// observer.shutdown(std::time::Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Observer {
    pub(crate) inner: Arc<ObserverInner>,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match &self.inner.sink {
            Sink::Direct(_) => "direct",
            Sink::Outbox(_) => "outbox",
        };
        f.debug_struct("Observer")
            .field("mode", &mode)
            .field("order", &self.inner.order)
            .field("service", &self.inner.service)
            .field("stats", &self.stats())
            .finish()
    }
}

static GLOBAL: RwLock<Option<Observer>> = RwLock::new(None);

tokio::task_local! {
    static SCOPED: Observer;
}

impl Observer {
    /// A direct-mode observer configured from the environment and `.env`.
    pub async fn from_env() -> Result<Observer, StartError> {
        Self::builder(WebhookConfig::from_env()?).build().await
    }

    /// Starts building an observer for `config`.
    pub fn builder(config: WebhookConfig) -> ObserverBuilder {
        ObserverBuilder {
            config,
            order: Order::Causal,
            concurrency: 8,
            slow_slots: 128,
            capacity: 10_000,
            overflow: Overflow::Shed,
            retry: RetryPolicy::default(),
            dead_letter: None,
            outbox: None,
        }
    }

    /// Makes this the observer of every task that has no scoped one. Replaces an earlier
    /// one: a direct-mode one delivers what it already accepted; an outbox one's relay
    /// stops claiming rows, delivers what it holds within the request timeout and hands
    /// the rest back to the table, where this observer's relay takes them up (two relays
    /// of one program would otherwise claim side by side).
    pub fn install(&self) {
        let previous = GLOBAL
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(self.clone());
        if let Some(previous) = previous
            && !Arc::ptr_eq(&previous.inner, &self.inner)
            && let Sink::Outbox(outbox) = &previous.inner.sink
        {
            outbox.retire();
        }
    }

    /// Removes the installed observer, returning it.
    pub fn uninstall() -> Option<Observer> {
        GLOBAL.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Runs `f` with this observer for every hook inside it, whatever is installed. Tasks
    /// that `f` spawns do not inherit it: scope them too.
    pub fn scope<F: Future>(&self, f: F) -> impl Future<Output = F::Output> + use<F> {
        SCOPED.scope(self.clone(), f)
    }

    /// The observer hooks in the current task use, if any.
    pub fn current() -> Option<Observer> {
        SCOPED.try_with(Observer::clone).ok().or_else(|| {
            GLOBAL
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .cloned()
        })
    }

    /// Whether [`current`](Self::current) would find one, without cloning it (the hooks
    /// ask on every write).
    pub(crate) fn is_current() -> bool {
        SCOPED.try_with(|_| ()).is_ok()
            || GLOBAL.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The sending service (its configuration, and one-off [`WebhookService::send`]s).
    pub fn service(&self) -> &WebhookService {
        &self.inner.service
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Waits until every accepted event has been delivered or dead-lettered, or `timeout`
    /// passes; returns whether it got there. Keeps accepting events meanwhile.
    #[must_use = "false means events were still pending when the timeout passed"]
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        match &self.inner.sink {
            Sink::Direct(_) => self.inner.counters.wait_idle(deadline).await,
            Sink::Outbox(outbox) => outbox.flush(deadline).await,
        }
    }

    /// Which order events are delivered in.
    pub fn order(&self) -> Order {
        self.inner.order
    }

    /// Stops accepting events and delivers what is queued (in outbox mode: the table's
    /// pending rows) until `deadline`. Requests still in flight then are cut and reported as
    /// of unknown outcome; in direct mode what never left is dead-lettered; in outbox mode
    /// it stays in the table for the next start. Every task the observer started has ended
    /// when it returns: by `deadline`, or in outbox mode at most a second past it while the
    /// relay writes the last outcomes and hands its leases back.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let (leftovers, pending_in_outbox) = match &self.inner.sink {
            Sink::Direct(queue) => (queue.shutdown(deadline).await, 0),
            Sink::Outbox(outbox) => outbox.shutdown(deadline).await,
        };
        let stats = self.stats();
        // Direct mode dead-letters what is left at the deadline (counted among the dead);
        // the outbox keeps it, and the requests cut, pending in its table.
        let undelivered = match &self.inner.sink {
            Sink::Direct(_) => stats.dead + leftovers.unknown,
            Sink::Outbox(_) => stats.dead + pending_in_outbox,
        };
        ShutdownReport {
            drained: leftovers.unknown == 0 && leftovers.left == 0 && pending_in_outbox == 0,
            outcome_unknown: leftovers.unknown,
            left: leftovers.left,
            pending_in_outbox,
            stats,
            undelivered,
        }
    }

    /// Hands the events of one write to the delivery: never waits on the network.
    /// `autocommit`: the entity, when the write runs outside a transaction (its outbox row
    /// then commits on its own, after the change).
    pub(crate) async fn submit<C: ConnectionTrait>(
        &self,
        db: &C,
        autocommit: Option<&'static str>,
        ordering_key: &str,
        unit_key: Option<&str>,
        jobs: Vec<Job>,
    ) -> Result<(), DbErr> {
        match &self.inner.sink {
            Sink::Direct(queue) => {
                self.inner.counters.emitted(&jobs);
                queue.enqueue(jobs).await;
                Ok(())
            }
            Sink::Outbox(outbox) => {
                if let Some(entity) = autocommit {
                    crate::delivery::outbox::warn_autocommit(entity);
                }
                outbox.insert(db, ordering_key, unit_key, &jobs).await?;
                self.inner.counters.emitted(&jobs);
                Ok(())
            }
        }
    }

    /// The outbox, in outbox mode: pending count, dead rows, requeue.
    pub fn outbox(&self) -> Option<&Outbox> {
        match &self.inner.sink {
            Sink::Outbox(o) => Some(o),
            Sink::Direct(_) => None,
        }
    }
}

/// Builds an [`Observer`]; [`build`](Self::build) must run inside a Tokio runtime.
#[must_use]
pub struct ObserverBuilder {
    config: WebhookConfig,
    order: Order,
    concurrency: usize,
    slow_slots: usize,
    capacity: usize,
    overflow: Overflow,
    retry: RetryPolicy,
    dead_letter: Option<DeadLetterHandler>,
    outbox: Option<OutboxOptions>,
}

impl fmt::Debug for ObserverBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserverBuilder")
            .field("config", &self.config)
            .field("order", &self.order)
            .field("concurrency", &self.concurrency)
            .field("slow_request_slots", &self.slow_slots)
            .field("capacity", &self.capacity)
            .field("overflow", &self.overflow)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ObserverBuilder {
    /// Requests in flight at most (default 8), not counting slow ones (see
    /// [`slow_request_slots`](Self::slow_request_slots)). Only events that share no chain
    /// (see [`Order`]) are sent at the same time.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Slow requests that stop counting against [`concurrency`](Self::concurrency), at
    /// most (default 128; 0 makes `concurrency` a strict bound).
    ///
    /// A request is slow once it has taken 8 times the receiver's usual answer time (at
    /// least 25 ms, at most 1 s), and a row whose last request was slow has its next one
    /// counted slow from the start. A slow request keeps its place in its chains, and
    /// another sender takes its slot meanwhile: rows whose webhooks the receiver answers
    /// slowly hold back only their own chains, not unrelated rows. Each slot is one more
    /// connection to the receiver while it is used.
    pub fn slow_request_slots(mut self, slots: usize) -> Self {
        self.slow_slots = slots;
        self
    }

    /// The order apps see events in (default [`Order::Causal`]).
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// Direct mode: events held in memory at most (default 10,000).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Direct mode: what happens when the queue is full (default [`Overflow::Shed`]).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// The retry schedule (default [`RetryPolicy::default`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Called with each event given up on after its last attempt (direct mode; the outbox
    /// keeps such rows in its table instead, and calls it too).
    pub fn on_dead_letter(mut self, handler: impl Fn(DeadLetter) + Send + Sync + 'static) -> Self {
        self.dead_letter = Some(Arc::new(handler));
        self
    }

    /// Outbox mode: events are written to the `vendora_outbox` table of `db` in the
    /// hook's own transaction, and a relay delivers them once committed. `db` must be the
    /// database the observed entities live in (SQLite or PostgreSQL).
    pub fn outbox(self, db: sea_orm::DatabaseConnection) -> Self {
        self.outbox_options(OutboxOptions::new(db))
    }

    /// Outbox mode with explicit [`OutboxOptions`].
    pub fn outbox_options(mut self, options: OutboxOptions) -> Self {
        self.outbox = Some(options);
        self
    }

    /// Starts the observer's background tasks (and, in outbox mode, creates the outbox
    /// table when missing).
    pub async fn build(self) -> Result<Observer, StartError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StartError::NoRuntime);
        }
        let service = WebhookService::new(self.config)?;
        let mode = if self.outbox.is_some() {
            Mode::Outbox
        } else {
            Mode::Direct
        };
        let counters = Arc::new(Counters::new(mode));
        let ctx = Arc::new(Context {
            service: service.clone(),
            policy: self.retry,
            counters: counters.clone(),
            dead_letter: self.dead_letter,
            concurrency: self.concurrency,
            slow_slots: self.slow_slots,
        });
        let sink = match self.outbox {
            Some(options) => Sink::Outbox(Outbox::start(options, ctx).await?),
            None => Sink::Direct(DirectQueue::start(ctx, self.capacity, self.overflow)),
        };
        let inner = Arc::new(ObserverInner {
            service,
            sink,
            counters,
            order: self.order,
        });
        #[cfg(feature = "metrics")]
        {
            crate::telemetry::describe();
            tokio::spawn(sample_backlog(Arc::downgrade(&inner)));
        }
        Ok(Observer { inner })
    }
}

/// Sets the backlog gauges once a second while the observer lives.
#[cfg(feature = "metrics")]
async fn sample_backlog(inner: std::sync::Weak<ObserverInner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let (pending, oldest) = match &inner.sink {
            Sink::Direct(queue) => (inner.counters.pending(), queue.oldest()),
            Sink::Outbox(outbox) => outbox.backlog().await,
        };
        crate::telemetry::backlog(inner.counters.mode(), pending, oldest);
    }
}

/// Says once per process, as an error (events are lost), that events are being dropped for
/// want of an observer.
pub(crate) fn warn_not_installed(event: &str) {
    static WARNED: OnceLock<()> = OnceLock::new();
    if WARNED.set(()).is_ok() {
        crate::diagnostics::error(
            crate::diagnostics::Kind::Setup,
            format_args!(
                "no observer is installed, so `{event}` and later entity events are dropped; \
                 install one at start-up: `vendora_observe::Observer::from_env().await?.install()`"
            ),
        );
    }
}

/// The ceiling of any relay, for the bench: reads the pending rows once, by an id cursor,
/// `want` at a time with their bodies, and hands them to `observer` (direct mode) to send,
/// writing nothing, neither lease nor mark. Returns the rows read; `observer` then sends
/// them (wait at the receiver, or [`Observer::flush`]).
#[cfg(feature = "internals")]
pub async fn send_without_writing(
    db: &sea_orm::DatabaseConnection,
    observer: &Observer,
    want: usize,
) -> Result<u64, sea_orm::DbErr> {
    let Sink::Direct(queue) = &observer.inner.sink else {
        return Err(sea_orm::DbErr::Custom(
            "send_without_writing needs a direct-mode observer".into(),
        ));
    };
    let (mut after, mut total) = (0i64, 0u64);
    loop {
        let jobs = crate::delivery::outbox::internals::read_pending(db, after, want).await?;
        let Some(last) = jobs.last() else {
            return Ok(total);
        };
        after = last.token;
        total += jobs.len() as u64;
        queue.enqueue(jobs).await;
    }
}
