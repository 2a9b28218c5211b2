//! `vendora-observe listen`: a receiver that verifies, prints what it gets, and serves the
//! live page.

use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use vendora_observe::trace::TraceParent;
use vendora_observe_server::http::{self as server, Limits};
use vendora_observe_server::live::Outcome;
use vendora_observe_server::live::{self, Feed, Seen, Transport};
use vendora_observe_server::{Claim, Dedupe, Verifier, escaped};

use crate::{Error, secrets_from_env};

struct Listening {
    verifier: Verifier,
    seen: Dedupe,
    /// The live page's records.
    feed: Arc<Feed>,
}

pub(crate) async fn listen(
    port: u16,
    secret_stdin: bool,
    accept_legacy: bool,
) -> Result<ExitCode, Error> {
    let secrets = secrets_from_env(secret_stdin)?;
    // The live page's token: random, printed once, never sent anywhere else.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let feed = Feed::new(token.clone());
    let state = Arc::new(Listening {
        verifier: Verifier::new(secrets).require_standard_headers(!accept_legacy),
        seen: Dedupe::default(),
        feed: feed.clone(),
    });
    // `GET /` is the page; a POST to any path is a webhook; nothing else is (a browser's
    // `/favicon.ico` is not a refused webhook).
    let app = Router::new()
        .route("/", live::page(Transport::EventSource).post(on_webhook))
        .merge(live::assets())
        .merge(feed.routes())
        .fallback(any_path)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            format!("cannot listen on 127.0.0.1:{port} ({e}); choose another with --port")
        })?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr} (Ctrl-C to stop)");
    // In the fragment: browsers never send it, so no proxy logs it.
    println!("live page: http://{addr}/#token={token}");
    if accept_legacy {
        eprintln!(
            "warning: --accept-legacy-signatures: webhooks signed only with X-Webhook-Signature \
             are accepted, and a captured one can be replayed under a new id"
        );
    }
    server::serve(listener, app, Limits::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn any_path(
    state: State<Arc<Listening>>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    if method != axum::http::Method::POST {
        return (StatusCode::NOT_FOUND, "not found: webhooks are POSTs");
    }
    on_webhook(state, headers, body).await
}

async fn on_webhook(
    State(state): State<Arc<Listening>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let id = escaped(
        header("x-webhook-id")
            .or(header("webhook-id"))
            .unwrap_or("-"),
    );
    let trace_id = header("traceparent")
        .and_then(TraceParent::parse)
        .map(|t| t.trace_id());
    match state.verifier.verify(header, &body) {
        Ok(event) => {
            let again = match event.id.as_deref().map(|id| state.seen.claim(id)) {
                Some(Claim::First(ticket)) => {
                    ticket.done();
                    ""
                }
                Some(_) => " (redelivery)",
                None => "",
            };
            let outcome = if again.is_empty() {
                Outcome::Received
            } else {
                Outcome::Duplicate
            };
            state.feed.push(Seen::verified(
                &event.event,
                &event.data,
                event.id.as_deref(),
                outcome,
                trace_id,
            ));
            let pretty = serde_json::to_string_pretty(&event.data).unwrap_or_default();
            println!(
                "✓ {}  id={id}  signature ok{again}\n{}",
                escaped(&event.event),
                pretty.lines().map(escaped).collect::<Vec<_>>().join("\n")
            );
            (StatusCode::OK, "ok")
        }
        Err(rejection) => {
            state.feed.push(Seen::refused(rejection.to_string()));
            println!(
                "✗ {rejection} (answered {})  id={id}  body: {}",
                rejection.status(),
                escaped(
                    &String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                )
            );
            (
                StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST),
                "rejected",
            )
        }
    }
}
