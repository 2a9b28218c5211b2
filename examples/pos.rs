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
//! prints each event as an app would see it, then checks that exactly the scenario's 11
//! events arrived, in order, correctly signed. Exits 0 when they did.

use std::process::ExitCode;
use std::time::Duration;

use vendora_observe::{Observer, WebhookConfig};
use vendora_pos::db;
use vendora_pos::receiver::{Receiver, Request};
use vendora_pos::scenario::{self, EXPECTED, Step};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_target(false)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

async fn run() -> Result<(), Error> {
    // Our own receiver unless a WebSocket server is configured.
    let (config, receiver) = match server_configured() {
        true => (WebhookConfig::from_env()?, None),
        false => {
            let secret = std::env::var("WEBHOOK_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("demo-{:016x}", fastrand_u64()));
            let receiver = Receiver::start(&secret).await?;
            println!(
                "receiver: listening on {} (verifies X-Webhook-Signature)",
                receiver.url()
            );
            let config = WebhookConfig::builder()
                .url(receiver.url())
                .secret(secret)
                .build()?;
            (config, Some(receiver))
        }
    };
    println!("sending to {}", config.url());
    let outbox_file = outbox_file()?;
    let db = match &outbox_file {
        Some(path) => {
            // A fresh file each run, so the scenario's ids and events are the same.
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            db::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?
        }
        None => db::connect("sqlite::memory:").await?,
    };
    db::create_pos_tables(&db).await?;
    let observer = match &outbox_file {
        Some(path) => {
            println!("mode: outbox in {}", path.display());
            Observer::builder(config).outbox(db.clone()).build().await?
        }
        None => {
            println!("mode: direct (in-memory queue)");
            Observer::builder(config).build().await?
        }
    };
    observer.install();
    let mut shown = 0;
    let mut n = 0;
    scenario::run(&db, outbox_file.is_some(), async |step: Step| {
        n += 1;
        println!("\n{n:>2}. {}", step.label);
        show(&receiver, &mut shown, step.events).await;
    })
    .await?;

    let delivered = observer.flush(Duration::from_secs(15)).await;
    let stats = observer.shutdown(Duration::from_secs(5)).await.stats;
    println!(
        "\nobserver: sent {}, retried {}, dead {}, shed {}, pending {}",
        stats.sent, stats.retried, stats.dead, stats.shed, stats.pending
    );
    if !delivered || stats.sent != EXPECTED.len() as u64 {
        return Err(format!(
            "expected {} webhooks delivered, got {}",
            EXPECTED.len(),
            stats.sent
        )
        .into());
    }
    if let Some(receiver) = &receiver {
        let got = receiver.requests();
        let names: Vec<String> = got.iter().map(Request::event).collect();
        if names != EXPECTED || !got.iter().all(|r| r.signature_ok) {
            return Err(format!("the receiver saw {names:?}").into());
        }
        println!(
            "receiver: exactly the {} expected events, in order, every signature valid",
            got.len()
        );
    }
    Ok(())
}

/// Prints the next `n` events the receiver got, as an app would see them.
async fn show(receiver: &Option<Receiver>, shown: &mut usize, n: usize) {
    let Some(receiver) = receiver else { return };
    if n == 0 {
        return;
    }
    let got = receiver
        .wait_delivered(*shown + n, Duration::from_secs(10))
        .await;
    for r in &got[*shown..] {
        let sig = if r.signature_ok {
            "signature ok"
        } else {
            "BAD SIGNATURE"
        };
        println!("    app <- {:<17} {}  ({sig})", r.event(), r.data());
    }
    *shown = got.len();
}

/// `--outbox [FILE]`: the SQLite file of outbox mode.
fn outbox_file() -> Result<Option<std::path::PathBuf>, Error> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => Ok(None),
        Some("--outbox") => Ok(Some(
            args.next()
                .map(Into::into)
                .unwrap_or_else(|| "pos-outbox.sqlite".into()),
        )),
        Some(other) => {
            Err(format!("unknown argument {other:?}; usage: pos [--outbox [FILE]]").into())
        }
    }
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

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
