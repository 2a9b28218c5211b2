//! The apps' side of the server: socket.io connections, who they are and what they may hear,
//! and delivery to them from the history.
//!
//! - **Handshake**: `io(url, { auth: { token, offset, epoch } })`. The token decides the
//!   app's [`Scope`](crate::Scope); the live page connects with `monitor: true` and the
//!   `ADMIN_TOKEN`, never an app token. A browser's `Origin` must be listed in
//!   `ALLOWED_ORIGINS` (or be this server's own page on a loopback address).
//! - **Sessions are bound** to the address that authenticated them (behind
//!   `TRUSTED_PROXIES`, the client's address they forward): the engine.io session id, which
//!   travels in URLs, lets nobody else poll or upgrade the session. Ids are never printed.
//! - **Tokens are checked during the session**: a minted token's expiry disconnects the app
//!   (`vendora:disconnect` with the reason first); so does a token removed from
//!   `APP_TOKENS_FILE` or a subject revoked in `APP_REVOCATIONS_FILE`, within a second.
//! - **Delivery** ([`registry`]): every event as `emit(event, data, {id, offset, epoch})`, in
//!   the history's order; an app that reconnects with its last offset and epoch is caught up
//!   first (or told `vendora:resync`), then `vendora:ready`. Catch-ups run a few at a time,
//!   so that a reconnect storm does not hold live delivery back. An app that does not read
//!   (its buffer full) is dropped, never the webhooks.

mod registry;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use socketioxide::extract::{SocketRef, State as IoState, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::{DisconnectReason, Sid};
use socketioxide::{SendError, SocketError};
use tokio::sync::{Notify, Semaphore};

use crate::access::{Access, Grant, Refused};
use crate::history::{History, Offset};
use crate::http::Connection;
use crate::live::{Records, Seen};
use crate::log::{REPORT_WINDOW, Tally};
use registry::{App, Dropped, Registry, Start};

/// Events read from the history at once, live or catching up.
const PAGE: usize = 256;
/// Catch-ups running at once: the rest wait their turn, live delivery never does.
const CATCH_UPS: usize = 4;
/// How long a catch-up waits for an app to take its events before dropping it.
const SLOW_APP: Duration = Duration::from_secs(10);

/// The apps of this server.
pub(crate) struct Apps {
    registry: Mutex<Registry>,
    history: Arc<History>,
    access: Arc<Access>,
    trusted_proxies: Vec<IpAddr>,
    allowed_origins: Vec<String>,
    /// The port this server listens on (its own live page's origin, on loopback).
    port: u16,
    catch_ups: Semaphore,
    /// Signalled once the tail knows where the history stands.
    started: Notify,
    /// What the live page shows.
    pub(crate) records: Records,
    refusals: Arc<Tally>,
}

/// What an app sends on the handshake.
#[derive(Debug, Default, Deserialize)]
struct Auth {
    token: Option<String>,
    /// Where it left: the `offset` and `epoch` of the last event it received.
    offset: Option<String>,
    epoch: Option<String>,
    /// The live page.
    #[serde(default)]
    monitor: bool,
}

impl Apps {
    pub(crate) fn new(
        history: Arc<History>,
        access: Arc<Access>,
        trusted_proxies: Vec<IpAddr>,
        allowed_origins: Vec<String>,
        port: u16,
    ) -> Arc<Apps> {
        let refusals = Arc::new(Tally::new(REPORT_WINDOW));
        tokio::spawn(Tally::report(Arc::downgrade(&refusals)));
        Arc::new(Apps {
            registry: Mutex::default(),
            history,
            access,
            trusted_proxies,
            allowed_origins,
            port,
            catch_ups: Semaphore::new(CATCH_UPS),
            started: Notify::new(),
            records: Records::default(),
            refusals,
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the socket.io handlers on `io`.
    pub(crate) fn serve(io: &socketioxide::SocketIo) {
        io.ns("/", on_connect.with(authenticate));
    }

    /// Delivers the history to the live apps as it grows, for as long as the server runs.
    pub(crate) async fn tail(self: Arc<Self>) {
        let head = loop {
            match self.history.head().await {
                Ok(h) => break h,
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        self.registry().tail = Some((head.epoch.clone(), head.last));
        self.started.notify_waiters();
        let mut last = head.last;
        let mut epoch = head.epoch;
        loop {
            let Ok(entries) = self.history.wait_after(last, PAGE).await else {
                continue;
            };
            let mut dropped = Dropped::new();
            {
                let mut registry = self.registry();
                for entry in &entries {
                    if entry.epoch != epoch {
                        registry.history_lost(&entry.epoch, last);
                        epoch = entry.epoch.clone();
                    }
                    registry.deliver(entry, &mut dropped);
                    last = entry.offset;
                }
            }
            self.drop_apps(dropped);
        }
    }

    /// Disconnects apps that do not read, after the lock.
    fn drop_apps(&self, dropped: Dropped) {
        for (socket, label) in dropped {
            self.registry().remove(socket.id);
            self.refusals.note(
                "app dropped: its buffer is full (it does not read)",
                format_args!("app dropped: {label}: its buffer is full (it does not read)"),
            );
            // Its channel is full, so a disconnect packet may not fit: the heartbeat, which
            // it cannot answer, closes it then.
            let _ = socket.disconnect();
        }
    }

    /// Waits until the tail knows where the history stands.
    async fn wait_started(&self) {
        loop {
            let started = self.started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if self.registry().tail.is_some() {
                return;
            }
            started.await;
        }
    }

    /// Catches `sid` up from where it left (`from`), then turns it live.
    async fn catch_up(self: Arc<Self>, socket: SocketRef, from: Resume) {
        self.wait_started().await;
        let sid = socket.id;
        let (epoch, mut cursor) = match from {
            Resume::New => {
                self.registry().go_live(sid, Start::Fresh);
                return;
            }
            Resume::Unreadable => {
                let reason = "the offset or epoch the app gave is not one this server gives";
                self.registry().go_live(sid, Start::Resync(reason));
                return;
            }
            Resume::From { epoch, offset } => (epoch, offset),
        };
        let Ok(_turn) = self.catch_ups.acquire().await else {
            return;
        };
        let scope = match self.registry().apps.get(&sid) {
            Some(app) => app.grant.scope.clone(),
            None => return,
        };
        loop {
            if !socket.connected() {
                return;
            }
            let page = match self.history.after(cursor, PAGE).await {
                Ok(page) => page,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            if *page.epoch != *epoch {
                let reason = "another epoch: the server's history was lost since (a restart \
                              without Redis, or Redis emptied)";
                self.registry().go_live(sid, Start::Resync(reason));
                return;
            }
            if !page.covered {
                let reason = "the events since the app's offset are no longer kept";
                self.registry().go_live(sid, Start::Resync(reason));
                return;
            }
            let short = page.entries.len() < PAGE;
            for entry in page.entries {
                if scope.allows(entry.rooms.as_deref()) && !self.send_waiting(&socket, &entry).await
                {
                    return;
                }
                cursor = entry.offset;
            }
            if short && self.registry().go_live(sid, Start::CaughtUp(cursor)) {
                return;
            }
        }
    }

    /// Sends a caught-up event, waiting while the app's buffer is full; an app that takes
    /// nothing for [`SLOW_APP`] is dropped (`false`).
    async fn send_waiting(&self, socket: &SocketRef, entry: &crate::history::Entry) -> bool {
        let deadline = tokio::time::Instant::now() + SLOW_APP;
        loop {
            match registry::send(socket, entry) {
                Ok(()) => return true,
                Err(SendError::Socket(SocketError::InternalChannelFull))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                    let label = self
                        .registry()
                        .apps
                        .get(&socket.id)
                        .map(|a| a.grant.label())
                        .unwrap_or_default();
                    self.drop_apps(vec![(socket.clone(), label)]);
                    return false;
                }
                Err(_) => return false,
            }
        }
    }

    /// Tells `sid` why, then disconnects it.
    fn disconnect(&self, sid: Sid, reason: &'static str) {
        let app = self.registry().remove(sid);
        if let Some(app) = app {
            crate::log::info(format_args!("{} disconnected: {reason}", app.grant.label()));
            let _ = app.socket.emit(
                "vendora:disconnect",
                &serde_json::json!({ "reason": reason }),
            );
            let _ = app.socket.disconnect();
        }
    }

    /// Checks the connected apps' credentials against the files, every second.
    pub(crate) async fn watch_access(self: Arc<Self>) {
        if !self.access.has_files() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if !self.access.reload() {
                continue;
            }
            let revoked: Vec<Sid> = self
                .registry()
                .apps
                .iter()
                .filter(|(_, app)| self.access.still_holds(&app.grant).is_err())
                .map(|(sid, _)| *sid)
                .collect();
            for sid in revoked {
                self.disconnect(sid, Refused::Revoked.reason());
            }
        }
    }

    /// Records what became of a webhook, for the live pages.
    pub(crate) fn seen(&self, seen: Seen) {
        self.records.push(seen.clone());
        let registry = self.registry();
        for app in registry.apps.values().filter(|a| a.monitor) {
            let _ = app.socket.emit("vendora:seen", &seen);
        }
    }

    /// The client's address: the peer's, or behind a trusted proxy the last address it
    /// forwarded that is not itself a trusted proxy.
    fn client_ip(&self, connection: Option<&Connection>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = connection?.peer().ip();
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        Some(
            forwarded
                .into_iter()
                .rev()
                .find(|ip| !self.trusted_proxies.contains(ip))
                .unwrap_or(peer),
        )
    }

    /// Whether a browser's `Origin` may connect: listed, or this server's own page on a
    /// loopback address. Never derived from `Host` (a rebound DNS name would pass).
    fn origin_allowed(&self, origin: &str) -> bool {
        if self.access.is_open() || self.allowed_origins.iter().any(|o| o == origin) {
            return true;
        }
        let port = self.port;
        [
            format!("http://127.0.0.1:{port}"),
            format!("http://localhost:{port}"),
            format!("http://[::1]:{port}"),
        ]
        .iter()
        .any(|own| own == origin)
    }
}

/// socket.io's handshake: who the app is. Refusals are answered with the reason and
/// logged (the first of a kind at once, then counted).
async fn authenticate(
    socket: SocketRef,
    TryData(auth): TryData<Auth>,
    IoState(apps): IoState<Arc<Apps>>,
) -> Result<(), AuthError> {
    let auth = auth.unwrap_or_default();
    let parts = socket.req_parts();
    let connection = parts.extensions.get::<Connection>();
    let ip = apps.client_ip(connection, &parts.headers);
    let shown = ip.map_or_else(|| "?".to_owned(), |ip| ip.to_string());
    let admitted = if auth.monitor {
        apps.access.admit_admin(auth.token.as_deref())
    } else {
        apps.access.admit(auth.token.as_deref(), SystemTime::now())
    };
    let grant = match admitted {
        Ok(grant) => grant,
        Err(refused) => {
            apps.refusals.note(
                refused.reason(),
                format_args!("app refused: {}, from {shown}", refused.reason()),
            );
            return Err(AuthError(refused.reason()));
        }
    };
    if let Some(c) = connection {
        c.hold_as_app();
    }
    socket.extensions.insert(Admitted {
        grant,
        ip: ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        monitor: auth.monitor,
    });
    Ok(())
}

/// Where an app resumes.
enum Resume {
    /// It gave no offset: a first connection.
    New,
    /// After `offset`, in `epoch`.
    From { epoch: String, offset: Offset },
    /// It gave an offset or an epoch without the other, or one that does not parse.
    Unreadable,
}

impl Resume {
    fn of(auth: &Auth) -> Resume {
        match (&auth.epoch, &auth.offset) {
            (None, None) => Resume::New,
            (Some(epoch), Some(offset)) => match offset.parse() {
                Ok(offset) if epoch.len() <= 64 => Resume::From {
                    epoch: epoch.clone(),
                    offset,
                },
                _ => Resume::Unreadable,
            },
            _ => Resume::Unreadable,
        }
    }
}

/// What [`authenticate`] let in, for [`on_connect`].
#[derive(Clone)]
struct Admitted {
    grant: Grant,
    ip: IpAddr,
    monitor: bool,
}

#[derive(Debug)]
struct AuthError(&'static str);

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

async fn on_connect(
    socket: SocketRef,
    TryData(auth): TryData<Auth>,
    IoState(apps): IoState<Arc<Apps>>,
) {
    let Some(admitted) = socket.extensions.get::<Admitted>() else {
        let _ = socket.disconnect();
        return;
    };
    let auth = auth.unwrap_or_default();
    crate::log::info(format_args!(
        "{} connected, from {}",
        admitted.grant.label(),
        admitted.ip
    ));
    let from = Resume::of(&auth);
    let expires = admitted.grant.expires;
    apps.registry().add(App {
        socket: socket.clone(),
        grant: admitted.grant,
        ip: admitted.ip,
        live: false,
        cursor: Offset::ZERO,
        monitor: admitted.monitor,
    });
    socket.on_disconnect({
        let apps = apps.clone();
        async move |socket: SocketRef, _reason: DisconnectReason| {
            apps.registry().remove(socket.id);
        }
    });
    if admitted.monitor {
        let _ = socket.emit("vendora:history", &apps.records.snapshot());
    }
    if let Some(at) = expires {
        let (apps, sid) = (apps.clone(), socket.id);
        tokio::spawn(async move {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
            apps.disconnect(sid, Refused::Expired.reason());
        });
    }
    tokio::spawn(apps.clone().catch_up(socket, from));
}

/// Refuses a browser whose `Origin` is not allowed, and a session id used from another
/// address than the one that authenticated it.
pub(crate) async fn guard(State(apps): State<Arc<Apps>>, req: Request, next: Next) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !apps.origin_allowed(origin) {
            apps.refusals.note(
                "refused a browser: its Origin is not in ALLOWED_ORIGINS",
                format_args!(
                    "refused a browser: Origin \"{}\" is not in ALLOWED_ORIGINS",
                    crate::log::escaped(origin)
                ),
            );
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    if req.uri().path().starts_with("/socket.io")
        && let Some(sid) = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sid=")))
            .and_then(|s| s.parse::<Sid>().ok())
    {
        let connection = req.extensions().get::<Connection>();
        let ip = apps.client_ip(connection, req.headers());
        let bound = apps.registry().apps.get(&sid).map(|a| a.ip);
        match bound {
            Some(bound) if Some(bound) != ip => {
                apps.refusals.note(
                    "refused a session used from another address than the one that opened it",
                    format_args!(
                        "refused a session used from {} while it was opened from {bound}",
                        ip.map_or_else(|| "?".to_owned(), |ip| ip.to_string())
                    ),
                );
                // What engine.io answers for a session it does not know.
                return (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"code":1,"message":"Session ID unknown"}"#,
                )
                    .into_response();
            }
            Some(_) => {
                if let Some(c) = connection {
                    c.hold_as_app();
                }
            }
            None => {}
        }
    }
    next.run(req).await
}
