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
    let observer = observer_for(&receiver.url(), fast_retries());
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

pub fn observer_for(url: &str, retry: RetryPolicy) -> Observer {
    Observer::builder(config(url)).retry(retry).build().unwrap()
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
