//! The receiver twin: the Rust counterpart of the Node.js WebSocket server, built to face the
//! internet. `cargo run --example receiver` runs it; the tests run the same code.
//!
//! - Webhooks (`POST /webhook`, or `/`) are served through
//!   `vendora_observe::receiver::server` (header, body and idle timeouts, a connection cap,
//!   the body limit while reading), verified by a `Verifier` (several secrets, Standard
//!   Webhooks headers with a five-minute replay window, optionally required), deduplicated by
//!   id (an id is recorded only once its broadcast succeeded), and answered 200 once the
//!   event is broadcast — with Redis, once it is published.
//! - Apps connect with the socket.io v4 client and must authenticate on the handshake
//!   (`auth: { token }`): a token from `APP_TOKENS`, or one minted with `APP_TOKEN_SECRET`
//!   (`vendora_observe::receiver::AppToken`). A browser's `Origin` must be in
//!   `ALLOWED_ORIGINS`. `APP_AUTH=off` turns both off, with a warning.
//! - An app that does not read (its buffer full) is dropped, not everyone's webhook.
//! - `GET /` is the live page (`vendora_observe::receiver::live`): what the twin does with
//!   each webhook, for anyone holding an app token.
//! - With `REDIS_URL`, several twins behind one URL share the apps through socketioxide's
//!   Redis adapter: every event is published to Redis and every twin delivers it to its own
//!   apps from there, so each app gets each event once, in the order they were published.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::http::{self as server, Limits};
use crate::{AppToken, Claim, Dedupe, IncomingEvent, Verifier};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use socketioxide::adapter::{Adapter, Emitter};
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::{SendError, SocketError, SocketIo};
use socketioxide_redis::drivers::redis::redis_client as redis;
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr};
use tokio::net::TcpListener;
use tracing::Instrument;
use vendora_observe::trace::TraceParent;

use crate::live::{self, History, MONITORS, Seen, Transport};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How a twin is set up; [`TwinConfig::from_env`] reads it from the environment.
#[derive(Clone)]
pub struct TwinConfig {
    /// `WEBHOOK_SECRET`, then `WEBHOOK_PREVIOUS_SECRETS`.
    pub secrets: Vec<String>,
    /// `WEBHOOK_REQUIRE_STANDARD_HEADERS=true`: refuse webhooks without Standard Webhooks
    /// headers (replay protection).
    pub require_standard_headers: bool,
    /// `APP_TOKENS`: tokens apps may present as they are.
    pub app_tokens: Vec<String>,
    /// `APP_TOKEN_SECRET`: the secret of tokens minted with `AppToken::mint`.
    pub app_token_secrets: Vec<String>,
    /// `ALLOWED_ORIGINS`: the `Origin`s browsers may connect from.
    pub allowed_origins: Vec<String>,
    /// `APP_AUTH=off`: any app may connect, from any origin.
    pub open: bool,
    /// `REDIS_URL`: share the apps with other twins through Redis.
    pub redis_url: Option<String>,
    /// The HTTP server's limits.
    pub limits: Limits,
    /// Events an app may have waiting before it is dropped as not reading.
    pub app_buffer: usize,
    /// engine.io heartbeat: an app that does not answer within it is closed.
    pub ping_interval: Duration,
}

impl std::fmt::Debug for TwinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinConfig")
            .field("secrets", &self.secrets.len())
            .field("app_tokens", &self.app_tokens.len())
            .field("allowed_origins", &self.allowed_origins)
            .field("open", &self.open)
            .field("redis", &self.redis_url.is_some())
            .finish_non_exhaustive()
    }
}

impl TwinConfig {
    /// A twin verifying with `secret`, accepting apps with one of `app_tokens`.
    pub fn new(secret: &str, app_tokens: &[&str]) -> Self {
        TwinConfig {
            secrets: vec![secret.to_owned()],
            require_standard_headers: false,
            app_tokens: app_tokens.iter().map(|t| t.to_string()).collect(),
            app_token_secrets: Vec::new(),
            allowed_origins: Vec::new(),
            open: false,
            redis_url: None,
            limits: Limits::default(),
            app_buffer: 256,
            ping_interval: Duration::from_secs(10),
        }
    }

    /// The settings from the environment (see the fields); each wrong one says what to set.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let list = |name: &str| -> Vec<String> {
            var(name)
                .map(|v| {
                    v.split(|c: char| c == ',' || c.is_whitespace())
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let switch = |name: &str| -> Result<Option<bool>, Error> {
            match var(name).map(|v| v.to_ascii_lowercase()) {
                None => Ok(None),
                Some(v) if ["1", "true", "on", "yes"].contains(&v.as_str()) => Ok(Some(true)),
                Some(v) if ["0", "false", "off", "no"].contains(&v.as_str()) => Ok(Some(false)),
                Some(v) => Err(format!("{name} must be on or off, got {v:?}").into()),
            }
        };
        let mut secrets = vec![var("WEBHOOK_SECRET").ok_or(
            "WEBHOOK_SECRET is not set: set it to the backend's secret (the one its \
             WEBHOOK_SECRET holds)",
        )?];
        secrets.extend(list("WEBHOOK_PREVIOUS_SECRETS"));
        let open = switch("APP_AUTH")? == Some(false);
        let config = TwinConfig {
            secrets,
            require_standard_headers: switch("WEBHOOK_REQUIRE_STANDARD_HEADERS")?.unwrap_or(false),
            app_tokens: list("APP_TOKENS"),
            app_token_secrets: var("APP_TOKEN_SECRET").into_iter().collect(),
            allowed_origins: list("ALLOWED_ORIGINS"),
            open,
            redis_url: var("REDIS_URL"),
            ..TwinConfig::new("", &[])
        };
        if !open && config.app_tokens.is_empty() && config.app_token_secrets.is_empty() {
            return Err(
                "apps must authenticate, and no way to do so is set: set APP_TOKENS \
                        (tokens apps present) or APP_TOKEN_SECRET (to verify tokens your \
                        backend mints with vendora_observe::receiver::AppToken), or APP_AUTH=off \
                        to let any app connect (not for production)"
                    .into(),
            );
        }
        Ok(config)
    }
}

/// How events reach the apps.
#[derive(Clone)]
enum Apps {
    /// This twin alone: each app is sent each event, and one that does not read is dropped.
    Local {
        io: SocketIo,
        dropped: Arc<Mutex<HashSet<String>>>,
    },
    /// Several twins: the event is published to Redis; every twin's apps get it from there.
    Redis {
        publisher: SocketIo<RedisAdapter<Emitter>>,
        dedupe: redis::aio::MultiplexedConnection,
    },
}

struct Twin {
    verifier: Verifier,
    dedupe: Dedupe,
    apps: Apps,
    config: TwinConfig,
    /// What the live page shows to monitors that connect later.
    history: Arc<History>,
}

impl Twin {
    /// Records what became of a webhook and tells the live pages (the room `monitor`).
    async fn seen(&self, seen: Seen) {
        self.history.push(seen.clone());
        let sent = match &self.apps {
            Apps::Local { io, .. } => io.to(MONITORS).emit("vendora:seen", &seen).await,
            Apps::Redis { publisher, .. } => {
                publisher.to(MONITORS).emit("vendora:seen", &seen).await
            }
        };
        if let Err(e) = sent {
            tracing::debug!("live page update failed: {e}");
        }
    }
}

/// A running twin.
pub struct Running {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a twin on `listener`; it serves until the returned handle is dropped.
pub async fn start(listener: TcpListener, config: TwinConfig) -> Result<Running, Error> {
    if config.open {
        println!(
            "warning: APP_AUTH=off: any app may connect, from any origin, and receive every event"
        );
    } else if config.allowed_origins.is_empty() {
        println!(
            "note: ALLOWED_ORIGINS is not set: browsers cannot connect (native apps, which send \
             no Origin, can); list the web apps' origins in it"
        );
    }
    let history = Arc::new(History::default());
    let builder = SocketIo::builder()
        .with_state(Arc::new(config.clone()))
        .with_state(history.clone())
        .max_buffer_size(config.app_buffer)
        .ping_interval(config.ping_interval)
        .ping_timeout(config.ping_interval);
    let twin = |apps| {
        Arc::new(Twin {
            verifier: Verifier::new(config.secrets.clone())
                .require_standard_headers(config.require_standard_headers),
            dedupe: Dedupe::default(),
            apps,
            config: config.clone(),
            history: history.clone(),
        })
    };
    let routes = |twin: &Arc<Twin>| {
        live::assets()
            .route("/", live::page(Transport::SocketIo).post(webhook))
            .route("/webhook", post(webhook))
            .with_state(twin.clone())
    };
    let (router, twin) = match &config.redis_url {
        None => {
            let (layer, io) = builder.build_layer();
            io.ns(
                "/",
                on_connect.with(authenticate::<socketioxide::adapter::LocalAdapter>),
            );
            let twin = twin(Apps::Local {
                io,
                dropped: Default::default(),
            });
            (routes(&twin).layer(layer), twin)
        }
        Some(url) => {
            let url = if url.contains("protocol=") {
                url.clone()
            } else if url.contains('?') {
                format!("{url}&protocol=resp3")
            } else {
                format!("{url}?protocol=resp3")
            };
            let unreachable =
                |e: redis::RedisError| format!("cannot reach Redis at REDIS_URL: {e}");
            let client = redis::Client::open(url.as_str())
                .map_err(|e| format!("REDIS_URL {url:?} is not usable: {e}"))?;
            let (layer, io) = builder
                .with_adapter::<RedisAdapter<_>>(
                    RedisAdapterCtr::new_with_redis(&client)
                        .await
                        .map_err(unreachable)?,
                )
                .build_layer();
            io.ns("/", on_connect.with(authenticate::<RedisAdapter<Emitter>>))
                .await
                .map_err(|e| format!("Redis adapter: {e}"))?;
            // A second socket.io server with no apps of its own: what it emits goes to
            // Redis, and every twin's apps, this one's too, get it from there in one order.
            let (_, publisher) = SocketIo::builder()
                .with_adapter::<RedisAdapter<_>>(
                    RedisAdapterCtr::new_with_redis(&client)
                        .await
                        .map_err(unreachable)?,
                )
                .build_layer();
            publisher
                .ns("/", async || ())
                .await
                .map_err(|e| format!("Redis adapter: {e}"))?;
            let dedupe = client
                .get_multiplexed_async_connection()
                .await
                .map_err(unreachable)?;
            let twin = twin(Apps::Redis { publisher, dedupe });
            (routes(&twin).layer(layer), twin)
        }
    };
    let router = router.layer(axum::middleware::from_fn_with_state(twin.clone(), origins));
    let limits = config.limits.clone();
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = server::serve(listener, router, limits, std::future::pending()).await;
    });
    Ok(Running { addr, task })
}

/// Serves a twin configured from the environment on `HOST:PORT` (default 127.0.0.1:3001)
/// until Ctrl-C.
pub async fn run_from_env() -> Result<(), Error> {
    let config = TwinConfig::from_env()?;
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port: u16 = match std::env::var("PORT") {
        Err(_) => 3001,
        Ok(p) => p
            .parse()
            .map_err(|_| format!("PORT must be a port number, e.g. PORT=3001, got {p:?}"))?,
    };
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port} ({e}); set PORT"))?;
    let running = start(listener, config).await?;
    println!("listening on http://{}", running.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The browser's `Origin`, when it sends one, must be allowed.
async fn origins(State(twin): State<Arc<Twin>>, req: Request, next: Next) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        // The twin's own live page is served from here: its origin is the twin's.
        let own = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|host| {
                origin == format!("http://{host}") || origin == format!("https://{host}")
            });
        if !own && !twin.config.open && !twin.config.allowed_origins.iter().any(|o| o == origin) {
            println!("app refused: origin {origin:?} is not in ALLOWED_ORIGINS");
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    next.run(req).await
}

#[derive(Debug, serde::Deserialize)]
struct Auth {
    token: Option<String>,
    /// The live page: also gets what the twin does with each webhook.
    #[serde(default)]
    monitor: bool,
}

#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The handshake's `auth: { token }` must be one of `APP_TOKENS`, or a live token signed
/// with `APP_TOKEN_SECRET`.
async fn authenticate<A: Adapter>(
    socket: SocketRef<A>,
    TryData(auth): TryData<Auth>,
    socketioxide::extract::State(config): socketioxide::extract::State<Arc<TwinConfig>>,
) -> Result<(), Refused> {
    if config.open {
        return Ok(());
    }
    let token = auth.ok().and_then(|a| a.token).unwrap_or_default();
    let ok = !token.is_empty()
        && (config
            .app_tokens
            .iter()
            .any(|t| crate::token_matches(t, &token))
            || AppToken::verify(&config.app_token_secrets, &token, SystemTime::now()).is_ok());
    if ok {
        Ok(())
    } else {
        println!("app refused: {} has no valid token", socket.id);
        Err(Refused(
            "a valid token is required: io(url, { auth: { token } })",
        ))
    }
}

async fn on_connect<A: Adapter>(
    socket: SocketRef<A>,
    TryData(auth): TryData<Auth>,
    socketioxide::extract::State(history): socketioxide::extract::State<Arc<History>>,
) {
    if auth.is_ok_and(|a| a.monitor) {
        println!("live page connected: {}", socket.id);
        socket.join(MONITORS);
        let _ = socket.emit("vendora:history", &history.snapshot());
    } else {
        println!("app connected: {}", socket.id);
    }
}

fn answer(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The event is being handled by another request right now (a retry racing its original):
/// 503 with `Retry-After`, which senders retry, so that the event is neither lost nor sent
/// twice.
fn in_progress() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::RETRY_AFTER, "1"),
        ],
        r#"{"error":"being handled, retry"}"#,
    )
        .into_response()
}

async fn webhook(State(twin): State<Arc<Twin>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = match twin.verifier.verify(header, &body) {
        Ok(e) => e,
        Err(rejection) => {
            println!("refused: {rejection} ({})", rejection.status());
            twin.seen(Seen::refused(rejection.to_string())).await;
            let status =
                StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return answer(status, r#"{"error":"refused"}"#);
        }
    };
    // The sender's attempt is the parent of this broadcast: the trace goes on to the apps.
    let trace = header("traceparent").and_then(TraceParent::parse);
    let span = match trace {
        Some(t) => tracing::info_span!(
            "webhook.broadcast",
            event = %event.event,
            trace_id = %t.trace_id(),
            parent_id = %t.span_id(),
        ),
        None => tracing::info_span!("webhook.broadcast", event = %event.event),
    };
    if let Some(t) = trace {
        // With OpenTelemetry, the broadcast is a span of the sender's trace.
        t.adopt(&span);
    }
    let (response, outcome) = deliver(&twin, &event, trace).instrument(span).await;
    let trace_id = trace.map(|t| t.trace_id());
    let id = event.id.as_deref();
    twin.seen(Seen::verified(
        &event.event,
        &event.data,
        id,
        outcome,
        trace_id,
    ))
    .await;
    response
}

/// Broadcasts a verified event once (dedupe by id), answering 200 once it is broadcast or
/// published.
/// The answer, and what became of the event (`broadcast`, `duplicate`, `retry`, `failed`).
async fn deliver(
    twin: &Twin,
    event: &IncomingEvent,
    trace: Option<TraceParent>,
) -> (Response, &'static str) {
    match &twin.apps {
        Apps::Local { io, dropped } => {
            let ticket = match event.id.as_deref().map(|id| twin.dedupe.claim(id)) {
                Some(Claim::Seen) => {
                    return (
                        answer(StatusCode::OK, r#"{"ok":true,"duplicate":true}"#),
                        "duplicate",
                    );
                }
                Some(Claim::InProgress) => {
                    return (in_progress(), "retry");
                }
                Some(Claim::First(ticket)) => Some(ticket),
                None => None,
            };
            announce(event, trace);
            broadcast_local(io, dropped, event);
            if let Some(ticket) = ticket {
                ticket.done();
            }
            (answer(StatusCode::OK, r#"{"ok":true}"#), "broadcast")
        }
        Apps::Redis { publisher, dedupe } => {
            let key = event
                .id
                .as_deref()
                .map(|id| format!("vendora:webhook:{id}"));
            let mut conn = dedupe.clone();
            if let Some(key) = &key {
                // Claimed for 30 s while it is published; "done" for a day once it was.
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(key)
                    .arg("busy")
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                if claimed.is_none() {
                    let state: Option<String> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .unwrap_or(None);
                    return match state.as_deref() {
                        Some("done") => (
                            answer(StatusCode::OK, r#"{"ok":true,"duplicate":true}"#),
                            "duplicate",
                        ),
                        _ => (in_progress(), "retry"),
                    };
                }
            }
            announce(event, trace);
            match publisher.emit(event.event.as_str(), &event.data).await {
                Ok(()) => {
                    if let Some(key) = &key {
                        let _: Result<(), _> = redis::cmd("SET")
                            .arg(key)
                            .arg("done")
                            .arg("PX")
                            .arg(86_400_000)
                            .query_async(&mut conn)
                            .await;
                    }
                    (answer(StatusCode::OK, r#"{"ok":true}"#), "broadcast")
                }
                Err(e) => {
                    println!("broadcast failed: {e}");
                    if let Some(key) = &key {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(key).query_async(&mut conn).await;
                    }
                    (
                        answer(
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"error":"broadcast failed"}"#,
                        ),
                        "failed",
                    )
                }
            }
        }
    }
}

/// Says on stdout what is broadcast, and in which trace.
fn announce(event: &IncomingEvent, trace: Option<TraceParent>) {
    println!("broadcast {} {}", event.event, event.data);
    if let Some(t) = trace {
        println!(
            "  trace {} (after sender span {})",
            t.trace_id(),
            t.span_id()
        );
    }
    tracing::info!("broadcast");
}

/// Sends the event to each app of this twin; an app whose buffer is full (it does not read)
/// is dropped, and the others still get the event.
fn broadcast_local(io: &SocketIo, dropped: &Mutex<HashSet<String>>, event: &IncomingEvent) {
    for socket in io.sockets() {
        let id = socket.id.to_string();
        if dropped.lock().unwrap().contains(&id) {
            continue;
        }
        if let Err(SendError::Socket(SocketError::InternalChannelFull)) =
            socket.emit(event.event.as_str(), &event.data)
        {
            dropped.lock().unwrap().insert(id.clone());
            println!("app dropped: {id} (its buffer is full: it does not read)");
            // Its channel is full, so a disconnect packet may not fit: the heartbeat, which
            // it cannot answer, closes it then.
            let _ = socket.disconnect();
        }
    }
}
