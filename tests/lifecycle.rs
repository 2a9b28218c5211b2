//! An outbox observer's relay ends with the observer: dropped without `shutdown`, or
//! replaced by `install`. Its relay holds two connections of its own on PostgreSQL, one for
//! `LISTEN` and one it claims rows on, which the server lists while the relay runs: these
//! tests watch them go. (Their own test binary: `install` is process-wide.)

mod common;

use std::time::Duration;

use common::{SECRET, WAIT, fast_retries, product_am};
use sea_orm::{ActiveModelTrait, ConnectionTrait, DatabaseConnection, Statement};
use vendora_pos::receiver::Receiver;

/// The connections of this test's database that last ran `LISTEN`, and those named as a
/// relay's (claims): one of each per running relay.
async fn relays_listening(db: &DatabaseConnection) -> (i64, i64) {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) FILTER (WHERE query ILIKE 'LISTEN%') AS listening, \
             count(*) FILTER (WHERE application_name LIKE '%vendora-observe relay') AS claiming \
             FROM pg_stat_activity WHERE datname = current_database()",
        ))
        .await
        .unwrap()
        .unwrap();
    (
        row.try_get::<i64>("", "listening").unwrap(),
        row.try_get::<i64>("", "claiming").unwrap(),
    )
}

async fn wait_for_relays(db: &DatabaseConnection, n: i64, what: &str) {
    common::eventually(WAIT, what, || async {
        relays_listening(db).await == (n, n)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn dropping_an_outbox_observer_stops_its_relay() {
    let (db, _) = common::postgres().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::outbox_observer(&db, &receiver.url(), fast_retries()).await;
    wait_for_relays(&db, 1, "the relay listens").await;
    observer
        .scope(product_am("before the drop", 1).insert(&db))
        .await
        .unwrap();
    receiver.wait_delivered(1, WAIT).await;
    drop(observer);
    wait_for_relays(&db, 0, "the dropped observer's relay ends").await;
    // What is written afterwards waits in the table for the next relay: nothing of the
    // dropped one sends it.
    let later = common::outbox_observer(&db, &receiver.url(), fast_retries()).await;
    later
        .scope(product_am("after the drop", 1).insert(&db))
        .await
        .unwrap();
    receiver.wait_delivered(2, WAIT).await;
    assert_eq!(relays_listening(&db).await, (1, 1));
    later.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn installing_another_observer_stops_the_outbox_relay_it_replaces() {
    let (db, _) = common::postgres().await;
    let first_receiver = Receiver::start(SECRET).await.unwrap();
    let second_receiver = Receiver::start(SECRET).await.unwrap();
    let first = common::outbox_observer(&db, &first_receiver.url(), fast_retries()).await;
    first.install();
    product_am("to the first", 1).insert(&db).await.unwrap();
    first_receiver.wait_delivered(1, WAIT).await;
    let second = common::outbox_observer(&db, &second_receiver.url(), fast_retries()).await;
    wait_for_relays(&db, 2, "both relays listen").await;
    // The first observer is still held here: replacing it is what stops its relay.
    second.install();
    wait_for_relays(&db, 1, "the replaced observer's relay ends").await;
    for i in 0..20 {
        product_am(&format!("to the second {i}"), i)
            .insert(&db)
            .await
            .unwrap();
    }
    second_receiver.wait_delivered(20, WAIT).await;
    assert_eq!(
        first_receiver.delivered().len(),
        1,
        "the replaced relay sent nothing more"
    );
    second.shutdown(Duration::from_secs(5)).await;
    drop(first);
}
