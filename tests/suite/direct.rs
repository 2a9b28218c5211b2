//! Direct mode under faults, against a real receiver on 127.0.0.1: down then up, 503s,
//! 401, a full queue, a blackholed receiver, shutdown with work left.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SECRET, WAIT, fast_retries, product_am};
use sea_orm::{ActiveModelTrait, DatabaseConnection, IntoActiveModel, Set};
use vendora_observe::{Observer, Overflow, WebhookConfig};
use vendora_pos::db;
use vendora_pos::receiver::{Blackhole, Receiver, Reply, Reserved};

async fn memory_db() -> DatabaseConnection {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    db
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_down_then_up_gets_every_event_in_per_row_order() {
    let db = memory_db().await;
    let port = Reserved::new().unwrap();
    let retry = common::retries_through_an_outage();
    let observer = common::observer_for(&port.url(), retry).await;
    // 100 rows x (created + 4 x (updated + stock:updated)) = 900 events.
    observer
        .scope(async {
            for r in 0..100 {
                let mut p = product_am(&format!("r{r}"), 0).insert(&db).await.unwrap();
                for s in 1..=4 {
                    let mut am = p.into_active_model();
                    am.stock = Set(s);
                    p = am.update(&db).await.unwrap();
                }
            }
        })
        .await;
    let receiver = Receiver::start_on(port, SECRET).unwrap();
    receiver.wait_delivered(900, Duration::from_secs(60)).await;
    assert!(observer.flush(WAIT).await);
    common::assert_complete_and_ordered(&receiver.delivered(), 900);
    let stats = observer.stats();
    assert_eq!((stats.sent, stats.dead, stats.pending), (900, 0, 0));
    assert!(stats.retried > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_503s_then_200_and_retry_after_is_honoured() {
    let db = memory_db().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.queue_replies([
        Reply::Status(503, Some(1)),
        Reply::Status(503, None),
        Reply::Status(429, Some(0)),
    ]);
    let observer = common::observer_for(&receiver.url(), fast_retries()).await;
    let all = common::one_write_attempts(&observer, &receiver, &db).await;
    assert_eq!(
        all.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 503, 429, 200]
    );
    // Retry-After: 1 s between the first and second attempt (fast_retries would wait at
    // most 10 ms otherwise).
    assert!(all[1].received_at.duration_since(all[0].received_at) >= Duration::from_millis(900));
    let s = observer.stats();
    assert_eq!((s.sent, s.retried, s.failed, s.dead), (1, 3, 3, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_is_dead_lettered_once_and_handed_to_the_callback() {
    let db = memory_db().await;
    let receiver = Receiver::start("a-different-secret").await.unwrap();
    let dead = Arc::new(Mutex::new(Vec::new()));
    let seen = dead.clone();
    let observer = Observer::builder(common::config(&receiver.url()))
        .retry(fast_retries())
        .on_dead_letter(move |d| seen.lock().unwrap().push(d))
        .build()
        .await
        .unwrap();
    observer
        .scope(product_am("x", 1).insert(&db))
        .await
        .unwrap();
    assert!(observer.flush(WAIT).await);
    assert_eq!(receiver.requests().len(), 1, "a 401 is not retried");
    let dead = dead.lock().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(
        dead[0].status,
        Some(401),
        "the status as data, not only in the text"
    );
    assert!(
        dead[0]
            .last_error
            .contains("WEBHOOK_SECRET probably differs"),
        "{}",
        dead[0].last_error
    );
    assert_eq!(dead[0].webhook.event(), "product:created");
    assert_eq!(observer.stats().dead, 1);
}

fn blackhole_config(url: &str, timeout: Duration) -> WebhookConfig {
    WebhookConfig::builder()
        .url(url)
        .secret(SECRET)
        .timeout(timeout)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_sheds_exactly_the_excess_and_writes_do_not_wait() {
    let db = memory_db().await;
    let hole = Blackhole::start().await.unwrap();
    let observer = Observer::builder(blackhole_config(&hole.url(), Duration::from_secs(30)))
        .concurrency(1)
        .queue_capacity(10)
        .build()
        .await
        .unwrap();
    observer
        .scope(async {
            for i in 0..50 {
                product_am(&format!("p{i}"), i).insert(&db).await.unwrap();
            }
        })
        .await;
    let s = observer.stats();
    assert_eq!((s.pending, s.shed), (10, 40), "{s:?}");
    // No write waited on the hung receiver: every one returned before any request (30 s
    // timeout) had an outcome.
    assert_eq!((s.sent, s.failed), (0, 0), "{s:?}");
    observer.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overflow_wait_sheds_nothing() {
    let db = memory_db().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Delay(Duration::from_millis(5)));
    let observer = Observer::builder(common::config(&receiver.url()))
        .concurrency(1)
        .queue_capacity(2)
        .overflow(Overflow::Wait)
        .build()
        .await
        .unwrap();
    observer
        .scope(async {
            for i in 0..30 {
                product_am(&format!("p{i}"), i).insert(&db).await.unwrap();
            }
        })
        .await;
    receiver.wait_delivered(30, WAIT).await;
    assert_eq!(observer.stats().shed, 0);
}

/// Writes return while every request hangs: none of the 40 writes waited for one (no
/// request had an outcome yet, with a 60 s timeout, when the last write returned).
#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_receiver_does_not_slow_writes() {
    let db = memory_db().await;
    let hole = Blackhole::start().await.unwrap();
    let observer = Observer::builder(blackhole_config(&hole.url(), Duration::from_secs(60)))
        .build()
        .await
        .unwrap();
    observer
        .scope(async {
            for i in 0..40 {
                product_am(&format!("p{i}"), i).insert(&db).await.unwrap();
            }
        })
        .await;
    let s = observer.stats();
    assert_eq!(s.emitted, 40);
    assert_eq!(
        (s.sent, s.failed),
        (0, 0),
        "every write returned before any request had an outcome"
    );
    common::eventually(WAIT, "the blackhole holds requests", || async {
        hole.connections() > 0
    })
    .await;
    observer.shutdown(Duration::ZERO).await;
}

/// The dead-letter callback runs outside the scheduler's lock: while one blocks (here
/// until the test lets it go, 30 s at most), 50 other rows' events are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_callback_that_blocks_holds_up_no_other_row() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let db = memory_db().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.reply_when("poison", Reply::Status(400, None));
    let (entered, finished, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (e, f, r) = (entered.clone(), finished.clone(), release.clone());
    let observer = Observer::builder(common::config(&receiver.url()))
        .retry(fast_retries())
        .on_dead_letter(move |_| {
            e.store(true, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(30);
            while !r.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            f.store(true, Ordering::SeqCst);
        })
        .build()
        .await
        .unwrap();
    let write = |name: String| {
        let db = db.clone();
        tokio::spawn(observer.scope(async move {
            product_am(&name, 1).insert(&db).await.unwrap();
        }))
    };
    write("poison".into()).await.unwrap();
    common::eventually(WAIT, "the dead-letter callback runs", || async {
        entered.load(Ordering::SeqCst)
    })
    .await;
    for i in 0..50 {
        write(format!("other {i}")).await.unwrap();
    }
    receiver.wait_delivered(50, WAIT).await;
    assert!(
        !finished.load(Ordering::SeqCst),
        "the other rows waited for the callback"
    );
    release.store(true, Ordering::SeqCst);
    assert!(observer.flush(WAIT).await);
    assert_eq!(observer.stats().dead, 1);
}

/// At the deadline the request in flight is cut and reported as of unknown outcome (the
/// receiver may have processed it), not dead; what never left is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_reports_the_cut_request_as_unknown_and_dead_letters_the_rest() {
    let db = memory_db().await;
    let hole = Blackhole::start().await.unwrap();
    let dead = Arc::new(Mutex::new(Vec::new()));
    let seen = dead.clone();
    let observer = Observer::builder(blackhole_config(&hole.url(), Duration::from_secs(30)))
        .concurrency(2)
        .on_dead_letter(move |d| seen.lock().unwrap().push(d.last_error))
        .build()
        .await
        .unwrap();
    observer
        .scope(async {
            for i in 0..12 {
                product_am(&format!("p{i}"), i).insert(&db).await.unwrap();
            }
        })
        .await;
    // One task's writes form one chain: the first is in flight (the receiver never
    // answers), the other eleven wait behind it.
    let report = observer.shutdown(Duration::from_millis(300)).await;
    assert!(!report.drained);
    assert_eq!((report.outcome_unknown, report.left), (1, 11), "{report:?}");
    assert_eq!(report.undelivered(), 12, "none of the twelve was delivered");
    assert_eq!(report.stats.pending, 0);
    assert_eq!(report.stats.dead, 11);
    let dead = dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 11);
    // Each says what to do about it.
    assert!(dead[0].contains("a longer deadline"), "{}", dead[0]);
    // After shutdown, new events are refused and counted, writes still succeed.
    observer
        .scope(product_am("late", 1).insert(&db))
        .await
        .unwrap();
    assert_eq!(observer.stats().shed, 1);
}

/// 2,000 events shed in one burst make one log line with their count (or a few, if the
/// burst spans more than one half-second window), soon after the burst: none unreported.
/// Shed events are lost, so the line is an error: it shows under a subscriber that shows
/// only errors (`tracing_subscriber::fmt::init()` with `env-filter` and no `RUST_LOG`).
#[tokio::test(flavor = "current_thread")]
async fn a_shed_burst_is_logged_soon_with_its_count() {
    let (_guard, logs) = common::capture_logs_at(tracing::Level::ERROR);
    let db = memory_db().await;
    let hole = Blackhole::start().await.unwrap();
    let observer = Observer::builder(blackhole_config(&hole.url(), Duration::from_secs(30)))
        .queue_capacity(10)
        .build()
        .await
        .unwrap();
    observer
        .scope(async {
            for i in 0..2_010 {
                product_am(&format!("p{i}"), i).insert(&db).await.unwrap();
            }
        })
        .await;
    assert_eq!(observer.stats().shed, 2_000);
    let reported = || -> u64 {
        logs()
            .lines()
            .filter_map(|l| {
                l.split(" webhook(s) shed")
                    .next()
                    .filter(|_| l.contains("shed in the last"))
            })
            .filter_map(|head| head.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()))
            .sum()
    };
    common::eventually(Duration::from_secs(5), "the burst is reported", || async {
        reported() == 2_000
    })
    .await;
    assert!(
        logs().contains("raise ObserverBuilder::queue_capacity"),
        "{}",
        logs()
    );
}
