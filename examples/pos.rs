//! The POS demo: a product catalogue on embedded SQLite whose every change reaches the
//! apps as a signed webhook.
//!
//! ```text
//! cargo run --example pos                  # starts its own receiver on 127.0.0.1
//! cargo run --example pos -- --outbox      # outbox mode on a SQLite file (pos-outbox.sqlite)
//! cargo run --example pos -- --outbox my.sqlite
//! WEBSOCKET_SERVER_URL=http://localhost:3001 WEBHOOK_SECRET=… cargo run --example pos
//! ```
//!
//! In outbox mode one more step creates a product inside a transaction and rolls it back:
//! its webhook is never sent, and the delivered sequence is the same.
//!
//! Without `WEBSOCKET_SERVER_URL` it starts a receiver that verifies every signature and
//! prints each event as an app would see it, then checks that exactly the scenario's 12
//! events arrived, in order, correctly signed. Exits 0 when they did. The code is
//! `vendora_pos::demo`, which the tests run too.

use std::process::ExitCode;

use vendora_observe::WebhookConfig;
use vendora_pos::demo::{Demo, Error};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_target(false)
        .init();
    match demo() {
        Ok(demo) => match demo.run(&mut std::io::stdout()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo the command line asks for.
fn demo() -> Result<Demo, Error> {
    let mut args = std::env::args().skip(1);
    let outbox = match args.next().as_deref() {
        None => None,
        Some("--outbox") => Some(
            args.next()
                .map(Into::into)
                .unwrap_or_else(|| "pos-outbox.sqlite".into()),
        ),
        Some(other) => {
            return Err(format!("unknown argument {other:?}; usage: pos [--outbox [FILE]]").into());
        }
    };
    // A WebSocket server configured in the environment or .env: send there.
    let server = server_configured()
        .then(WebhookConfig::from_env)
        .transpose()?;
    Ok(Demo { server, outbox })
}

/// Whether a WebSocket server is configured, in the environment or in `.env`.
fn server_configured() -> bool {
    if std::env::var_os("WEBSOCKET_SERVER_URL").is_some() {
        return true;
    }
    dotenvy::from_filename_iter(".env")
        .map(|vars| {
            vars.flatten()
                .any(|(k, v)| k == "WEBSOCKET_SERVER_URL" && !v.is_empty())
        })
        .unwrap_or(false)
}
