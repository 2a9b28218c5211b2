//! Metrics through the `metrics` facade, scraped from a real Prometheus endpoint
//! (`metrics-exporter-prometheus` on 127.0.0.1) after a scenario: the counters equal the
//! observer's `stats()`, the histograms count every delivery and attempt, and the backlog
//! gauges show a stalled backlog and its end.
//!
//! One recorder per process: the tests here tell their observers apart by the `mode` label,
//! one test per mode.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::{SECRET, WAIT};
use sea_orm::{ActiveModelTrait, IntoActiveModel, Set};
use vendora_observe::{Observer, RetryPolicy, Stats};
use vendora_pos::receiver::{Receiver, Reply};

/// A price whose apps only need the latest value: superseded events are counted.
mod price {
    use sea_orm::entity::prelude::*;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
    #[sea_orm(table_name = "prices")]
    #[observe(event = "price", latest_wins)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub amount: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// The scrape URL of the process's Prometheus endpoint, started once.
fn endpoint() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let port = common::free_port();
        // Outside any runtime: the exporter runs its own, on a thread of its own, so it
        // outlives each test's runtime.
        std::thread::spawn(move || {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(([127, 0, 0, 1], port))
                .install()
                .expect("the Prometheus exporter starts")
        })
        .join()
        .unwrap();
        format!("http://127.0.0.1:{port}/metrics")
    })
}

/// One scrape: `(name, labels) -> value` for every sample.
struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    async fn take() -> Scrape {
        let text = http_get(endpoint()).await;
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            samples.push((name.to_owned(), labels, value.parse().expect("a number")));
        }
        Scrape(samples)
    }

    /// The sum of `name` over the series of `mode`.
    fn sum(&self, name: &str, mode: &str) -> u64 {
        self.0
            .iter()
            .filter(|(n, labels, _)| {
                n == name && labels.get("mode").map(String::as_str) == Some(mode)
            })
            .map(|(_, _, v)| *v)
            .sum::<f64>() as u64
    }

    /// The value of the gauge `name` for `mode`.
    fn gauge(&self, name: &str, mode: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(n, labels, _)| {
                n == name && labels.get("mode").map(String::as_str) == Some(mode)
            })
            .map(|(_, _, v)| *v)
    }

    /// Every label name used by the observer's series.
    fn label_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .iter()
            .filter(|(n, _, _)| n.starts_with("vendora_observe_"))
            .flat_map(|(_, labels, _)| labels.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

async fn http_get(url: &str) -> String {
    // A plain HTTP/1.1 GET over a TCP socket: the test needs no HTTP client of its own.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Waits until a scrape satisfies `cond`, or panics with `what` and the last scrape's values.
async fn scrape_until(what: &str, mode: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let scrape = Scrape::take().await;
        if cond(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: pending {:?}, oldest age {:?}",
            scrape.gauge("vendora_observe_pending_events", mode),
            scrape.gauge("vendora_observe_oldest_pending_age_seconds", mode),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The counters in the scrape equal `stats`, every delivery has a latency sample and every
/// attempt a duration sample, and no series is labelled by anything but event, mode, outcome.
fn assert_counts_match(scrape: &Scrape, mode: &str, observers: &[Stats]) {
    let got = |name: &str| scrape.sum(&format!("vendora_observe_{name}"), mode);
    let sum = |field: fn(&Stats) -> u64| observers.iter().map(field).sum::<u64>();
    let stats = Totals {
        emitted: sum(|s| s.emitted),
        sent: sum(|s| s.sent),
        failed: sum(|s| s.failed),
        retried: sum(|s| s.retried),
        dead: sum(|s| s.dead),
        shed: sum(|s| s.shed),
        superseded: sum(|s| s.superseded),
    };
    assert_eq!(
        stats.emitted,
        stats.sent + stats.dead + stats.shed + stats.superseded,
        "every emitted event was sent, dead, shed or superseded"
    );
    let counted = [
        ("emitted", got("events_emitted_total"), stats.emitted),
        ("sent", got("events_sent_total"), stats.sent),
        ("failed", got("attempts_failed_total"), stats.failed),
        ("retried", got("events_retried_total"), stats.retried),
        ("dead", got("events_dead_total"), stats.dead),
        ("shed", got("events_shed_total"), stats.shed),
        (
            "superseded",
            got("events_superseded_total"),
            stats.superseded,
        ),
    ];
    for (what, metric, stat) in counted {
        assert_eq!(
            metric, stat,
            "{what}: metrics say {metric}, stats() says {stat}"
        );
    }
    assert_eq!(got("delivery_latency_seconds_count"), stats.sent);
    assert_eq!(
        got("attempt_duration_seconds_count"),
        stats.sent + stats.failed,
        "one sample per attempt"
    );
    assert_eq!(
        scrape.label_names(),
        ["event", "mode", "outcome", "quantile"]
    );
}

struct Totals {
    emitted: u64,
    sent: u64,
    failed: u64,
    retried: u64,
    dead: u64,
    shed: u64,
    superseded: u64,
}

async fn prices(db: &sea_orm::DatabaseConnection, observer: &Observer) {
    vendora_pos::db::create_table(db, price::Entity)
        .await
        .unwrap();
    observer
        .scope(async {
            let mut p = price::ActiveModel {
                id: sea_orm::ActiveValue::NotSet,
                amount: Set(0),
            }
            .insert(db)
            .await
            .unwrap();
            for amount in 1..=30 {
                let mut am = p.into_active_model();
                am.amount = Set(amount);
                p = am.update(db).await.unwrap();
            }
        })
        .await;
}

/// Direct mode: the POS scenario with two 503s and a 401 (one dead event), latest-wins
/// prices behind a slow receiver, then a stalled receiver with a full queue (shed events).
#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_metrics_equal_stats_and_show_the_backlog() {
    endpoint();
    let mode = "direct";
    let db = vendora_pos::db::connect("sqlite::memory:").await.unwrap();
    vendora_pos::db::create_pos_tables(&db).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.queue_replies([Reply::Status(503, None), Reply::Status(503, None)]);
    receiver.reply_when("\"refused\"", Reply::Status(401, None));
    receiver.reply_when("\"amount\"", Reply::Delay(Duration::from_millis(30)));
    let observer = Observer::builder(common::config(&receiver.url()))
        .retry(common::fast_retries())
        .build()
        .await
        .unwrap();
    observer
        .scope(vendora_pos::scenario::run(&db, false, async |_| {}))
        .await
        .unwrap();
    observer
        .scope(common::product_am("refused", 1).insert(&db))
        .await
        .unwrap();
    prices(&db, &observer).await;
    assert!(observer.flush(WAIT).await);

    // A receiver that stalls, and an observer with room for 3: the queue fills, the rest
    // is shed, the backlog ages.
    receiver.clear_rules();
    receiver.set_reply(Reply::Status(503, None));
    let stalled = RetryPolicy::default()
        .max_attempts(10_000)
        .base_delay(Duration::from_millis(20))
        .max_delay(Duration::from_millis(50))
        .max_retry_after(Duration::from_secs(1))
        .probe_interval(Duration::from_millis(100));
    let observer2 = Observer::builder(common::config(&receiver.url()))
        .retry(stalled)
        .queue_capacity(3)
        .build()
        .await
        .unwrap();
    let before = observer.shutdown(WAIT).await.stats;
    drop(observer);
    for i in 0..5 {
        observer2
            .scope(common::product_am(&format!("stalled {i}"), i).insert(&db))
            .await
            .unwrap();
    }
    scrape_until("3 pending events, aged", mode, |s| {
        s.gauge("vendora_observe_pending_events", mode) == Some(3.0)
            && s.gauge("vendora_observe_oldest_pending_age_seconds", mode)
                .is_some_and(|age| age > 0.0)
    })
    .await;
    receiver.set_reply(Reply::Ok);
    assert!(observer2.flush(WAIT).await);
    scrape_until("an empty backlog", mode, |s| {
        s.gauge("vendora_observe_pending_events", mode) == Some(0.0)
            && s.gauge("vendora_observe_oldest_pending_age_seconds", mode) == Some(0.0)
    })
    .await;
    let after = observer2.shutdown(WAIT).await.stats;

    assert!(before.failed >= 3 && before.dead == 1, "{before:?}");
    assert!(before.superseded > 0, "{before:?}");
    assert_eq!((after.emitted, after.shed), (5, 2), "{after:?}");
    assert_counts_match(&Scrape::take().await, mode, &[before, after]);
}

/// Outbox mode on a SQLite file: a backlog of the scenario's events behind a receiver that
/// answers 503, then delivery, with one event refused (401, dead).
#[tokio::test(flavor = "multi_thread")]
async fn outbox_mode_metrics_equal_stats_and_show_the_backlog() {
    endpoint();
    let mode = "outbox";
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Status(503, None));
    receiver.reply_when("\"refused\"", Reply::Status(401, None));
    // Retries that outlast the wait for the gauges (the relay counts pending rows each
    // second while it holds rows, the sampler sets the gauge each second): only the 401
    // is dead.
    let retry = common::fast_retries().max_attempts(10_000);
    let observer = common::outbox_observer(&db, &receiver.url(), retry).await;
    observer
        .scope(vendora_pos::scenario::run(&db, false, async |_| {}))
        .await
        .unwrap();
    observer
        .scope(common::product_am("refused", 1).insert(&db))
        .await
        .unwrap();
    scrape_until("13 pending rows, aged", mode, |s| {
        s.gauge("vendora_observe_pending_events", mode) == Some(13.0)
            && s.gauge("vendora_observe_oldest_pending_age_seconds", mode)
                .is_some_and(|age| age > 0.0)
    })
    .await;
    receiver.set_reply(Reply::Ok);
    assert!(observer.flush(WAIT).await);
    scrape_until("an empty outbox", mode, |s| {
        s.gauge("vendora_observe_pending_events", mode) == Some(0.0)
    })
    .await;
    let stats = observer.shutdown(WAIT).await.stats;
    assert_eq!(
        (stats.emitted, stats.sent, stats.dead),
        (13, 12, 1),
        "{stats:?}"
    );
    assert!(stats.failed > 0 && stats.retried > 0, "{stats:?}");
    assert_counts_match(&Scrape::take().await, mode, &[stats]);
}
