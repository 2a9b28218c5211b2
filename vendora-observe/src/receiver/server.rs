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

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

use super::MAX_BODY;

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
        match victim {
            Some((_, c)) => {
                // Evicted once: it no longer counts as a candidate.
                c.evicted.store(true, Ordering::Release);
                c.evict.notify_one();
                true
            }
            None => false,
        }
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
    });
    let app = app.layer(axum::middleware::from_fn_with_state(
        shared.clone(),
        read_body,
    ));
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
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

fn refuse(status: StatusCode, message: &'static str) -> Response {
    (status, [(header::CONNECTION, "close")], message).into_response()
}

/// Reads the body within the limits, then hands the request on with the whole body.
async fn read_body(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let conn = req.extensions().get::<Arc<Conn>>().cloned();
    if let Some(c) = &conn {
        c.request_started.store(shared.now(), Ordering::Release);
        c.in_request.store(true, Ordering::Release);
    }
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
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let _slot = if declared.is_none_or(|n| n > limits.small_body) {
        match tokio::time::timeout(limits.body_timeout, shared.large.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            _ => return refuse(StatusCode::SERVICE_UNAVAILABLE, "busy, try again"),
        }
    } else {
        None
    };
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, limits.max_body);
    let bytes = match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
        Err(_) => return refuse(StatusCode::REQUEST_TIMEOUT, "body not received in time"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Ok(Err(_)) => return refuse(StatusCode::BAD_REQUEST, "body could not be read"),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
