//! # vendora-observe-server
//!
//! The WebSocket server of [vendora-observe](https://docs.rs/vendora-observe): it verifies
//! the signed webhooks the backend sends and delivers each event over socket.io to the apps
//! allowed to see it, in order, catching up every app that reconnects. A program
//! (`cargo install vendora-observe-server`, configured from the environment), and a library
//! of the same parts for receivers of your own.
//!
//! ```text
//! backend ──signed POST /webhook──> vendora-observe-server ──socket.io──> apps
//!                                     verify, dedupe, history          (rooms, catch-up)
//!                                     (memory, or Redis Streams)
//! ```
//!
//! - **Webhooks** ([`Verifier`]): the signature over the raw body in constant time, with
//!   `WEBHOOK_SECRET` or any of `WEBHOOK_PREVIOUS_SECRETS`; the Standard Webhooks headers
//!   required (a replay window of 5 minutes), unless legacy senders are accepted
//!   explicitly; redeliveries dropped by id.
//! - **Apps** authenticate on the handshake with a token whose [`Scope`] says which rooms
//!   they hear (`APP_TOKENS=till-7=store:1`, or an [`AppToken`] the backend mints). An event
//!   with rooms (an entity with `#[observe(room = …)]`) reaches only the apps whose scope
//!   holds one of them; an event without rooms reaches every app. Tokens expire and are
//!   revoked during the session.
//! - **History**: every event has an offset in one stream per deployment (memory, or Redis
//!   Streams with `REDIS_URL`, shared by every server), kept for 10 minutes and 64 MiB by
//!   default. Apps receive `emit(event, data, {id, offset, epoch})`; one that reconnects
//!   with its last offset and epoch gets what it missed, in order, once, before anything
//!   new, or `vendora:resync` when history cannot cover the gap. The apps' module,
//!   `clients/js/vendora-observe.js`, does this for them.
//! - **Limits on every transport** ([`http`]): header, body and idle timeouts, a
//!   connection cap that WebSocket connections count toward, a budget for buffered bodies,
//!   1 MiB webhooks, 16 KiB app messages; sessions bound to their client's address.
//! - **Redis outages** are ridden out: 503 with `Retry-After` meanwhile, serving again
//!   within a second of Redis's return.
//! - **The live page** at `/` ([`live`]), behind `ADMIN_TOKEN`.
//!
//! Run in-process:
//!
//! ```no_run
//! use vendora_observe_server::{Scope, ServerConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ServerConfig::new("s3cr3t").app_token("till-token", Scope::rooms(["store:1"]));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
//! let server = vendora_observe_server::start(listener, config).await?;
//! println!("listening on http://{}", server.addr());
//! tokio::signal::ctrl_c().await?;
//! server.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod access;
mod apps;
mod config;
mod dedupe;
mod history;
pub mod http;
pub mod live;
mod log;
mod token;
mod verify;
mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::post;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, ServerConfig};
pub use dedupe::{Claim, Dedupe, Ticket};
pub use history::Retention;
pub use log::escaped;
pub use token::{AppToken, Scope, TokenError};
pub use verify::{
    IncomingEvent, MAX_BODY, MAX_ID, REPLAY_TOLERANCE, Rejection, Verifier, token_matches,
};

use crate::apps::Apps;
use crate::history::{History, Memory, RedisHistory, RedisLink};
use crate::live::Transport;

/// The largest message an app may send (its handshake: a token, an offset): 16 KiB, on
/// the polling and the WebSocket transport alike.
pub const MAX_APP_MESSAGE: usize = 16 << 10;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The address cannot be listened on.
    #[error("cannot listen on {address}; set HOST and PORT")]
    Listen {
        /// `HOST:PORT`.
        address: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// A running server; stopped by [`shutdown`](Self::shutdown) (or, abruptly, when dropped).
pub struct Running {
    addr: SocketAddr,
    io: SocketIo,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops gracefully: disconnects the apps (they reconnect to another server, or to
    /// this one when it is back, and catch up), stops accepting, lets the requests in
    /// flight finish within the limits' grace, then returns.
    pub async fn shutdown(mut self) {
        let _ = self.io.clone().close().await;
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in &self.tasks {
            task.abort();
        }
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts a server on `listener` with `config`.
pub async fn start(listener: TcpListener, config: ServerConfig) -> Result<Running, StartError> {
    // rustls needs a process-wide provider for `rediss://`; the first install wins.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        address: "the listener".into(),
        source,
    })?;
    let access = Arc::new(
        access::Access::new(config.access.clone()).map_err(|message| {
            ConfigError::new(
                if message.starts_with("APP_TOKENS_FILE") {
                    "APP_TOKENS_FILE"
                } else {
                    "APP_REVOCATIONS_FILE"
                },
                message,
            )
        })?,
    );
    let history = Arc::new(match &config.redis_url {
        None => History::Memory(Memory::new(config.retention)),
        Some(url) => {
            let ca = match &config.redis_ca {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    ConfigError::new(
                        "REDIS_CA_CERT",
                        format!(
                            "REDIS_CA_CERT={} cannot be read ({e}); give the PEM file of the \
                             certificate authority that signed Redis's certificate",
                            path.display()
                        ),
                    )
                })?),
                None => None,
            };
            let link =
                Arc::new(RedisLink::new(url, ca).map_err(|m| ConfigError::new("REDIS_URL", m))?);
            log::info(format_args!(
                "history and apps shared through Redis at {}",
                link.shown()
            ));
            History::Redis(RedisHistory::new(link, config.retention))
        }
    });
    let apps = Apps::new(
        history.clone(),
        access.clone(),
        config.trusted_proxies.clone(),
        config.allowed_origins.clone(),
        addr.port(),
    );
    let (layer, io) = SocketIo::builder()
        .with_state(apps.clone())
        .max_buffer_size(config.app_buffer)
        .ping_interval(config.ping_interval)
        .ping_timeout(config.ping_interval)
        .connect_timeout(std::time::Duration::from_secs(5))
        .max_payload(MAX_APP_MESSAGE as u64)
        .ws_max_message_size(MAX_APP_MESSAGE)
        .ws_max_frame_size(MAX_APP_MESSAGE)
        .build_layer();
    Apps::serve(&io);
    let refusals = Arc::new(log::Tally::new(log::REPORT_WINDOW));
    let tasks = vec![
        tokio::spawn(log::Tally::report(Arc::downgrade(&refusals))),
        tokio::spawn(apps.clone().tail()),
        tokio::spawn(apps.clone().watch_access()),
    ];
    let endpoint = Arc::new(webhook::Endpoint {
        verifier: Verifier::new(
            config
                .secrets
                .iter()
                .map(|s| String::from_utf8_lossy(s.expose()).into_owned()),
        )
        .require_standard_headers(config.require_standard_headers),
        history,
        apps: apps.clone(),
        refusals,
    });
    let router = live::assets()
        .route("/", live::page(Transport::SocketIo).post(webhook::webhook))
        .route("/webhook", post(webhook::webhook))
        .with_state(endpoint)
        .layer(layer)
        .layer(axum::middleware::from_fn_with_state(
            apps.clone(),
            apps::guard,
        ));
    let stop = CancellationToken::new();
    let limits = config.limits.clone();
    let serving = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = http::serve(listener, router, limits, stop.cancelled_owned()).await;
        })
    };
    Ok(Running {
        addr,
        io,
        stop,
        task: Some(serving),
        tasks,
    })
}

/// What the server says at start about settings an operator should know of.
fn notes(config: &ServerConfig) {
    if config.access.open {
        log::warn(format_args!(
            "APP_AUTH=off: any app may connect, from any origin, and receive every event (not \
             for production)"
        ));
    } else if config.allowed_origins.is_empty() {
        log::info(format_args!(
            "ALLOWED_ORIGINS is not set: browsers cannot connect (native apps, which send no \
             Origin, can); list the web apps' origins in it"
        ));
    }
    if !config.require_standard_headers {
        log::warn(format_args!(
            "WEBHOOK_REQUIRE_STANDARD_HEADERS=false: webhooks signed only with \
             X-Webhook-Signature are accepted, and a captured one can be replayed under a new \
             id; set it back once every sender sends the Standard Webhooks headers \
             (vendora-observe does by default)"
        ));
    }
    if config.access.admin.is_empty() && !config.access.open {
        log::info(format_args!(
            "ADMIN_TOKEN is not set: the live page at / cannot be opened; set ADMIN_TOKEN to a \
             secret of its own (never an app's token)"
        ));
    }
}

/// Serves as the environment says until Ctrl-C or SIGTERM.
pub async fn run_from_env() -> Result<(), StartError> {
    let config = ServerConfig::from_env()?;
    let (host, port) = config::listen_address()?;
    notes(&config);
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|source| StartError::Listen {
            address: format!("{host}:{port}"),
            source,
        })?;
    let server = start(listener, config).await?;
    log::info(format_args!("listening on http://{}", server.addr()));
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match &mut terminate {
                Some(t) => { t.recv().await; }
                None => std::future::pending().await,
            }
        } => {}
    }
    log::info(format_args!(
        "stopping: apps disconnected, requests in flight finishing"
    ));
    server.shutdown().await;
    log::info(format_args!("stopped"));
    Ok(())
}

/// What `vendora-observe-server --help` prints: every setting, with its default.
const HELP: &str = "\
vendora-observe-server: verifies signed webhooks and delivers them over socket.io v4 to the
apps allowed to see them. Configured from the environment (and .env); Ctrl-C or SIGTERM
stops it gracefully. The backend posts to http://HOST:PORT/webhook.

Usage: vendora-observe-server [--help | --version]

Settings:
  HOST, PORT                        where to listen (127.0.0.1, 3001)
  WEBHOOK_SECRET                    the backend's secret (required)
  WEBHOOK_PREVIOUS_SECRETS          secrets being rotated out, comma-separated
  WEBHOOK_REQUIRE_STANDARD_HEADERS  refuse webhooks without the Standard Webhooks headers (true)
  APP_TOKENS                        app tokens and their rooms: till-7=store:1|store:2,…
                                    (a bare token hears every room)
  APP_TOKENS_FILE                   the same, in a file read again when it changes
  APP_TOKEN_SECRET                  the secret of tokens the backend mints (several while rotating)
  APP_REVOCATIONS_FILE              revoked subjects, a line each, read again when it changes
  APP_AUTH=off                      any app hears every event: development only
  ADMIN_TOKEN                       the live page's credential (none: the page is closed)
  ALLOWED_ORIGINS                   origins browsers may connect from
  TRUSTED_PROXIES                   proxies whose X-Forwarded-For names the client
  REDIS_URL, REDIS_CA_CERT          several servers behind one URL (none: history in memory)
  HISTORY_MAX_AGE_SECS              history kept for apps that reconnect (600)
  HISTORY_MAX_BYTES                 the same, in bytes (64 MiB)
  APP_BUFFER                        events an app may have waiting before it is dropped (256)
  RUST_LOG                          log filter (info)
";

/// The program: `--help` and `--version`; otherwise a `tracing` subscriber on standard
/// output (`RUST_LOG`, default `info`), then [`run_from_env`]; a wrong setting is printed
/// with its fix, and the process exits with status 2.
#[doc(hidden)]
pub async fn main() -> std::process::ExitCode {
    if let Some(arg) = std::env::args().nth(1) {
        return match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::ExitCode::SUCCESS
            }
            "-V" | "--version" => {
                println!("vendora-observe-server {}", env!("CARGO_PKG_VERSION"));
                std::process::ExitCode::SUCCESS
            }
            other => {
                eprintln!(
                    "error: unknown argument {other:?}: the server takes its settings from the \
                     environment; see vendora-observe-server --help"
                );
                std::process::ExitCode::from(2)
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .try_init();
    match run_from_env().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", vendora_observe::ErrorChain(&e));
            std::process::ExitCode::from(2)
        }
    }
}
