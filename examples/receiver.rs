//! The receiver twin: the Rust counterpart of the Node.js WebSocket server. It verifies each
//! webhook's signature over the raw body (constant time), refuses what is not JSON or too
//! large, drops redeliveries by `X-Webhook-Id`, and rebroadcasts `event` with `data` to
//! every socket.io client (the apps use the socket.io v4 JavaScript client).
//!
//! ```text
//! WEBHOOK_SECRET=… cargo run --example receiver            # port 3001, or PORT=…
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use vendora_observe::receiver::{Dedupe, verify_request};

const MAX_BODY: usize = 1 << 20;

struct App {
    secret: Vec<u8>,
    seen: Dedupe,
    io: SocketIo,
}

async fn webhook(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = match verify_request(
        &app.secret,
        header("content-type"),
        header("x-webhook-signature"),
        &body,
        MAX_BODY,
    ) {
        Ok(e) => e,
        Err(rejection) => {
            eprintln!("refused: {rejection}");
            let status =
                StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return (status, format!("{{\"error\":\"{rejection}\"}}"));
        }
    };
    if let Some(id) = header("x-webhook-id")
        && !app.seen.first_time(id)
    {
        return (StatusCode::OK, r#"{"ok":true,"duplicate":true}"#.to_owned());
    }
    println!("broadcast {} {}", event.event, event.data);
    if let Err(e) = app.io.emit(event.event.as_str(), &event.data).await {
        eprintln!("broadcast failed: {e}");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"broadcast failed"}"#.to_owned(),
        );
    }
    (StatusCode::OK, r#"{"ok":true}"#.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = match std::env::var("WEBHOOK_SECRET") {
        Ok(s) if !s.is_empty() => s,
        _ => {
            eprintln!("error: WEBHOOK_SECRET is not set: set it to the backend's secret");
            std::process::exit(2);
        }
    };
    let port: u16 = match std::env::var("PORT").ok().map(|p| p.parse()) {
        None => 3001,
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            eprintln!("error: PORT must be a port number, e.g. PORT=3001");
            std::process::exit(2);
        }
    };
    let (layer, io) = SocketIo::new_layer();
    io.ns("/", async |socket: SocketRef| {
        println!("app connected: {}", socket.id);
    });
    let app = Arc::new(App {
        secret: secret.into_bytes(),
        seen: Dedupe::new(100_000),
        io,
    });
    let router = Router::new()
        .route("/", post(webhook))
        .route("/webhook", post(webhook))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
        .layer(layer);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
