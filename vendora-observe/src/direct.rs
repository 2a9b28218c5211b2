//! Direct mode: a bounded in-memory queue drained by concurrent senders ("lanes").
//!
//! Every event has an ordering key (its entity and primary key). All events of one key go
//! to the same lane, and a lane delivers one event at a time, retries included, so events
//! of one row arrive in the order they were emitted even when some attempts fail. Lanes
//! run concurrently on the shared keep-alive client.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::observer::{Counters, DeadLetter, DeadLetterHandler, Overflow};
use crate::retry::RetryPolicy;
use crate::service::{DeliveryError, Webhook, WebhookService};

pub(crate) struct DirectQueue {
    lanes: Mutex<Vec<mpsc::UnboundedSender<Webhook>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    capacity: usize,
    overflow: Overflow,
    closed: AtomicBool,
    /// Signalled whenever an event leaves the queue (for `Overflow::Wait`).
    space: Notify,
    /// Set when shutdown's deadline passes: lanes stop waiting and dead-letter the rest.
    abort: watch::Sender<bool>,
    counters: Arc<Counters>,
}

/// Why an event was not queued.
pub(crate) enum Refused {
    Full,
    Closed,
}

pub(crate) struct LaneContext {
    pub(crate) service: WebhookService,
    pub(crate) policy: RetryPolicy,
    pub(crate) counters: Arc<Counters>,
    pub(crate) dead_letter: Option<DeadLetterHandler>,
}

impl DirectQueue {
    pub(crate) fn start(
        lanes: usize,
        capacity: usize,
        overflow: Overflow,
        ctx: LaneContext,
    ) -> Arc<Self> {
        let (abort, _) = watch::channel(false);
        let counters = ctx.counters.clone();
        let ctx = Arc::new(ctx);
        let mut senders = Vec::with_capacity(lanes);
        let mut workers = Vec::with_capacity(lanes);
        let queue = Arc::new_cyclic(|weak: &std::sync::Weak<DirectQueue>| {
            for lane in 0..lanes.max(1) {
                let (tx, rx) = mpsc::unbounded_channel();
                senders.push(tx);
                workers.push(tokio::spawn(run_lane(
                    lane,
                    rx,
                    ctx.clone(),
                    weak.clone(),
                    abort.subscribe(),
                )));
            }
            DirectQueue {
                lanes: Mutex::new(Vec::new()),
                workers: Mutex::new(Vec::new()),
                capacity: capacity.max(1),
                overflow,
                closed: AtomicBool::new(false),
                space: Notify::new(),
                abort,
                counters,
            }
        });
        *lock(&queue.lanes) = senders;
        *lock(&queue.workers) = workers;
        queue
    }

    /// Queues the events of one write under `key`, all or none, without waiting on the
    /// network. They stay contiguous in their lane. With [`Overflow::Wait`] it may wait
    /// for room in the queue.
    pub(crate) async fn enqueue(&self, key: &str, webhooks: Vec<Webhook>) -> Result<(), Refused> {
        let n = webhooks.len() as u64;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Refused::Closed);
            }
            if self.counters.try_reserve(n, self.capacity) {
                break;
            }
            match self.overflow {
                Overflow::Shed => return Err(Refused::Full),
                Overflow::Wait => {
                    let room = self.space.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    if self.counters.pending() + n <= self.capacity as u64 {
                        continue;
                    }
                    room.await;
                }
            }
        }
        let lanes = lock(&self.lanes);
        if lanes.is_empty() {
            drop(lanes);
            self.counters.release(n);
            return Err(Refused::Closed);
        }
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let lane = &lanes[(h.finish() % lanes.len() as u64) as usize];
        // Holding the lock keeps another write's events from slipping between these.
        for (i, webhook) in webhooks.into_iter().enumerate() {
            if lane.send(webhook).is_err() {
                drop(lanes);
                self.counters.release(n - i as u64);
                return Err(Refused::Closed);
            }
        }
        Ok(())
    }

    fn left_queue(&self) {
        self.counters.release(1);
        self.space.notify_waiters();
    }

    /// Stops taking events, lets the lanes drain until `deadline`, then dead-letters what
    /// is left. Returns how many events were abandoned.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> u64 {
        self.closed.store(true, Ordering::Release);
        self.space.notify_waiters();
        lock(&self.lanes).clear(); // lanes end once their channel is empty
        let workers: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.workers));
        let before = self.counters.snapshot().dead;
        let all = async {
            for w in workers {
                let _ = w.await;
            }
        };
        tokio::pin!(all);
        if tokio::time::timeout(deadline, &mut all).await.is_err() {
            let _ = self.abort.send(true);
            all.await;
        }
        self.counters.snapshot().dead - before
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_lane(
    lane: usize,
    mut rx: mpsc::UnboundedReceiver<Webhook>,
    ctx: Arc<LaneContext>,
    queue: std::sync::Weak<DirectQueue>,
    mut abort: watch::Receiver<bool>,
) {
    let mut failing = false;
    while let Some(webhook) = rx.recv().await {
        let aborted = *abort.borrow();
        if aborted {
            ctx.dead(
                webhook,
                0,
                "shutdown deadline passed before delivery".into(),
            );
        } else {
            deliver(lane, &ctx, webhook, &mut failing, &mut abort).await;
        }
        if let Some(q) = queue.upgrade() {
            q.left_queue();
        }
    }
}

/// Delivers one event with retries; returns when it is delivered or dead-lettered.
async fn deliver(
    lane: usize,
    ctx: &LaneContext,
    webhook: Webhook,
    failing: &mut bool,
    abort: &mut watch::Receiver<bool>,
) {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let result = tokio::select! {
            r = ctx.service.send(&webhook) => r,
            _ = abort.wait_for(|a| *a) => {
                ctx.dead(webhook, attempts, "shutdown deadline passed during delivery".into());
                return;
            }
        };
        let error = match result {
            Ok(_) => {
                ctx.counters.sent();
                if std::mem::take(failing) {
                    tracing::info!(
                        lane,
                        url = ctx.service.endpoint_for_logs(),
                        "webhook receiver reachable again"
                    );
                }
                return;
            }
            Err(e) => e,
        };
        ctx.counters.failed();
        if !*failing {
            // One line when a lane starts failing, not one per attempt.
            ctx.service
                .log_failure(webhook.event(), Some(webhook.id()), &error);
            *failing = true;
        } else {
            tracing::debug!(
                lane,
                event = webhook.event(),
                id = webhook.id(),
                attempts,
                "webhook attempt failed: {error}"
            );
        }
        if !error.is_retryable() || attempts >= ctx.policy.max_attempts {
            ctx.dead(webhook, attempts, describe(&error));
            return;
        }
        ctx.counters.retried();
        let delay = ctx.policy.delay(attempts, error.retry_after());
        let until = Instant::now() + delay;
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = abort.wait_for(|a| *a) => {
                ctx.dead(webhook, attempts, format!("shutdown deadline passed while retrying after: {}", describe(&error)));
                return;
            }
        }
    }
}

fn describe(e: &DeliveryError) -> String {
    format!("{}: {e}", e.kind())
}

impl LaneContext {
    fn dead(&self, webhook: Webhook, attempts: u32, last_error: String) {
        self.counters.dead();
        tracing::error!(
            event = webhook.event(),
            id = webhook.id(),
            attempts,
            url = self.service.endpoint_for_logs(),
            "webhook dead-lettered: {last_error}"
        );
        if let Some(handler) = &self.dead_letter {
            handler(DeadLetter {
                webhook,
                attempts,
                last_error,
            });
        }
    }
}
