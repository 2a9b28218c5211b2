//! [`Observer`]: where the hooks of `#[derive(Observed)]` entities send their events.
//!
//! One observer is installed for the process at start-up ([`Observer::install`]); a task
//! can use another for the futures it runs ([`Observer::scope`]), which is how tests
//! running in parallel each talk to their own receiver. Hooks find the observer in that
//! order: the task's, then the installed one. Without either, events are dropped and one
//! warning says how to install one.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbErr};
use tokio::sync::Notify;

use crate::config::{ConfigError, WebhookConfig};
use crate::direct::{DirectQueue, LaneContext, Refused};
use crate::outbox::{Outbox, OutboxOptions};
use crate::retry::RetryPolicy;
use crate::service::{Webhook, WebhookService};

/// An event that could not be delivered after its last attempt.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The event, with the id and bytes that were sent.
    pub webhook: Webhook,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: String,
}

pub(crate) type DeadLetterHandler = Arc<dyn Fn(DeadLetter) + Send + Sync>;

/// What direct mode does with an event when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// Drop the new event, count it in [`Stats::shed`] and log it: the write never waits.
    /// The default.
    #[default]
    Shed,
    /// The hook waits until the queue has room: no event is shed, but a write can wait on
    /// a slow receiver.
    Wait,
}

/// Counters of an observer, read with [`Observer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events delivered (answered 2xx).
    pub sent: u64,
    /// Retries scheduled after a failed attempt.
    pub retried: u64,
    /// Attempts that failed (each retry's failure counts).
    pub failed: u64,
    /// Events given up on after their last attempt (dead-lettered).
    pub dead: u64,
    /// Events accepted and not yet delivered or dead-lettered.
    pub pending: u64,
    /// Events refused because the queue was full ([`Overflow::Shed`]) or closed.
    pub shed: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    pending: AtomicU64,
    shed: AtomicU64,
    idle: Notify,
}

impl Counters {
    pub(crate) fn try_reserve(&self, n: u64, capacity: usize) -> bool {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p + n <= capacity as u64).then_some(p + n)
            })
            .is_ok()
    }
    pub(crate) fn release(&self, n: u64) {
        if n > 0 && self.pending.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }
    pub(crate) fn set_pending(&self, n: u64) {
        if self.pending.swap(n, Ordering::AcqRel) != 0 && n == 0 {
            self.idle.notify_waiters();
        }
    }
    pub(crate) fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }
    pub(crate) fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dead(&self) {
        self.dead.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn shed(&self, n: u64) {
        self.shed.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            sent: self.sent.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Acquire),
            shed: self.shed.load(Ordering::Relaxed),
        }
    }
    /// Waits until nothing is pending, or `deadline` passes.
    pub(crate) async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), idle)
                .await
                .is_err()
            {
                return self.pending() == 0;
            }
        }
    }
}

/// What [`Observer::shutdown`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether everything accepted was delivered or dead-lettered before the deadline.
    pub drained: bool,
    /// Events that were still queued or retrying at the deadline; they were dead-lettered
    /// (direct mode) or stay in the outbox for the next start (outbox mode).
    pub abandoned: u64,
    /// The counters after shutdown.
    pub stats: Stats,
}

pub(crate) enum Sink {
    Direct(Arc<DirectQueue>),
    Outbox(Outbox),
}

pub(crate) struct ObserverInner {
    pub(crate) service: WebhookService,
    pub(crate) sink: Sink,
    pub(crate) counters: Arc<Counters>,
}

/// Receives the events of observed entities and delivers them in the background.
///
/// Cheap to clone. Build it once at start-up, inside the Tokio runtime, and install it:
///
/// ```no_run
/// use vendora_observe::Observer;
///
/// # async fn start() -> Result<(), vendora_observe::ConfigError> {
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
    pub async fn from_env() -> Result<Observer, ConfigError> {
        Self::builder(WebhookConfig::from_env()?).build().await
    }

    /// Starts building an observer for `config`.
    pub fn builder(config: WebhookConfig) -> ObserverBuilder {
        ObserverBuilder {
            config,
            lanes: 8,
            capacity: 10_000,
            overflow: Overflow::Shed,
            retry: RetryPolicy::default(),
            dead_letter: None,
            outbox: None,
        }
    }

    /// Makes this the observer of every task that has no scoped one. Replaces an earlier
    /// one (which keeps delivering what it already accepted).
    pub fn install(&self) {
        let mut g = GLOBAL.write().unwrap_or_else(|p| p.into_inner());
        *g = Some(self.clone());
    }

    /// Removes the installed observer, returning it.
    pub fn uninstall() -> Option<Observer> {
        GLOBAL.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Runs `f` with this observer for every hook inside it, whatever is installed. Tasks
    /// that `f` spawns do not inherit it: scope them too.
    pub fn scope<F: Future>(&self, f: F) -> tokio::task::futures::TaskLocalFuture<Observer, F> {
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
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        match &self.inner.sink {
            Sink::Direct(_) => self.inner.counters.wait_idle(deadline).await,
            Sink::Outbox(outbox) => outbox.flush(deadline).await,
        }
    }

    /// Stops accepting events and delivers what is queued until `deadline`. In direct mode
    /// what is left then is dead-lettered (logged, counted, handed to the dead-letter
    /// handler); in outbox mode it stays in the table for the next start.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let abandoned = match &self.inner.sink {
            Sink::Direct(queue) => queue.shutdown(deadline).await,
            Sink::Outbox(outbox) => outbox.shutdown(deadline).await,
        };
        let stats = self.stats();
        ShutdownReport {
            drained: abandoned == 0 && stats.pending == 0,
            abandoned,
            stats,
        }
    }

    /// Hands the events of one write to the delivery: never waits on the network.
    pub(crate) async fn submit<C: ConnectionTrait>(
        &self,
        db: &C,
        key: &str,
        webhooks: Vec<Webhook>,
    ) -> Result<(), DbErr> {
        if webhooks.is_empty() {
            return Ok(());
        }
        match &self.inner.sink {
            Sink::Direct(queue) => {
                let n = webhooks.len() as u64;
                let event = webhooks[0].event().to_owned();
                if let Err(refused) = queue.enqueue(key, webhooks).await {
                    self.inner.counters.shed(n);
                    let why = match refused {
                        Refused::Full => {
                            "the queue is full (raise queue_capacity, or use Overflow::Wait)"
                        }
                        Refused::Closed => "the observer is shut down",
                    };
                    warn_shed(&event, why);
                }
                let _ = db;
                Ok(())
            }
            Sink::Outbox(outbox) => outbox.insert(db, key, &webhooks).await,
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

/// Logs shed events at most once a second, with the number shed since the last line.
fn warn_shed(event: &str, why: &str) {
    static LAST: std::sync::Mutex<Option<(Instant, u64)>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    match &mut *last {
        Some((at, n)) if now.duration_since(*at) < Duration::from_secs(1) => *n += 1,
        slot => {
            let earlier = slot.map(|(_, n)| n).unwrap_or(0);
            tracing::warn!(
                event,
                shed_since_last_report = earlier,
                "webhook shed: {why}"
            );
            *slot = Some((now, 0));
        }
    }
}

/// Builds an [`Observer`]; [`build`](Self::build) must run inside a Tokio runtime.
#[must_use]
pub struct ObserverBuilder {
    config: WebhookConfig,
    lanes: usize,
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
            .field("lanes", &self.lanes)
            .field("capacity", &self.capacity)
            .field("overflow", &self.overflow)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ObserverBuilder {
    /// Concurrent senders (default 8). Events of one row always use the same one.
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
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
    pub async fn build(self) -> Result<Observer, ConfigError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::NoRuntime);
        }
        let service = WebhookService::new(self.config)?;
        let counters = Arc::new(Counters::default());
        let ctx = LaneContext {
            service: service.clone(),
            policy: self.retry,
            counters: counters.clone(),
            dead_letter: self.dead_letter,
        };
        let sink = match self.outbox {
            Some(options) => Sink::Outbox(Outbox::start(options, ctx, self.lanes).await?),
            None => Sink::Direct(DirectQueue::start(
                self.lanes,
                self.capacity,
                self.overflow,
                ctx,
            )),
        };
        Ok(Observer {
            inner: Arc::new(ObserverInner {
                service,
                sink,
                counters,
            }),
        })
    }
}

/// Warns once per process that events are being dropped for want of an observer.
pub(crate) fn warn_not_installed(event: &str) {
    static WARNED: OnceLock<()> = OnceLock::new();
    if WARNED.set(()).is_ok() {
        tracing::warn!(
            event,
            "vendora-observe: no observer is installed, so this and later entity events are \
             dropped; install one at start-up: `vendora_observe::Observer::from_env().await?.install()`"
        );
    }
}
