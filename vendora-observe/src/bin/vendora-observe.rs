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
use vendora_observe::receiver::server::{self, Limits};
use vendora_observe::receiver::{Claim, Dedupe, Verifier};
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
        /// The secret to verify with [default: WEBHOOK_SECRET, and WEBHOOK_PREVIOUS_SECRETS]
        #[arg(long)]
        secret: Option<String>,
        /// Refuse webhooks without Standard Webhooks headers (replay protection)
        #[arg(long)]
        require_standard_headers: bool,
    },
    /// Check an X-Webhook-Signature against a body (FILE, or standard input), with the
    /// secret from WEBHOOK_SECRET (environment or .env), or the first line of standard
    /// input with --secret-stdin
    Verify {
        /// The X-Webhook-Signature value (hex)
        #[arg(long)]
        signature: String,
        /// Read the secret from the first line of standard input (the body then comes from
        /// FILE)
        #[arg(long)]
        secret_stdin: bool,
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
        Command::Listen {
            port,
            secret,
            require_standard_headers,
        } => listen(port, secret, require_standard_headers).await,
        Command::Verify {
            signature,
            secret_stdin,
            file,
        } => verify(&signature, secret_stdin, file.as_deref()),
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
    verifier: Verifier,
    seen: Dedupe,
}

/// The secrets to verify with: `--secret`, or `WEBHOOK_SECRET` and
/// `WEBHOOK_PREVIOUS_SECRETS` from the environment or `.env` (read, not loaded).
fn secrets_from_env(given: Option<String>) -> Result<Vec<String>, Error> {
    if let Some(secret) = given.filter(|s| !s.is_empty()) {
        return Ok(vec![secret]);
    }
    let dotenv: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
        .map(|vars| vars.flatten().collect())
        .unwrap_or_default();
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .or_else(|| dotenv.get(name).cloned())
    };
    let mut secrets: Vec<String> = var("WEBHOOK_SECRET")
        .filter(|s| !s.is_empty())
        .into_iter()
        .collect();
    if secrets.is_empty() {
        return Err(
            "no secret: set WEBHOOK_SECRET (in the environment or .env), or pass --secret".into(),
        );
    }
    if let Some(previous) = var("WEBHOOK_PREVIOUS_SECRETS") {
        secrets.extend(
            previous
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
    }
    Ok(secrets)
}

async fn listen(
    port: u16,
    secret: Option<String>,
    require_standard: bool,
) -> Result<ExitCode, Error> {
    let secrets = secrets_from_env(secret)?;
    let state = Arc::new(Listening {
        verifier: Verifier::new(secrets).require_standard_headers(require_standard),
        seen: Dedupe::default(),
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
    server::serve(listener, app, Limits::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Text from the network, made safe to print: control characters (escape sequences,
/// carriage returns, bidi overrides) are shown as `\u{…}`, so a request cannot forge lines
/// or rewrite the terminal.
fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
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
            let pretty = serde_json::to_string_pretty(&event.data).unwrap_or_default();
            println!(
                "✓ {}  id={id}  signature ok{again}\n{}",
                escaped(&event.event),
                pretty.lines().map(escaped).collect::<Vec<_>>().join("\n")
            );
            (StatusCode::OK, "ok")
        }
        Err(rejection) => {
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

fn verify(signature: &str, secret_stdin: bool, file: Option<&str>) -> Result<ExitCode, Error> {
    let mut stdin = std::io::stdin().lock();
    let secret = if secret_stdin {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdin, &mut line)?;
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Err("--secret-stdin: the first line of standard input is empty".into());
        }
        if matches!(file, None | Some("-")) {
            return Err(
                "--secret-stdin reads the secret from standard input: give the body as FILE".into(),
            );
        }
        line
    } else {
        secrets_from_env(None)?.remove(0)
    };
    let body = match file {
        None | Some("-") => {
            let mut buf = Vec::new();
            stdin.read_to_end(&mut buf)?;
            buf
        }
        Some(path) => std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?,
    };
    // The expected signature is never printed: it would hand a valid signature for any
    // body to whoever can run this command.
    if vendora_observe::verify(secret.as_bytes(), &body, signature) {
        println!("valid: the signature matches the {} B body", body.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "invalid: the signature does not match the {} B body with this secret",
            body.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

async fn run_outbox(command: OutboxCommand) -> Result<ExitCode, Error> {
    let dotenv: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
        .map(|vars| vars.flatten().collect())
        .unwrap_or_default();
    let url = std::env::var("DATABASE_URL")
        .ok()
        .or_else(|| dotenv.get("DATABASE_URL").cloned())
        .ok_or(())
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
