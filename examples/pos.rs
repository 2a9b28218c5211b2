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

use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, ModelTrait, Set, TransactionTrait,
};
use vendora_observe::{Observer, WebhookConfig};
use vendora_pos::db;
use vendora_pos::entities::{category, order, product};
use vendora_pos::receiver::{Receiver, Request};

const EXPECTED: [&str; 11] = [
    "category:created",
    "product:created",
    "product:updated",
    "product:updated",
    "stock:updated",
    "product:updated",
    "order:created",
    "order:updated",
    "category:updated",
    "product:deleted",
    "category:deleted",
];

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
    let step = |n: u32, what: &str| println!("\n{n:>2}. {what}");

    step(1, "create category \"Beverages\"");
    let beverages = category::ActiveModel {
        id: NotSet,
        name: Set("Beverages".into()),
    }
    .insert(&db)
    .await?;
    show(&receiver, &mut shown, 1).await;

    step(2, "create product \"Espresso beans\", stock 10, price 12.5");
    let beans = product::ActiveModel {
        id: NotSet,
        name: Set("Espresso beans".into()),
        price: Set(12.5),
        stock: Set(10),
        category_id: Set(Some(beverages.id)),
        ..Default::default()
    }
    .insert(&db)
    .await?;
    show(&receiver, &mut shown, 1).await;

    if outbox_file.is_some() {
        println!("\n 2b. create a product inside a transaction, then roll back (nothing is sent)");
        let txn = db.begin().await?;
        product::ActiveModel {
            id: NotSet,
            name: Set("Never sold".into()),
            price: Set(1.0),
            stock: Set(1),
            category_id: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        txn.rollback().await?;
    }

    step(3, "rename the product");
    let mut am = beans.into_active_model();
    am.name = Set("Espresso beans 1 kg".into());
    let beans = am.update(&db).await?;
    show(&receiver, &mut shown, 1).await;

    step(4, "sell three: stock 10 -> 7");
    let mut am = beans.into_active_model();
    am.stock = Set(7);
    let beans = am.update(&db).await?;
    show(&receiver, &mut shown, 2).await;

    step(5, "set stock to 7 again (not a change)");
    let mut am = beans.into_active_model();
    am.stock = Set(7);
    let beans = am.update(&db).await?;
    show(&receiver, &mut shown, 1).await;

    step(6, "create an order for it");
    let sale = order::ActiveModel {
        id: NotSet,
        product_id: Set(beans.id),
        quantity: Set(3),
        status: Set("pending".into()),
        total: Set(37.5),
    }
    .insert(&db)
    .await?;
    show(&receiver, &mut shown, 1).await;

    step(7, "mark the order paid");
    let mut am = sale.into_active_model();
    am.status = Set("paid".into());
    am.update(&db).await?;
    show(&receiver, &mut shown, 1).await;

    step(8, "rename the category");
    let mut am = beverages.into_active_model();
    am.name = Set("Hot beverages".into());
    let beverages = am.update(&db).await?;
    show(&receiver, &mut shown, 1).await;

    step(9, "delete the product");
    beans.delete(&db).await?;
    show(&receiver, &mut shown, 1).await;

    step(10, "delete the category");
    beverages.delete(&db).await?;
    show(&receiver, &mut shown, 1).await;

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
