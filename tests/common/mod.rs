//! Set-up shared by the end-to-end tests: a real database, a real receiver, an observer
//! scoped to the test.
#![allow(dead_code)]

use std::time::Duration;

use sea_orm::DatabaseConnection;
use vendora_observe::{Observer, RetryPolicy, WebhookConfig};
use vendora_pos::db;
use vendora_pos::receiver::Receiver;

pub const SECRET: &str = "test-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Env {
    pub db: DatabaseConnection,
    pub receiver: Receiver,
    pub observer: Observer,
}

/// A fresh in-memory SQLite with the POS tables, a receiver and a direct-mode observer.
pub async fn env() -> Env {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = observer_for(&receiver.url(), fast_retries()).await;
    Env {
        db,
        receiver,
        observer,
    }
}

pub fn config(url: &str) -> WebhookConfig {
    WebhookConfig::builder()
        .url(url)
        .secret(SECRET)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

pub async fn observer_for(url: &str, retry: RetryPolicy) -> Observer {
    Observer::builder(config(url))
        .retry(retry)
        .build()
        .await
        .unwrap()
}

pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 20,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(200),
        max_retry_after: Duration::from_secs(2),
    }
}

/// `(event, data)` of each delivered request, in arrival order.
pub fn events(requests: &[vendora_pos::receiver::Request]) -> Vec<(String, serde_json::Value)> {
    requests.iter().map(|r| (r.event(), r.data())).collect()
}

/// A fresh SQLite file (WAL) in the temp directory, with the POS tables.
pub async fn sqlite_file() -> (DatabaseConnection, String) {
    let path = std::env::temp_dir().join(format!(
        "vendora-test-{}-{}.sqlite",
        std::process::id(),
        uuid_like()
    ));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let db = db::connect(&url).await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    (db, url)
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{t:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A fresh PostgreSQL database (created through `DATABASE_URL`) with the POS tables. The
/// tests that need PostgreSQL are `#[ignore = "needs DATABASE_URL: …"]`: they run with
/// `cargo test -- --include-ignored`, which is what `bash .ci/run` does once it has
/// started PostgreSQL.
pub async fn postgres() -> (DatabaseConnection, String) {
    let url = postgres_database().await;
    let db = db::connect(&url).await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    (db, url)
}

/// A fresh, empty PostgreSQL database: its URL. Panics, saying what to set, without
/// `DATABASE_URL`: the tests that call it are ignored unless asked for.
pub async fn postgres_database() -> String {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        panic!(
            "DATABASE_URL is not set: this test needs PostgreSQL; set \
             DATABASE_URL=postgres://user:pass@127.0.0.1/db, or run bash .ci/run, which \
             installs and starts PostgreSQL and sets it"
        );
    };
    use sea_orm::ConnectionTrait;
    let admin = db::connect(&admin_url)
        .await
        .expect("DATABASE_URL does not connect");
    drop_stale_databases(&admin).await;
    let name = format!("vendora_t_{}", uuid_like().replace('-', "_"));
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap();
    format!("{base}/{name}")
}

/// Drops the databases of earlier test runs, once per test binary: those `postgres()`
/// made more than an hour ago (their names carry their creation time; a test run takes
/// minutes, so none is still in use). Without this every run leaves its databases behind.
async fn drop_stale_databases(admin: &DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let Ok(rows) = admin
            .query_all_raw(sea_orm::Statement::from_string(
                admin.get_database_backend(),
                "SELECT datname FROM pg_database WHERE datname LIKE 'vendora\\_t\\_%'",
            ))
            .await
        else {
            return;
        };
        for row in rows {
            let Ok(name) = row.try_get::<String>("", "datname") else {
                continue;
            };
            let created = name
                .strip_prefix("vendora_t_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|hex| u128::from_str_radix(hex, 16).ok());
            if created.is_some_and(|t| now.saturating_sub(t) > 3_600 * 1_000_000_000) {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    })
    .await;
}

/// An outbox-mode observer on `db`, polling fast.
pub async fn outbox_observer(db: &DatabaseConnection, url: &str, retry: RetryPolicy) -> Observer {
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_millis(50);
    // Longer than a request may take (2 s), short enough for the crash test.
    options.lease = Duration::from_secs(3);
    Observer::builder(config(url))
        .retry(retry)
        .outbox_options(options)
        .build()
        .await
        .unwrap()
}

/// Every delivered X-Webhook-Id is unique, `expected_events` arrived, and the product
/// events of each row arrived with strictly increasing stock (each write sets a higher one).
pub fn assert_complete_and_ordered(
    delivered: &[vendora_pos::receiver::Request],
    expected_events: usize,
) {
    use std::collections::{HashMap, HashSet};
    let ids: HashSet<&str> = delivered.iter().map(|r| r.id()).collect();
    assert_eq!(ids.len(), delivered.len(), "a duplicate delivery");
    assert_eq!(delivered.len(), expected_events);
    let mut last: HashMap<i64, i64> = HashMap::new();
    for r in delivered
        .iter()
        .filter(|r| r.event().starts_with("product:"))
    {
        let d = r.data();
        let (id, stock) = (d["id"].as_i64().unwrap(), d["stock"].as_i64().unwrap());
        if let Some(prev) = last.insert(id, stock) {
            assert!(stock > prev, "row {id}: stock {stock} arrived after {prev}");
        }
    }
}

/// A new product with the given name and stock.
pub fn product_am(name: &str, stock: i32) -> vendora_pos::entities::product::ActiveModel {
    use sea_orm::{ActiveValue::NotSet, Set};
    vendora_pos::entities::product::ActiveModel {
        id: NotSet,
        name: Set(name.to_owned()),
        price: Set(1.5),
        stock: Set(stock),
        category_id: Set(None),
        ..Default::default()
    }
}

/// Log lines written while the returned guard lives (this thread: use a current-thread
/// runtime), and a way to read them.
pub fn capture_logs() -> (tracing::subscriber::DefaultGuard, impl Fn() -> String) {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (guard, move || {
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    })
}

/// Writes one product through `observer`, waits until it is delivered and the observer is
/// idle, and returns every attempt the receiver saw; all attempts carry one X-Webhook-Id.
pub async fn one_write_attempts(
    observer: &Observer,
    receiver: &vendora_pos::receiver::Receiver,
    db: &DatabaseConnection,
) -> Vec<vendora_pos::receiver::Request> {
    use sea_orm::ActiveModelTrait;
    observer
        .scope(product_am("retry me", 1).insert(db))
        .await
        .unwrap();
    receiver.wait_delivered(1, WAIT).await;
    assert!(observer.flush(WAIT).await);
    let all = receiver.requests();
    assert!(
        all.iter().all(|r| r.id() == all[0].id()),
        "retries keep the X-Webhook-Id"
    );
    all
}

/// Waits for `cond` to hold, polling, or panics after `timeout` with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
