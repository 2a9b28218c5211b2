//! `vendora-observe`: send, receive and verify Vendora webhooks, and look after the outbox.
//!
//! Configuration comes from the same environment and `.env` as the library
//! (`WEBSOCKET_SERVER_URL`, `WEBHOOK_SECRET`, `WEBHOOK_TIMEOUT_MS`, `DATABASE_URL`).

mod listen;
mod outbox;

use std::io::Read;
use std::process::ExitCode;
use std::time::Instant;

use axum::http::StatusCode;
use clap::{Parser, Subcommand};
use vendora_observe::{DeliveryError, ErrorChain, WebhookConfig, WebhookService};

use listen::listen;
use outbox::{OutboxCommand, run_outbox};

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
