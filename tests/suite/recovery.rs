//! A receiver that is down is a state of the endpoint, not of each event: while it is, one
//! probe goes at a time, every probe interval at most, and no event spends an attempt; the
//! moment a probe gets through the backlog flows, in order; an outage dead-letters nothing.
//! An event is given up on for its own failures (a body the receiver fails on while others
//! get through) or past its maximum age. Both delivery modes.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SECRET, WAIT, product_am};
use sea_orm::{ActiveModelTrait, DatabaseConnection, IntoActiveModel, Set};
use vendora_observe::{Observer, Order, RetryPolicy};
use vendora_pos::receiver::{Receiver, Reply};

/// Fast backoff, a probe every 100 ms at most, and few attempts of an event's own: an
/// outage that spent attempts would dead-letter in well under a second.
fn retry() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(3)
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(50))
        .max_retry_after(Duration::from_secs(1))
        .probe_interval(Duration::from_millis(100))
}

/// Per-row order: the test's writes, all in one task, are independent rows (under causal
/// order they would form one chain, whose head alone could be sent).
async fn observer(mode: &str, db: &DatabaseConnection, url: &str, retry: RetryPolicy) -> Observer {
    let builder = Observer::builder(common::config(url))
        .retry(retry)
        .order(Order::PerRow);
    let builder = match mode {
        "outbox" => {
            let mut options = vendora_observe::OutboxOptions::new(db.clone());
            options.poll_interval = Duration::from_millis(50);
            builder.outbox_options(options)
        }
        _ => builder,
    };
    builder.build().await.unwrap()
}

async fn fresh_db(mode: &str) -> DatabaseConnection {
    match mode {
        "outbox" => common::sqlite_file().await.0,
        _ => {
            let db = vendora_pos::db::connect("sqlite::memory:").await.unwrap();
            vendora_pos::db::create_pos_tables(&db).await.unwrap();
            db
        }
    }
}

/// 50 rows written through a 3 s outage (the receiver answers 503 without Retry-After):
/// the receiver sees about one request per probe interval, not an attempt of each of the
/// 50 waiting events at each backoff; then everything arrives, each row in order, nothing
/// dead.
async fn an_outage_costs_probes_not_attempts(mode: &str) {
    let db = fresh_db(mode).await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Status(503, None));
    let observer = observer(mode, &db, &receiver.url(), retry()).await;
    let outage = std::time::Instant::now();
    observer
        .scope(async {
            for r in 0..50 {
                let mut p = product_am(&format!("r{r}"), 0).insert(&db).await.unwrap();
                let mut am = p.into_active_model();
                am.stock = Set(1);
                p = am.update(&db).await.unwrap();
                drop(p);
            }
        })
        .await;
    // The outage's length, not a wait for something to happen.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = receiver.requests();
    receiver.set_reply(Reply::Ok);
    let outage = outage.elapsed();
    let total = 50 * 3; // created, updated, stock:updated
    receiver.wait_delivered(total, WAIT).await;
    assert!(observer.flush(WAIT).await);
    let stats = observer.stats();
    assert_eq!(
        (stats.sent, stats.dead),
        (total as u64, 0),
        "{mode}: {stats:?}"
    );
    common::assert_complete_and_ordered(&receiver.delivered(), total);
    // Once the receiver is known down, one request goes at a time, each at least the
    // probe interval after the last one failed (the interval doubles up to it from 10 ms):
    // only the senders that found it down at once (8) and that ramp (10, 20, 40, 80 ms)
    // come closer together. Spending attempts, the 50 events waiting would have made 150
    // requests at the least, most of them at once, and died after 3 each. Time on a loaded
    // machine (the writes before the sleep can take seconds) adds probes, never closer ones.
    let close = during
        .windows(2)
        .filter(|w| w[1].received_at - w[0].received_at < Duration::from_millis(90))
        .count();
    eprintln!(
        "{mode}: {} requests reached the receiver during the {:.1} s outage, {close} of them \
         within 90 ms of the one before",
        during.len(),
        outage.as_secs_f64()
    );
    assert!(
        close <= 16,
        "{mode}: {close} of {} requests during the outage came within 90 ms of the one before",
        during.len()
    );
    let bound = 16 + (outage.as_millis() / 100) as usize;
    assert!(
        during.len() <= bound,
        "{mode}: {} requests in a {outage:?} outage (at most {bound})",
        during.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_an_outage_costs_probes_not_attempts() {
    an_outage_costs_probes_not_attempts("direct").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_an_outage_costs_probes_not_attempts() {
    an_outage_costs_probes_not_attempts("outbox").await;
}

/// A body the receiver fails on (500) while other events get through is the event's own
/// failure: it is dead-lettered after its attempts, and nothing else waits for it.
async fn an_event_failing_alone_is_dead_lettered(mode: &str) {
    let db = fresh_db(mode).await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.reply_when("\"poison\"", Reply::Status(500, None));
    let observer = observer(mode, &db, &receiver.url(), retry()).await;
    observer
        .scope(product_am("poison", 1).insert(&db))
        .await
        .unwrap();
    // Other rows keep getting through meanwhile.
    let mut n = 0;
    while observer.stats().dead == 0 {
        observer
            .scope(product_am(&format!("fine {n}"), 1).insert(&db))
            .await
            .unwrap();
        n += 1;
        assert!(
            n < 2_000,
            "{mode}: the poison event never died: {:?}",
            observer.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(observer.flush(WAIT).await);
    let stats = observer.stats();
    assert_eq!(stats.dead, 1, "{mode}: {stats:?}");
    assert_eq!(
        stats.sent, n as u64,
        "{mode}: every other event went through"
    );
    let poison_attempts = receiver
        .requests()
        .iter()
        .filter(|r| r.body_str().contains("\"poison\""))
        .count();
    assert!(poison_attempts >= 3, "{mode}: {poison_attempts} attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_an_event_failing_alone_is_dead_lettered() {
    an_event_failing_alone_is_dead_lettered("direct").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_an_event_failing_alone_is_dead_lettered() {
    an_event_failing_alone_is_dead_lettered("outbox").await;
}

/// Down longer than the maximum age (here one second): the events are dead-lettered, with
/// that reason, and handed to the dead-letter callback; a write after the receiver is back
/// goes through.
#[tokio::test(flavor = "multi_thread")]
async fn events_past_their_maximum_age_are_dead_lettered() {
    let db = fresh_db("direct").await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Status(503, None));
    let dead = Arc::new(Mutex::new(Vec::new()));
    let seen = dead.clone();
    let observer = Observer::builder(common::config(&receiver.url()))
        .retry(retry().max_age(Duration::from_secs(1)))
        .on_dead_letter(move |d| seen.lock().unwrap().push(d.last_error))
        .build()
        .await
        .unwrap();
    observer
        .scope(async {
            for i in 0..3 {
                product_am(&format!("old {i}"), 1)
                    .insert(&db)
                    .await
                    .unwrap();
            }
        })
        .await;
    common::eventually(WAIT, "three events dead past their age", || async {
        observer.stats().dead == 3
    })
    .await;
    let reasons = dead.lock().unwrap().clone();
    assert!(
        reasons.iter().all(|r| r.contains("maximum age")),
        "{reasons:?}"
    );
    receiver.set_reply(Reply::Ok);
    observer
        .scope(product_am("new", 1).insert(&db))
        .await
        .unwrap();
    receiver.wait_delivered(1, WAIT).await;
    assert!(observer.flush(WAIT).await);
}
