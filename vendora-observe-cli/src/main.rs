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
use vendora_observe::trace::TraceParent;
use vendora_observe::{DeliveryError, ErrorChain, WebhookConfig, WebhookService, outbox};
use vendora_observe_server::http::{self as server, Limits};
use vendora_observe_server::live::Outcome;
use vendora_observe_server::live::{self, Feed, Seen, Transport};
use vendora_observe_server::{Claim, Dedupe, Verifier, escaped};

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
    /// Receive webhooks on 127.0.0.1, verify and pretty-print each one; a live page at / (its
    /// address, with a token, is printed at start)
    Listen {
        /// The port to listen on
        #[arg(long, default_value_t = 3001)]
        port: u16,
        /// Read the secret from the first line of standard input [default: WEBHOOK_SECRET,
        /// and WEBHOOK_PREVIOUS_SECRETS]
        #[arg(long)]
        secret_stdin: bool,
        /// Accept webhooks without the Standard Webhooks headers (an old sender): a captured
        /// one can then be replayed under a new id
        #[arg(long)]
        accept_legacy_signatures: bool,
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
    /// Pending rows, the oldest one's age, the delivery rate and dead rows, refreshed every
    /// second, with a progress bar while a backlog drains
    Watch {
        /// Milliseconds between refreshes
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
        interval: u64,
        /// Stop after this many refreshes (default: until Ctrl-C)
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print rows as they are delivered, superseded or given up on (dead)
    Tail {
        /// Stop after this many rows (default: until Ctrl-C)
        #[arg(long)]
        count: Option<u64>,
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
            secret_stdin,
            accept_legacy_signatures,
        } => listen(port, secret_stdin, accept_legacy_signatures).await,
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
            eprintln!("error: {}", ErrorChain(&*e));
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
                StatusCode::from_u16(delivered.status)
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
                "error: {} after {:.1} ms: {}{hint}",
                service.endpoint_for_logs(),
                started.elapsed().as_secs_f64() * 1000.0,
                ErrorChain(&e)
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

struct Listening {
    verifier: Verifier,
    seen: Dedupe,
    /// The live page's records.
    feed: Arc<Feed>,
}

/// The secrets to verify with: the first line of standard input (`--secret-stdin`), or
/// `WEBHOOK_SECRET` and `WEBHOOK_PREVIOUS_SECRETS` from the environment or `.env` (read,
/// not loaded). Never from the arguments, which `ps` shows to every user.
fn secrets_from_env(from_stdin: bool) -> Result<Vec<String>, Error> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let secret = line.trim_end_matches(['\r', '\n']).to_owned();
        if secret.is_empty() {
            return Err(
                "--secret-stdin: the first line of standard input is empty; pipe the secret in"
                    .into(),
            );
        }
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
            "no secret: set WEBHOOK_SECRET (in the environment or .env), or pipe it in with \
             --secret-stdin"
                .into(),
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

async fn listen(port: u16, secret_stdin: bool, accept_legacy: bool) -> Result<ExitCode, Error> {
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
        secrets_from_env(false)?.remove(0)
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
        OutboxCommand::Watch { interval, count } => {
            watch(&db, Duration::from_millis(interval), count).await?;
        }
        OutboxCommand::Tail { count } => tail(&db, count).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The rate is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// `outbox watch`: one line per refresh; on a terminal, one line redrawn in place.
async fn watch(
    db: &sea_orm::DatabaseConnection,
    interval: Duration,
    count: Option<u64>,
) -> Result<(), Error> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    // The backlog being drained: the most pending rows seen since it began.
    let mut backlog = 0u64;
    let mut refreshes = 0u64;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let pending = outbox::pending(db).await?;
        let dead = outbox::dead_count(db).await?;
        let oldest = outbox::oldest_pending(db).await?;
        let now = now_ms();
        let window = RATE_WINDOW.as_millis() as i64;
        let rate = outbox::finished_count_since(db, now - window).await? as f64
            / RATE_WINDOW.as_secs_f64();
        backlog = if pending == 0 {
            0
        } else {
            backlog.max(pending)
        };
        let age = oldest
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let mut line =
            format!("pending {pending}  oldest {age}  delivering {rate:.1}/s  dead {dead}");
        if backlog > pending || (pending > 0 && rate > 0.0) {
            line.push_str("  ");
            line.push_str(&progress(backlog, pending, rate));
        }
        if tty {
            print!("\r\x1b[2K{line}");
            std::io::Write::flush(&mut std::io::stdout())?;
        } else {
            println!("{line}");
        }
        refreshes += 1;
        if count.is_some_and(|c| refreshes >= c) {
            break;
        }
    }
    if tty {
        println!();
    }
    Ok(())
}

/// `[########............]  40%  ETA 12 s`: how much of the backlog has drained.
fn progress(backlog: u64, pending: u64, rate: f64) -> String {
    const WIDTH: usize = 24;
    let done = backlog.saturating_sub(pending) as f64 / backlog.max(1) as f64;
    let filled = (done * WIDTH as f64).round() as usize;
    let eta = if rate > 0.0 {
        format!("ETA {:.0} s", pending as f64 / rate)
    } else {
        "ETA -".into()
    };
    format!(
        "[{}{}] {:>3.0}%  {eta}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        done * 100.0
    )
}

/// `outbox tail`: rows as they finish, from now on.
async fn tail(db: &sea_orm::DatabaseConnection, count: Option<u64>) -> Result<(), Error> {
    use std::collections::HashSet;
    let mut since = now_ms();
    // Rows already printed at `since` (several finish in the same millisecond).
    let mut at_since: HashSet<i64> = HashSet::new();
    let mut dead_seen: HashSet<i64> = outbox::dead(db, 100_000)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    println!(
        "following {} from now: rows as they are delivered, superseded or dead (Ctrl-C to stop)",
        outbox::TABLE
    );
    let mut printed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let mut rows = Vec::new();
        for r in outbox::finished_since(db, since, 1_000).await? {
            if r.delivered_at == Some(since) && at_since.contains(&r.id) {
                continue;
            }
            let at = r.delivered_at.unwrap_or(since);
            if at > since {
                since = at;
                at_since.clear();
            }
            at_since.insert(r.id);
            rows.push(r);
        }
        // The dead rows are read again only when their count changed (one index count);
        // `dead_seen` holds the rows dead now, so a requeue does not make every poll read.
        if outbox::dead_count(db).await? != dead_seen.len() as u64 {
            let dead = outbox::dead(db, 100_000).await?;
            let now: HashSet<i64> = dead.iter().map(|r| r.id).collect();
            rows.extend(dead.into_iter().filter(|r| !dead_seen.contains(&r.id)));
            dead_seen = now;
        }
        for r in rows {
            let latency = r
                .delivered_at
                .map(|d| format!("  after {} ms", d - r.created_at))
                .unwrap_or_default();
            let error = r
                .last_error
                .as_deref()
                .filter(|_| r.status == outbox::OutboxStatus::Dead)
                .map(|e| format!("  {}", escaped(e)))
                .unwrap_or_default();
            println!(
                "{:<10}  {:>6}  {:<20}  {:<16}  {}  attempts={}{latency}{error}",
                r.status,
                r.id,
                escaped(&r.event),
                escaped(&r.ordering_key),
                escaped(&r.event_id),
                r.attempts,
            );
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}
