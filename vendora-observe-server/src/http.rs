//! An HTTP server for receivers that face the internet (feature `server`): the receiver
//! twin and `vendora-observe listen` both serve through it, with the same [`Limits`].
//!
//! - **Header-read timeout** (5 s): a connection that does not send a request head in time,
//!   whether new or idle between requests, is closed. Dripping headers holds nothing.
//! - **Connection cap** (512, fewer when the process may open fewer files): at the cap, a
//!   new connection evicts the oldest suspect (a connection open over a second without a
//!   request, or a request going on over a second), or else the least recently used
//!   kept-alive connection idle over a second; a connection or request under a second old,
//!   and a kept-alive connection used within the last second, are never cut. With none to
//!   evict, new connections wait in the listen queue, in order. Stalled connections and
//!   unfinished bodies cannot lock out real senders, whose requests start at once and take
//!   milliseconds, nor close the kept-alive connections they keep using, even while a
//!   flood of new connections is too young to count as suspect.
//! - **Body limit while reading** ([`MAX_BODY`]): a declared `Content-Length` above it is
//!   refused (413) before anything is read; a body that grows past it while streaming is
//!   refused when it does.
//! - **Body timeout** (10 s) and **bounded buffering**: bodies up to 64 KiB are read at once;
//!   larger ones (and chunked ones) wait for one of 8 slots, so unfinished large bodies can
//!   hold at most 8 MiB of memory, however many connections send them.
//!
//! What the limits refuse is logged (a `tracing` warning, or standard error when no
//! subscriber is installed), so that an operator sees it, without a flood of lines: the
//! first refusal of each kind at once, with the sender's address, then how many more every
//! 10 s while they go on.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

use crate::MAX_BODY;

/// The limits a receiver applies; [`Limits::default`] is what every receiver this crate
/// ships uses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Time to send a request head, on a new connection or an idle kept-alive one.
    pub header_read_timeout: Duration,
    /// Time to send a request body.
    pub body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// The largest body.
    pub max_body: usize,
    /// Bodies up to this size are read at once; larger ones take one of `large_bodies`.
    pub small_body: usize,
    /// Large bodies read at once.
    pub large_bodies: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
            max_body: MAX_BODY,
            small_body: 64 << 10,
            large_bodies: 8,
        }
    }
}

/// 512, or half the files the process may open when that is fewer (the rest are for the
/// database, the apps' sockets, logs).
fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse::<usize>().ok());
    soft.map_or(512, |n| (n / 2).clamp(16, 512))
}

/// One connection, as the server tracks it.
struct Conn {
    peer: SocketAddr,
    /// Milliseconds since the server started, when it was accepted.
    opened: u64,
    /// It has had a whole request answered.
    served: AtomicBool,
    /// Milliseconds since the server started, at its last request's end (or its start).
    last_active: AtomicU64,
    in_request: AtomicBool,
    /// Milliseconds since the server started, when its current request began.
    request_started: AtomicU64,
    evicted: AtomicBool,
    evict: Notify,
}

/// A request still going after this long is not a webhook from a real sender (theirs take
/// milliseconds): at the connection cap, it may be evicted.
const SLOW_REQUEST_MS: u64 = 1_000;

struct Shared {
    limits: Limits,
    started: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Notified when a connection closes.
    closed: Notify,
    large: Semaphore,
    refusals: Refusals,
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Makes room for one more connection by evicting one (see the module's docs): `false`
    /// if none may be.
    fn make_room(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() < self.limits.max_connections {
            return true;
        }
        // Evicted connections still closing no longer count.
        let evicted = conns
            .values()
            .filter(|c| c.evicted.load(Ordering::Acquire))
            .count();
        if conns.len() - evicted < self.limits.max_connections {
            return true;
        }
        let now = self.now();
        let victim = conns
            .values()
            .filter_map(|c| eviction_rank(c, now).map(|rank| (rank, c)))
            .min_by_key(|(rank, _)| *rank);
        let Some((_, c)) = victim else {
            return false;
        };
        // Evicted once: it no longer counts as a candidate.
        c.evicted.store(true, Ordering::Release);
        c.evict.notify_one();
        let peer = c.peer;
        // Logged after the lock: every accept and every closing connection takes it.
        drop(conns);
        self.refusals.note(Refusal::Evicted, peer, Instant::now());
        true
    }
}

/// Where a connection stands in the eviction order (lowest first), `None` if it may not be
/// evicted: suspects by age, then kept-alive connections idle over a second, least recently
/// used first. (A sender's kept-alive connection between two webhooks is not cut for a
/// flood of new connections: measured under a burst of 3,000, it was, and the sender's
/// next connection then waited behind the flood in the listen queue past its timeout.)
fn eviction_rank(c: &Conn, now: u64) -> Option<(u8, u64)> {
    if c.evicted.load(Ordering::Acquire) {
        return None;
    }
    if c.in_request.load(Ordering::Acquire) {
        let started = c.request_started.load(Ordering::Acquire);
        return (now.saturating_sub(started) > SLOW_REQUEST_MS).then_some((0, started));
    }
    if c.served.load(Ordering::Acquire) {
        let last = c.last_active.load(Ordering::Acquire);
        return (now.saturating_sub(last) > SLOW_REQUEST_MS).then_some((1, last));
    }
    // A connection just accepted has not had the time to send its request.
    (now.saturating_sub(c.opened) > SLOW_REQUEST_MS).then_some((0, c.opened))
}

/// Serves `app` on `listener` with `limits` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        large: Semaphore::new(limits.large_bodies.max(1)),
        limits,
        started: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        closed: Notify::new(),
        refusals: Refusals::new(REPORT_WINDOW),
    });
    tokio::spawn(report_refusals(Arc::downgrade(&shared)));
    let app = app.layer(axum::middleware::from_fn_with_state(
        shared.clone(),
        read_body,
    ));
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of files, or a connection reset before it was accepted: go on.
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        // At the cap with nothing to evict, the connection waits (and those behind it wait
        // in the listen queue, in order) until one closes or turns suspect.
        while !shared.make_room() {
            tokio::select! {
                _ = shared.closed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let now = shared.now();
        let conn = Arc::new(Conn {
            peer,
            opened: now,
            served: AtomicBool::new(false),
            last_active: AtomicU64::new(now),
            in_request: AtomicBool::new(false),
            request_started: AtomicU64::new(u64::MAX),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        let app = app.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn({
                let conn = conn.clone();
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(conn.clone());
                    app.clone().oneshot(req.map(Body::new))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(shared.limits.header_read_timeout)
                .keep_alive(true);
            // Upgrades too: socket.io's WebSocket transport starts as an HTTP request.
            let serving = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = serving => {}
                _ = conn.evict.notified() => {}
            }
            shared
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            shared.closed.notify_one();
        });
    }
}

/// Marks the connection busy while a request is handled.
struct Busy<'a> {
    shared: &'a Shared,
    conn: Option<Arc<Conn>>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.last_active.store(self.shared.now(), Ordering::Release);
            conn.served.store(true, Ordering::Release);
            conn.in_request.store(false, Ordering::Release);
        }
    }
}

/// Answers a request the limits refuse, and notes it for the log.
fn refuse(shared: &Shared, peer: Option<SocketAddr>, refusal: Refusal) -> Response {
    if let Some(peer) = peer {
        shared.refusals.note(refusal, peer, Instant::now());
    }
    let (status, message) = refusal.answer();
    (status, [(header::CONNECTION, "close")], message).into_response()
}

/// Why the server turned a request or connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Refusal {
    TooLarge,
    Busy,
    SlowBody,
    Unreadable,
    /// Closed at the connection cap (open over a second without a finished request, or
    /// kept alive and unused for over a second).
    Evicted,
}

impl Refusal {
    fn answer(self) -> (StatusCode, &'static str) {
        match self {
            Refusal::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
            Refusal::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy, try again"),
            Refusal::SlowBody => (StatusCode::REQUEST_TIMEOUT, "body not received in time"),
            Refusal::Unreadable => (StatusCode::BAD_REQUEST, "body could not be read"),
            // Not answered: the connection is closed.
            Refusal::Evicted => (StatusCode::SERVICE_UNAVAILABLE, "connection cap reached"),
        }
    }

    /// What happened, for the log.
    fn describe(self) -> String {
        match self {
            Refusal::Evicted => "closed a connection at the connection cap (it was idle or \
                                 unfinished for over a second)"
                .to_owned(),
            other => {
                let (status, message) = other.answer();
                format!(
                    "refused a request: {message} (answered {})",
                    status.as_u16()
                )
            }
        }
    }
}

/// How often refusals of one kind are summed up in the log, after the first one.
const REPORT_WINDOW: Duration = Duration::from_secs(10);

/// Refusals of each kind: the first is logged at once, the next ones counted and summed up
/// once the window since the last line has passed.
struct Refusals {
    window: Duration,
    tallies: Mutex<HashMap<Refusal, Tally>>,
}

struct Tally {
    /// When the last line about this kind was logged.
    logged: Instant,
    /// Refusals since, not logged yet.
    more: u64,
}

impl Refusals {
    fn new(window: Duration) -> Self {
        Refusals {
            window,
            tallies: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one refusal; logs it if none of its kind was logged within the window.
    fn note(&self, refusal: Refusal, peer: SocketAddr, now: Instant) {
        if self.count(refusal, now) {
            crate::log::warn(format_args!(
                "receiver: {}, from {peer}; more like it are summed up every {} s",
                refusal.describe(),
                self.window.as_secs()
            ));
        }
    }

    /// Whether this refusal is to be logged now (else it was counted).
    fn count(&self, refusal: Refusal, now: Instant) -> bool {
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        match tallies.get_mut(&refusal) {
            Some(t) => {
                t.more += 1;
                false
            }
            None => {
                tallies.insert(
                    refusal,
                    Tally {
                        logged: now,
                        more: 0,
                    },
                );
                true
            }
        }
    }

    /// The kinds whose window has passed, with the refusals counted since their last line.
    /// A kind with none is forgotten, so that its next refusal is logged at once.
    fn due(&self, now: Instant) -> Vec<(Refusal, u64)> {
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        tallies.retain(|refusal, t| {
            if now.duration_since(t.logged) < self.window {
                return true;
            }
            if t.more == 0 {
                return false;
            }
            out.push((*refusal, std::mem::take(&mut t.more)));
            t.logged = now;
            true
        });
        out
    }
}

/// Sums up counted refusals once a second, for as long as the server runs.
async fn report_refusals(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let window = shared.refusals.window.as_secs();
        for (refusal, n) in shared.refusals.due(Instant::now()) {
            crate::log::warn(format_args!(
                "receiver: {}: {n} more time(s) in the last {window} s",
                refusal.describe()
            ));
        }
    }
}

/// Reads the body within the limits, then hands the request on with the whole body.
async fn read_body(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let conn = req.extensions().get::<Arc<Conn>>().cloned();
    if let Some(c) = &conn {
        c.request_started.store(shared.now(), Ordering::Release);
        c.in_request.store(true, Ordering::Release);
    }
    let peer = conn.as_ref().map(|c| c.peer);
    let _busy = Busy {
        shared: &shared,
        conn,
    };
    let limits = &shared.limits;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body) {
        return refuse(&shared, peer, Refusal::TooLarge);
    }
    let _slot = if declared.is_none_or(|n| n > limits.small_body) {
        match tokio::time::timeout(limits.body_timeout, shared.large.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            _ => return refuse(&shared, peer, Refusal::Busy),
        }
    } else {
        None
    };
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, limits.max_body);
    let bytes = match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
        Err(_) => return refuse(&shared, peer, Refusal::SlowBody),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(&shared, peer, Refusal::TooLarge);
        }
        Ok(Err(_)) => return refuse(&shared, peer, Refusal::Unreadable),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_of_a_kind_is_logged_the_next_ones_summed_up_once_a_window() {
        let r = Refusals::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(r.count(Refusal::TooLarge, at(0)), "the first is logged");
        assert!(!r.count(Refusal::TooLarge, at(1)));
        assert!(!r.count(Refusal::TooLarge, at(2)));
        assert!(
            r.count(Refusal::SlowBody, at(2)),
            "another kind is logged at once"
        );
        assert!(
            r.due(at(9)).is_empty(),
            "within the window, nothing is summed up"
        );
        assert_eq!(r.due(at(10)), [(Refusal::TooLarge, 2)]);
        // The flood goes on: counted, summed up one window after the last line.
        assert!(!r.count(Refusal::TooLarge, at(11)));
        assert!(r.due(at(19)).is_empty());
        assert_eq!(r.due(at(20)), [(Refusal::TooLarge, 1)]);
        // Quiet for a window: forgotten, and the next one is logged at once again.
        assert!(r.due(at(30)).is_empty());
        assert!(r.count(Refusal::TooLarge, at(31)));
    }
}
