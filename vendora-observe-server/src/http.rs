//! The HTTP layer every receiver here serves through (the server, `vendora-observe listen`),
//! with one set of [`Limits`] for every transport: webhooks, socket.io's long-polls and its
//! WebSocket connections alike.
//!
//! - **Header-read timeout** (5 s): a connection that does not send a request head in time,
//!   whether new or idle between requests, is closed. Dripping headers holds nothing.
//! - **Connection cap** (512, fewer when the process may open fewer files), WebSocket
//!   connections included (an upgraded connection counts until it closes). At the cap, a
//!   new connection evicts the oldest suspect — a connection open over a second without a
//!   request, a request going on over a second, a WebSocket not an app's — or else the
//!   least recently used kept-alive connection idle over a second. An authenticated app's
//!   connection ([`Connection::hold_as_app`]: its WebSocket, its long-polls) is never
//!   evicted, nor is anything under a second old. With none to evict, new connections wait
//!   in the listen queue, in order.
//! - **Body limit while reading** ([`MAX_BODY`]): a declared `Content-Length` above it is
//!   refused (413) before anything is read; a body that grows past it while streaming is
//!   refused when it does.
//! - **Body timeout** (10 s) and **bounded buffering**: bodies up to 64 KiB are read at once;
//!   larger and chunked ones draw on a budget of buffered bytes (8 MiB) as they arrive. A
//!   body that finds the budget spent evicts the oldest request stuck over a second, so
//!   unfinished bodies can neither hold more memory than the budget nor hold a real
//!   sender's body back (theirs arrive in milliseconds). A request without a body (a
//!   long-poll, a handshake) takes nothing from the budget and waits on no one.
//! - **Graceful shutdown**: [`serve`] stops accepting when its `shutdown` future completes,
//!   lets requests in flight finish within [`Limits::shutdown_grace`], then returns.
//!
//! What the limits refuse is logged (a `tracing` warning, or standard error when no
//! subscriber is installed), so that an operator sees it, without a flood of lines: the
//! first refusal of each kind at once, with the sender's address, then how many more every
//! 10 s while they go on.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::task::AtomicWaker;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::MAX_BODY;
use crate::log::{REPORT_WINDOW, Tally};

/// The limits a receiver applies; [`Limits::default`] is what every receiver this crate
/// ships uses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Time to send a request head, on a new connection or an idle kept-alive one.
    pub header_read_timeout: Duration,
    /// Time to send a request body.
    pub body_timeout: Duration,
    /// Connections open at once, WebSocket connections included.
    pub max_connections: usize,
    /// The largest body.
    pub max_body: usize,
    /// Bodies up to this size are read at once; larger ones draw on `buffered_bodies`.
    pub small_body: usize,
    /// Bytes of large bodies buffered at once, over every connection.
    pub buffered_bodies: usize,
    /// At shutdown, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
            max_body: MAX_BODY,
            small_body: 64 << 10,
            buffered_bodies: 8 << 20,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// 512, or half the files the process may open when that is fewer (the rest are for
/// Redis, logs, the apps' own sockets while they close).
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
    /// An authenticated app's: never evicted.
    app: AtomicBool,
    evicted: AtomicBool,
    evict: Notify,
    /// Wakes the connection's reads and writes once evicted, also after an upgrade to
    /// WebSocket, when no task of ours polls it any more.
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
}

impl Conn {
    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.evict.notify_one();
        self.read_waker.wake();
        self.write_waker.wake();
    }
}

/// The connection a request arrived on: the server puts it in each request's extensions
/// (and socket.io keeps it with the handshake's parts).
#[derive(Clone)]
pub struct Connection(Arc<Conn>);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.0.peer)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The address of the other end (a proxy's, behind one).
    pub fn peer(&self) -> SocketAddr {
        self.0.peer
    }

    /// Marks the connection as an authenticated app's (its WebSocket, or a long-poll of its
    /// session): never evicted at the connection cap.
    pub fn hold_as_app(&self) {
        self.0.app.store(true, Ordering::Release);
    }
}

/// The most a connection reads ahead of what the server handles (hyper's minimum is 8 KiB).
const READ_BUFFER: usize = 16 << 10;

/// A request still going after this long is not a webhook from a real sender (theirs take
/// milliseconds): at the connection cap, or when the body budget is spent, it may be
/// evicted.
const SLOW_REQUEST_MS: u64 = 1_000;

struct Shared {
    limits: Limits,
    started: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Notified when a connection closes.
    closed: Notify,
    /// The body budget, in KiB.
    budget: Arc<Semaphore>,
    refusals: Arc<Tally>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for one more connection by evicting one (see the module's docs): `false`
    /// if none may be.
    fn make_room(&self) -> bool {
        let conns = self.conns();
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
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, c)| c.clone());
        // Logged after the lock: every accept and every closing connection takes it.
        drop(conns);
        let Some(c) = victim else {
            return false;
        };
        c.evict();
        self.note(Refusal::Evicted, c.peer);
        true
    }

    /// Evicts the oldest request that has been going on for over a second (its body is
    /// stuck): `false` if there is none.
    fn evict_stuck_body(&self) -> bool {
        let now = self.now();
        let victim = self
            .conns()
            .values()
            .filter(|c| {
                !c.evicted.load(Ordering::Acquire)
                    && !c.app.load(Ordering::Acquire)
                    && c.in_request.load(Ordering::Acquire)
            })
            .map(|c| (c.request_started.load(Ordering::Acquire), c.clone()))
            .filter(|(started, _)| now.saturating_sub(*started) > SLOW_REQUEST_MS)
            .min_by_key(|(started, _)| *started)
            .map(|(_, c)| c);
        let Some(c) = victim else {
            return false;
        };
        c.evict();
        self.note(Refusal::BodyEvicted, c.peer);
        true
    }

    fn note(&self, refusal: Refusal, peer: SocketAddr) {
        self.refusals.note(
            refusal.describe(),
            format_args!("receiver: {}, from {peer}", refusal.describe()),
        );
    }
}

/// Where a connection stands in the eviction order (lowest first), `None` if it may not be
/// evicted: suspects by age, then kept-alive connections idle over a second, least recently
/// used first. (A sender's kept-alive connection between two webhooks is not cut for a
/// flood of new connections: measured under a burst of 3,000, it was, and the sender's
/// next connection then waited behind the flood in the listen queue past its timeout.)
fn eviction_rank(c: &Conn, now: u64) -> Option<(u8, u64)> {
    if c.evicted.load(Ordering::Acquire) || c.app.load(Ordering::Acquire) {
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

/// A connection's socket: counted until it is dropped, also after an upgrade hands it to
/// a WebSocket, and failed at once when evicted.
struct Tracked {
    stream: TcpStream,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
    id: u64,
}

fn evicted_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "evicted at the connection cap",
    )
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.conn.read_waker.register(cx.waker());
        if self.conn.evicted.load(Ordering::Acquire) {
            return Poll::Ready(Err(evicted_error()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.conn.write_waker.register(cx.waker());
        if self.conn.evicted.load(Ordering::Acquire) {
            return Poll::Ready(Err(evicted_error()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
        self.shared.closed.notify_one();
    }
}

/// Serves `app` on `listener` with `limits` until `shutdown` completes, then stops
/// accepting, lets requests in flight finish within [`Limits::shutdown_grace`] and
/// returns.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        budget: Arc::new(Semaphore::new((limits.buffered_bodies >> 10).max(1))),
        limits,
        started: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        closed: Notify::new(),
        refusals: Arc::new(Tally::new(REPORT_WINDOW)),
    });
    tokio::spawn(Tally::report(Arc::downgrade(&shared.refusals)));
    let app = app.layer(axum::middleware::from_fn_with_state(
        shared.clone(),
        read_body,
    ));
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
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
            _ = &mut shutdown => break,
        };
        // At the cap with nothing to evict, the connection waits (and those behind it wait
        // in the listen queue, in order) until one closes or turns suspect.
        let mut stopping = false;
        while !shared.make_room() {
            tokio::select! {
                _ = shared.closed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = &mut shutdown => { stopping = true; break; }
            }
        }
        if stopping {
            break;
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
            app: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
        });
        shared.conns().insert(id, conn.clone());
        let io = Tracked {
            stream,
            conn: conn.clone(),
            shared: shared.clone(),
            id,
        };
        let app = app.clone();
        let header_read_timeout = shared.limits.header_read_timeout;
        let stop = stop.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn({
                let conn = conn.clone();
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Connection(conn.clone()));
                    app.clone().oneshot(req.map(Body::new))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                // What a connection may have read and not yet handed over: a request head,
                // or a body's next bytes. Bounded, so that a thousand unfinished bodies
                // hold a thousand small buffers, not a thousand large ones.
                .max_buf_size(READ_BUFFER)
                .keep_alive(true);
            // Upgrades too: socket.io's WebSocket transport starts as an HTTP request.
            let serving = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(serving);
            tokio::select! {
                _ = serving.as_mut() => {}
                _ = conn.evict.notified() => {}
                _ = stop.cancelled() => {
                    // Finish the request in flight, answer it with `Connection: close`.
                    serving.as_mut().graceful_shutdown();
                    let _ = serving.await;
                }
            }
        });
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    let grace = shared.limits.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        crate::log::warn(format_args!(
            "receiver: {} connection(s) still in a request {} s after shutdown began; closed",
            tracker.len(),
            grace.as_secs()
        ));
    }
    Ok(())
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
        shared.note(refusal, peer);
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
    /// Its body was stuck over a second when another needed the budget.
    BodyEvicted,
}

impl Refusal {
    fn answer(self) -> (StatusCode, &'static str) {
        match self {
            Refusal::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
            Refusal::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy, try again"),
            Refusal::SlowBody => (StatusCode::REQUEST_TIMEOUT, "body not received in time"),
            Refusal::Unreadable => (StatusCode::BAD_REQUEST, "body could not be read"),
            // Not answered: the connection is closed.
            Refusal::Evicted | Refusal::BodyEvicted => {
                (StatusCode::SERVICE_UNAVAILABLE, "connection closed")
            }
        }
    }

    /// What happened, for the log.
    fn describe(self) -> &'static str {
        match self {
            Refusal::TooLarge => "refused a request: body too large (answered 413)",
            Refusal::Busy => "refused a request: bodies buffered at the limit (answered 503)",
            Refusal::SlowBody => "refused a request: body not received in time (answered 408)",
            Refusal::Unreadable => "refused a request: body could not be read (answered 400)",
            Refusal::Evicted => {
                "closed a connection at the connection cap (it was idle, unfinished or an \
                 unauthenticated WebSocket for over a second)"
            }
            Refusal::BodyEvicted => {
                "closed a connection whose body was stuck for over a second, to read another"
            }
        }
    }
}

/// Whether the request carries a body at all (a long-poll or a handshake does not).
fn has_body(req: &Request) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Bytes in KiB of the budget, rounded up.
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Reads the body within the limits, then hands the request on with the whole body.
async fn read_body(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let conn = req.extensions().get::<Connection>().map(|c| c.0.clone());
    if let Some(c) = &conn {
        c.request_started.store(shared.now(), Ordering::Release);
        c.in_request.store(true, Ordering::Release);
    }
    let peer = conn.as_ref().map(|c| c.peer);
    let _busy = Busy {
        shared: &shared,
        conn,
    };
    if !has_body(&req) {
        return next.run(req).await;
    }
    let limits = &shared.limits;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body) {
        return refuse(&shared, peer, Refusal::TooLarge);
    }
    let deadline = tokio::time::Instant::now() + limits.body_timeout;
    let (parts, body) = req.into_parts();
    let bytes = if declared.is_some_and(|n| n <= limits.small_body) {
        let limited = http_body_util::Limited::new(body, limits.max_body);
        match tokio::time::timeout_at(deadline, limited.collect()).await {
            Err(_) => return refuse(&shared, peer, Refusal::SlowBody),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(&shared, peer, Refusal::TooLarge);
            }
            Ok(Err(_)) => return refuse(&shared, peer, Refusal::Unreadable),
            Ok(Ok(collected)) => collected.to_bytes(),
        }
    } else {
        match tokio::time::timeout_at(deadline, read_budgeted(&shared, body)).await {
            Err(_) => return refuse(&shared, peer, Refusal::SlowBody),
            Ok(Err(refusal)) => return refuse(&shared, peer, refusal),
            Ok(Ok(bytes)) => bytes,
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Reads a large or chunked body frame by frame, each frame's bytes taken from the budget
/// before it is kept; the budget is given back once the body is whole.
async fn read_budgeted(shared: &Shared, mut body: Body) -> Result<axum::body::Bytes, Refusal> {
    let mut buf = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Refusal::Unreadable)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > shared.limits.max_body {
            return Err(Refusal::TooLarge);
        }
        let have = held.as_ref().map_or(0, |p| p.num_permits() as u32);
        let want = kib(buf.len() + data.len()).saturating_sub(have);
        if want > 0 {
            let permit = take_budget(shared, want).await?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.into())
}

/// `kib` of the body budget: at once if free, else after evicting a request whose body is
/// stuck (waiting for its bytes to come back), else refused.
async fn take_budget(shared: &Shared, kib: u32) -> Result<OwnedSemaphorePermit, Refusal> {
    loop {
        match shared.budget.clone().try_acquire_many_owned(kib) {
            Ok(p) => return Ok(p),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Refusal::Busy),
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        if !shared.evict_stuck_body() {
            // Everything buffered is younger than a second: wait for some to finish.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // The evicted request gives its bytes back as its task drops them.
        match tokio::time::timeout(
            Duration::from_millis(100),
            shared.budget.clone().acquire_many_owned(kib),
        )
        .await
        {
            Ok(Ok(p)) => return Ok(p),
            Ok(Err(_)) => return Err(Refusal::Busy),
            Err(_) => continue,
        }
    }
}
