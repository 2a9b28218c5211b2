//! The child processes of the end-to-end tests: programs that are killed, that start at
//! the same time as others, or that exit in a particular way. Not a tool for users.
//!
//! ```text
//! vendora-test-child crash-writer DB_URL HOOK_URL [LEASE_S]  # outbox writes in transactions until killed, "committed N"
//! vendora-test-child schema                         # per stdin URL: "ready", wait "go", create
//! vendora-test-child write HOOK_URL SECRET N [exit|shutdown]  # N products, no tracing subscriber
//! vendora-test-child no-observer                    # writes with no observer installed
//! ```

use std::io::BufRead;
use std::time::Duration;

use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, Set, TransactionTrait};
use vendora_observe::{Observer, OutboxOptions, RetryPolicy, WebhookConfig};
use vendora_pos::db;
use vendora_pos::entities::product;

fn product(name: &str, stock: i32) -> product::ActiveModel {
    product::ActiveModel {
        id: NotSet,
        name: Set(name.to_owned()),
        price: Set(1.5),
        stock: Set(stock),
        category_id: Set(None),
        ..Default::default()
    }
}

fn config(url: &str, secret: &str) -> WebhookConfig {
    WebhookConfig::builder()
        .url(url)
        .secret(secret)
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a valid test configuration")
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(20)
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(200))
        .max_retry_after(Duration::from_secs(2))
        .probe_interval(Duration::from_millis(100))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(0) {
        "crash-writer" => {
            let lease = arg(3).parse().unwrap_or(3);
            crash_writer(arg(1), arg(2), Duration::from_secs(lease)).await
        }
        "schema" => schema().await,
        "write" => {
            let n = arg(3).parse().expect("N");
            write(arg(1), arg(2), n, arg(4) == "shutdown").await
        }
        "no-observer" => no_observer().await,
        other => panic!("unknown child {other:?}"),
    }
}

/// Outbox writes, one insert per transaction, printing each commit, until killed.
async fn crash_writer(db_url: &str, hook_url: &str, lease: Duration) {
    let db = db::connect(db_url).await.unwrap();
    let mut options = OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_millis(50);
    options.lease = lease;
    let observer = Observer::builder(config(hook_url, "test-secret-0123456789"))
        .retry(fast_retries())
        .outbox_options(options)
        .build()
        .await
        .unwrap();
    observer.install();
    // In transactions: the row and its event commit together, so that every row found
    // after the kill has an event to deliver (an autocommit insert has a window between
    // the two, see the README's delivery guarantees).
    for i in 0.. {
        let txn = db.begin().await.unwrap();
        product(&format!("crash {i}"), i)
            .insert(&txn)
            .await
            .unwrap();
        txn.commit().await.unwrap();
        println!("committed {i}");
    }
}

/// For each database URL on stdin: connects, says "ready", waits for "go", creates the
/// outbox table and says "ok" or the error.
async fn schema() {
    let mut lines = std::io::stdin().lock().lines();
    while let Some(Ok(url)) = lines.next() {
        let db = db::connect(&url).await.unwrap();
        println!("ready");
        let Some(Ok(_go)) = lines.next() else {
            return;
        };
        match vendora_observe::outbox::create_table(&db).await {
            Ok(()) => println!("ok"),
            Err(e) => println!("error {e}"),
        }
        db.close().await.unwrap();
    }
}

/// Writes `n` products through an installed direct-mode observer, with no tracing
/// subscriber, then shuts down properly or just returns from main.
async fn write(hook_url: &str, secret: &str, n: i32, shutdown: bool) {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let observer = Observer::builder(config(hook_url, secret))
        .retry(fast_retries())
        .build()
        .await
        .unwrap();
    observer.install();
    for i in 0..n {
        product(&format!("p{i}"), i).insert(&db).await.unwrap();
    }
    println!("written {n}");
    if shutdown {
        let report = observer.shutdown(Duration::from_secs(10)).await;
        println!("shutdown drained={}", report.drained);
    }
}

/// Writes with no observer installed.
async fn no_observer() {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    for i in 0..3 {
        product(&format!("p{i}"), i).insert(&db).await.unwrap();
    }
    println!("written 3");
}
