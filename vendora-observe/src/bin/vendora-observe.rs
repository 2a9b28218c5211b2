//! `vendora-observe`: send, receive and verify Vendora webhooks, and look after the outbox.
//!
//! Configuration comes from the same environment and `.env` as the library
//! (`WEBSOCKET_SERVER_URL`, `WEBHOOK_SECRET`, `WEBHOOK_TIMEOUT_MS`, `DATABASE_URL`).

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::{Parser, Subcommand};
use vendora_observe::receiver::{Dedupe, verify_request};
use vendora_observe::{DeliveryError, WebhookConfig, WebhookService, outbox};

#[derive(Parser)]
#[command(
    name = "vendora-observe",
    version,
    about = "Send, receive and verify Vendora webhooks, and look after the outbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sign EVENT with JSON data and POST it to WEBSOCKET_SERVER_URL
    Send {
        /// The event name, e.g. product:updated
        event: String,
        /// The data, as JSON, e.g. '{"id": 1}'
        json: String,
    },
    /// Receive webhooks on 127.0.0.1, verify and pretty-print each one
    Listen {
        /// The port to listen on
        #[arg(long, default_value_t = 3001)]
        port: u16,
        /// The secret to verify with [default: WEBHOOK_SECRET]
        #[arg(long)]
        secret: Option<String>,
    },
    /// Check an X-Webhook-Signature against a body (FILE, or standard input)
    Verify {
        /// The shared secret
        #[arg(long)]
        secret: String,
        /// The X-Webhook-Signature value (hex)
        #[arg(long)]
        signature: String,
        /// The body file; `-` or nothing for standard input
        file: Option<String>,
    },
    /// Inspect and repair the outbox in DATABASE_URL
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Count rows by status
    Status,
    /// List dead rows with their last error
    Dead {
        /// Rows to show at most
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// Put a dead row (or all of them with --all) back in the queue
    Retry {
        /// The row id, as `outbox dead` shows it
        id: Option<i64>,
        /// Requeue every dead row
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete delivered rows older than --older-than seconds
    Purge {
        #[arg(long, default_value_t = 0)]
        older_than: u64,
    },
}

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Send { event, json } => send(&event, &json).await,
        Command::Listen { port, secret } => listen(port, secret).await,
        Command::Verify {
            secret,
            signature,
            file,
        } => verify(&secret, &signature, file.as_deref()),
        Command::Outbox { command } => run_outbox(command).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn send(event: &str, json: &str) -> Result<ExitCode, Error> {
    let data: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("the data is not valid JSON ({e}); quote it like '{{\"id\": 1}}'"))?;
    let service = WebhookService::new(WebhookConfig::from_env()?)?;
    let started = Instant::now();
    match service.try_dispatch(event, &data).await {
        Ok(delivered) => {
            println!(
                "{} {} in {:.1} ms",
                service.endpoint_for_logs(),
                reqwest::StatusCode::from_u16(delivered.status)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| delivered.status.to_string()),
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let hint = match &e {
                DeliveryError::Status { status: 401, .. } => {
                    "\nhint: the server rejected the signature: WEBHOOK_SECRET differs from the server's"
                }
                DeliveryError::Connect { .. } => {
                    "\nhint: is the WebSocket server running, and is WEBSOCKET_SERVER_URL right?"
                }
                _ => "",
            };
            eprintln!(
                "error: {} after {:.1} ms: {e}{hint}",
                service.endpoint_for_logs(),
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

struct Listening {
    secret: Vec<u8>,
    seen: Dedupe,
}

async fn listen(port: u16, secret: Option<String>) -> Result<ExitCode, Error> {
    let _ = dotenvy::dotenv();
    let secret = secret
        .or_else(|| std::env::var("WEBHOOK_SECRET").ok())
        .filter(|s| !s.is_empty())
        .ok_or("no secret: pass --secret or set WEBHOOK_SECRET")?;
    let state = Arc::new(Listening {
        secret: secret.into_bytes(),
        seen: Dedupe::new(100_000),
    });
    let app = Router::new().fallback(on_webhook).with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            format!("cannot listen on 127.0.0.1:{port} ({e}); choose another with --port")
        })?;
    println!(
        "listening on http://{} (Ctrl-C to stop)",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

async fn on_webhook(
    State(state): State<Arc<Listening>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let id = header("x-webhook-id").unwrap_or("-").to_owned();
    match verify_request(
        &state.secret,
        header("content-type"),
        header("x-webhook-signature"),
        &body,
        4 << 20,
    ) {
        Ok(event) => {
            let again = if state.seen.first_time(&id) {
                ""
            } else {
                " (redelivery)"
            };
            let pretty = serde_json::to_string_pretty(&event.data).unwrap_or_default();
            println!("✓ {}  id={id}  signature ok{again}\n{pretty}", event.event);
            (StatusCode::OK, "ok")
        }
        Err(rejection) => {
            println!(
                "✗ {rejection} (answered {})  id={id}  body: {}",
                rejection.status(),
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            );
            (
                StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST),
                "rejected",
            )
        }
    }
}

fn verify(secret: &str, signature: &str, file: Option<&str>) -> Result<ExitCode, Error> {
    let body = match file {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
        Some(path) => std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?,
    };
    if vendora_observe::verify(secret.as_bytes(), &body, signature) {
        println!("valid: the signature matches the {} B body", body.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "invalid: the signature does not match the {} B body (expected {})",
            body.len(),
            vendora_observe::sign(secret.as_bytes(), &body)
        );
        Ok(ExitCode::FAILURE)
    }
}

async fn run_outbox(command: OutboxCommand) -> Result<ExitCode, Error> {
    let _ = dotenvy::dotenv();
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set: set it to the database that holds vendora_outbox")?;
    let db = sea_orm::Database::connect(&url)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {e}"))?;
    if !outbox::table_exists(&db).await? {
        return Err(format!(
            "DATABASE_URL has no {} table: point it at the application's database, where an \
             outbox-mode observer has started",
            outbox::TABLE
        )
        .into());
    }
    match command {
        OutboxCommand::Status => {
            let c = outbox::counts(&db).await?;
            println!(
                "pending    {}\ndelivered  {}\ndead       {}",
                c.pending, c.delivered, c.dead
            );
        }
        OutboxCommand::Dead { limit } => {
            let rows = outbox::dead(&db, limit).await?;
            if rows.is_empty() {
                println!("no dead rows");
            }
            for r in rows {
                println!(
                    "{:>6}  {}  {}  attempts={}  {}\n        {}",
                    r.id,
                    r.event,
                    r.event_id,
                    r.attempts,
                    r.last_error.unwrap_or_default(),
                    r.body
                );
            }
        }
        OutboxCommand::Retry { id, all } => {
            if id.is_none() && !all {
                return Err("name a row id (see `outbox dead`) or pass --all".into());
            }
            let done = outbox::requeue(&db, id).await?;
            if done.requeued == 0 && done.superseded == 0 {
                return Err(match id {
                    Some(id) => format!("no dead row with id {id}").into(),
                    None => "no dead rows".into(),
                });
            }
            println!("requeued {} row(s)", done.requeued);
            if done.superseded > 0 {
                println!(
                    "not requeued: {} row(s) whose row has a newer event on its way (marked \
                     superseded; resending them would leave the apps on stale data)",
                    done.superseded
                );
            }
        }
        OutboxCommand::Purge { older_than } => {
            let n = outbox::purge_delivered(&db, Duration::from_secs(older_than)).await?;
            println!("deleted {n} delivered row(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
