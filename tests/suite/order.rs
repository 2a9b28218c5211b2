//! Causal order, against a real receiver on 127.0.0.1, in both modes: one task's writes
//! arrive in the order it made them through retries, outages and several relays; events
//! related by neither row nor task go out in parallel; a failing event holds only its own
//! chains; latest-wins coalescing; a blocked backlog longer than the claim's frontier.

use crate::common;

use std::time::Duration;

use common::{SECRET, WAIT, fast_retries, product_am};
use sea_orm::{ActiveModelTrait, DatabaseConnection, IntoActiveModel, Set};
use vendora_observe::{Observer, RetryPolicy};
use vendora_pos::receiver::{Receiver, Reply, Reserved};
use vendora_pos::{db, scenario};

/// The delivered requests, first delivery of each X-Webhook-Id only, in arrival order.
fn first_deliveries(receiver: &Receiver) -> Vec<vendora_pos::receiver::Request> {
    let mut seen = std::collections::HashSet::new();
    let mut got: Vec<_> = receiver
        .delivered()
        .into_iter()
        .filter(|r| seen.insert(r.id().to_owned()))
        .collect();
    got.sort_by_key(|r| r.received_at);
    got
}

fn names(requests: &[vendora_pos::receiver::Request]) -> Vec<String> {
    requests.iter().map(|r| r.event()).collect()
}

/// Retries that never give up within a test, and come quickly.
fn patient() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(10_000)
        .base_delay(Duration::from_millis(5))
        .max_delay(Duration::from_millis(100))
        .max_retry_after(Duration::from_secs(1))
        .probe_interval(Duration::from_millis(100))
}

/// Runs the POS scenario in one task through `observer` while the receiver is down, then
/// brings it up answering 503 to every other request; the app must see exactly the
/// scenario's events in the scenario's order.
async fn scenario_through_faults(
    db: &DatabaseConnection,
    port: Reserved,
    observer: &Observer,
    also_flush: &[&Observer],
) {
    observer
        .scope(scenario::run(db, false, async |_| {}))
        .await
        .unwrap();
    let receiver = Receiver::start_on(port, SECRET).unwrap();
    receiver.queue_replies((0..40).map(|i| {
        if i % 2 == 0 {
            Reply::Status(503, None)
        } else {
            Reply::Ok
        }
    }));
    receiver
        .wait_delivered(scenario::EXPECTED.len(), WAIT)
        .await;
    for o in std::iter::once(observer).chain(also_flush.iter().copied()) {
        assert!(o.flush(WAIT).await);
    }
    let got = first_deliveries(&receiver);
    assert_eq!(names(&got), scenario::EXPECTED);
    assert!(got.iter().all(|r| r.signature_ok));
    assert!(
        receiver.requests().iter().any(|r| r.status == 503),
        "the receiver's failures were exercised"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_one_task_arrives_in_write_order_through_an_outage_and_retries() {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let port = Reserved::new().unwrap();
    let observer = common::observer_for(&port.url(), patient()).await;
    scenario_through_faults(&db, port, &observer, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_one_task_arrives_in_write_order_through_an_outage_and_retries() {
    let (db, _) = common::sqlite_file().await;
    let port = Reserved::new().unwrap();
    let observer = common::outbox_observer(&db, &port.url(), patient()).await;
    scenario_through_faults(&db, port, &observer, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_three_relays_keep_one_task_in_write_order() {
    let (db, url) = common::postgres().await;
    let port = Reserved::new().unwrap();
    let hook = port.url();
    let writer = common::outbox_observer(&db, &hook, patient()).await;
    let mut others = Vec::new();
    for _ in 0..2 {
        let conn = db::connect(&url).await.unwrap();
        others.push(common::outbox_observer(&conn, &hook, patient()).await);
    }
    let others: Vec<&Observer> = others.iter().collect();
    scenario_through_faults(&db, port, &writer, &others).await;
}

/// Task A's first event is answered slowly; task B's events, on other rows, arrive
/// meanwhile. A's second event waits for its first.
async fn unrelated_tasks_in_parallel(
    observer: Observer,
    db: DatabaseConnection,
    receiver: Receiver,
) {
    receiver.reply_when("slow-a", Reply::Delay(Duration::from_millis(1500)));
    let a = {
        let (observer, db) = (observer.clone(), db.clone());
        tokio::spawn(observer.clone().scope(async move {
            product_am("slow-a", 1).insert(&db).await.unwrap();
            product_am("then-a", 2).insert(&db).await.unwrap();
            drop(observer);
        }))
    };
    a.await.unwrap();
    // A's first request is now in flight, held by the receiver.
    receiver.wait_until_arrived("slow-a", WAIT).await;
    let b = {
        let db = db.clone();
        tokio::spawn(observer.scope(async move {
            for i in 0..5 {
                product_am(&format!("b{i}"), i).insert(&db).await.unwrap();
            }
        }))
    };
    b.await.unwrap();
    receiver.wait_delivered(7, WAIT).await;
    let order: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|r| r.data()["name"].as_str().unwrap().to_owned())
        .collect();
    let slow = order.iter().position(|n| n == "slow-a").unwrap();
    let then = order.iter().position(|n| n == "then-a").unwrap();
    assert!(slow < then, "A's writes out of order: {order:?}");
    for i in 0..5 {
        let bi = order.iter().position(|n| n == &format!("b{i}")).unwrap();
        assert!(bi < slow, "B waited for A's slow event: {order:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_unrelated_tasks_go_out_in_parallel() {
    let env = common::env().await;
    unrelated_tasks_in_parallel(env.observer, env.db, env.receiver).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_unrelated_tasks_go_out_in_parallel() {
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::outbox_observer(&db, &receiver.url(), fast_retries()).await;
    unrelated_tasks_in_parallel(observer, db, receiver).await;
}

/// One row's event fails again and again; fifty other tasks' events are all delivered
/// meanwhile. Once the receiver takes it, it arrives, and the write behind it in its task.
async fn failing_event_holds_only_its_chains(
    observer: Observer,
    db: DatabaseConnection,
    receiver: Receiver,
) {
    receiver.reply_when("stuck", Reply::Status(503, None));
    observer
        .scope(async {
            product_am("stuck", 1).insert(&db).await.unwrap();
            product_am("behind-stuck", 2).insert(&db).await.unwrap();
        })
        .await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let db = db.clone();
        tasks.push(tokio::spawn(observer.scope(async move {
            product_am(&format!("free{i}"), i)
                .insert(&db)
                .await
                .unwrap();
        })));
    }
    for t in tasks {
        t.await.unwrap();
    }
    receiver.wait_delivered(50, WAIT).await;
    let names: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|r| r.data()["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("stuck")),
        "the stuck event or the one behind it went out: {names:?}"
    );
    // It keeps failing and being retried, still holding only its own chains.
    common::eventually(WAIT, "the stuck event retried", || async {
        receiver
            .requests()
            .iter()
            .filter(|r| r.status == 503)
            .count()
            >= 3
    })
    .await;
    assert_eq!(receiver.delivered().len(), 50);
    receiver.clear_rules();
    receiver.wait_delivered(52, WAIT).await;
    let names: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|r| r.data()["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(&names[50..], ["stuck", "behind-stuck"]);
    assert!(observer.flush(WAIT).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_a_failing_event_holds_only_its_own_chains() {
    let env = common::env().await;
    let observer = common::observer_for(&env.receiver.url(), patient()).await;
    failing_event_holds_only_its_chains(observer, env.db, env.receiver).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_a_failing_event_holds_only_its_own_chains() {
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::outbox_observer(&db, &receiver.url(), patient()).await;
    failing_event_holds_only_its_chains(observer, db, receiver).await;
}

/// Rows whose webhooks the receiver answers slowly (it holds them two minutes) hold back
/// only their own chains: with as many slow rows as senders (8), and with 64, events of
/// 200 other rows are all delivered meanwhile. (With a strict bound of 8 requests in
/// flight, none of them went out before a slow answer.)
async fn slow_rows_hold_only_their_own_chains(
    observer: Observer,
    db: DatabaseConnection,
    receiver: Receiver,
    slow: usize,
) {
    receiver.reply_when("slow-row", Reply::Delay(Duration::from_secs(120)));
    // Each written by a task of its own: no chain links them to each other or the rest.
    let write = |name: String| {
        let db = db.clone();
        tokio::spawn(observer.scope(async move {
            product_am(&name, 1).insert(&db).await.unwrap();
        }))
    };
    for i in 0..slow {
        write(format!("slow-row {i}")).await.unwrap();
    }
    common::eventually(WAIT, "every slow row's request at the receiver", || async {
        receiver.arrivals_with("slow-row") >= slow
    })
    .await;
    let free: Vec<_> = (0..200).map(|i| write(format!("free {i}"))).collect();
    for task in free {
        task.await.unwrap();
    }
    let got = receiver.wait_delivered(200, WAIT).await;
    assert!(
        got.iter().all(|r| r.body_str().contains("free ")),
        "a slow row's event was answered within the test"
    );
    observer.shutdown(Duration::ZERO).await;
}

/// A direct observer whose requests may take a minute: a slow answer is waited for, not
/// cut by the timeout and retried.
async fn patient_with_slow_answers(url: &str) -> Observer {
    Observer::builder(common::patient_config(url))
        .retry(patient())
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_8_slow_rows_hold_only_their_own_chains() {
    let env = common::env().await;
    let observer = patient_with_slow_answers(&env.receiver.url()).await;
    slow_rows_hold_only_their_own_chains(observer, env.db, env.receiver, 8).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_64_slow_rows_hold_only_their_own_chains() {
    let env = common::env().await;
    let observer = patient_with_slow_answers(&env.receiver.url()).await;
    slow_rows_hold_only_their_own_chains(observer, env.db, env.receiver, 64).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_64_slow_rows_hold_only_their_own_chains() {
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::relay_for_slow_requests(&db, &receiver.url()).await;
    slow_rows_hold_only_their_own_chains(observer, db, receiver, 64).await;
}

/// Inserts each `(name, stock)` product in a Tokio task of its own (a unit of work of its
/// own: no chain links the rows), one after the other.
async fn insert_each_in_a_task_of_its_own(
    observer: &Observer,
    db: &DatabaseConnection,
    rows: impl Iterator<Item = (String, i32)>,
) {
    for (name, stock) in rows {
        let db = db.clone();
        tokio::spawn(observer.scope(async move {
            product_am(&name, stock).insert(&db).await.unwrap();
        }))
        .await
        .unwrap();
    }
}

/// Slow rows that keep being written fill the relay with their backlogs: here 3 rows
/// answered after two minutes, 13 events each, against a relay that holds 16 rows (claims
/// of 4), so the first two rows' backlogs fill it. Other rows are still claimed and
/// delivered, at once, in the last rows a relay may hold, kept for chains that hold
/// little. (Without them, none went out before a slow answer.)
#[tokio::test(flavor = "multi_thread")]
async fn outbox_slow_rows_backlogs_that_fill_the_relay_hold_no_other_row() {
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.reply_when("slow-row", Reply::Delay(Duration::from_secs(120)));
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.batch = 4;
    options.max_batch = 4;
    options.lease = Duration::from_secs(120);
    let observer = Observer::builder(common::patient_config(&receiver.url()))
        .outbox_options(options)
        .build()
        .await
        .unwrap();
    for i in 0..3 {
        let db = db.clone();
        tokio::spawn(observer.scope(async move {
            let row = product_am(&format!("slow-row {i}"), 0)
                .insert(&db)
                .await
                .unwrap();
            for stock in 1..=12 {
                let mut am = row.clone().into_active_model();
                am.stock = Set(stock);
                am.update(&db).await.unwrap();
            }
        }))
        .await
        .unwrap();
    }
    common::eventually(
        WAIT,
        "the slow rows' first requests at the receiver",
        || async { receiver.arrivals_with("slow-row") >= 3 },
    )
    .await;
    insert_each_in_a_task_of_its_own(&observer, &db, (0..20).map(|i| (format!("free {i}"), 1)))
        .await;
    let got = receiver.wait_delivered(20, WAIT).await;
    assert!(
        got.iter().all(|r| r.body_str().contains("free ")),
        "a slow row's event was answered within the test"
    );
    observer.shutdown(Duration::ZERO).await;
}

/// A chain whose head another relay holds, with a backlog longer than a claim's frontier
/// (3,000 rows written before everything else): rows of other chains are still claimed
/// and delivered, found by the claim's skip scan.
async fn blocked_backlog_holds_no_other_row(db: DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    vendora_observe::outbox::create_table(&db).await.unwrap();
    let far = 4_102_444_800_000i64; // 2100-01-01, in ms
    let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
    for i in 0..3_000 {
        let claim = if i == 0 {
            format!("'another-relay', {far}")
        } else {
            "NULL, NULL".into()
        };
        txn.execute_unprepared(&format!(
            "INSERT INTO vendora_outbox (event_id, ordering_key, unit_key, event, kind, body, \
             next_attempt_at, created_at, claimed_by, claimed_until) VALUES ('hot-{i}', \
             'product:999', 'elsewhere', 'product:updated', 'updated', \
             '{{\"event\":\"product:updated\",\"data\":{{}}}}', 0, 0, {claim})"
        ))
        .await
        .unwrap();
    }
    sea_orm::TransactionSession::commit(txn).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::outbox_observer(&db, &receiver.url(), fast_retries()).await;
    insert_each_in_a_task_of_its_own(&observer, &db, (0..20).map(|i| (format!("other{i}"), i)))
        .await;
    let got = receiver.wait_delivered(20, WAIT).await;
    assert!(got.iter().all(|r| r.event() == "product:created"));
    common::eventually(WAIT, "the 20 deliveries recorded", || {
        let db = db.clone();
        async move { vendora_observe::outbox::pending(&db).await.unwrap() == 3_000 }
    })
    .await;
    assert!(
        !receiver
            .requests()
            .iter()
            .any(|r| r.id().starts_with("hot-")),
        "the blocked chain stays behind its head"
    );
    observer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_blocked_backlog_longer_than_the_frontier_holds_no_other_row() {
    let (db, _) = common::sqlite_file().await;
    blocked_backlog_holds_no_other_row(db).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_a_blocked_backlog_longer_than_the_frontier_holds_no_other_row() {
    let (db, _) = common::postgres().await;
    blocked_backlog_holds_no_other_row(db).await;
}

/// One writer's transaction: five of the hot rows, four updates each, every update one
/// more than the row's stock (read under a row lock), so each row's stock rises in commit
/// order.
async fn write_round(
    db: &DatabaseConnection,
    ids: &[i32],
    writer: usize,
    round: usize,
) -> Result<(), sea_orm::DbErr> {
    use sea_orm::{EntityTrait, QuerySelect};
    use vendora_pos::entities::product;
    let txn = sea_orm::TransactionTrait::begin(db).await?;
    for id in ids.iter().skip((writer + round) % 2).step_by(2) {
        let mut p = product::Entity::find_by_id(*id)
            .lock_exclusive()
            .one(&txn)
            .await?
            .expect("the row exists");
        for _ in 0..4 {
            let mut am = p.into_active_model();
            am.stock = Set(am.stock.clone().unwrap() + 1);
            p = am.update(&txn).await?;
        }
    }
    sea_orm::TransactionSession::commit(txn).await
}

/// Ten hot rows, each updated 60 times in transactions of 20 writes by four writer tasks:
/// every event arrives, each row's in order.
async fn hot_rows_stream_in_order(db: DatabaseConnection) {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::outbox_observer(&db, &receiver.url(), fast_retries()).await;
    let mut ids = Vec::new();
    for r in 0..10 {
        let p = observer
            .scope(product_am(&format!("hot{r}"), 0).insert(&db))
            .await
            .unwrap();
        ids.push(p.id);
    }
    let mut writers = Vec::new();
    for w in 0..4 {
        let (db, ids) = (db.clone(), ids.clone());
        writers.push(tokio::spawn(observer.scope(async move {
            for round in 0..3 {
                // Retried until it commits: SQLite refuses a transaction that read a row
                // another one changed since.
                loop {
                    if write_round(&db, &ids, w, round).await.is_ok() {
                        break;
                    }
                }
            }
        })));
    }
    for w in writers {
        w.await.unwrap();
    }
    // 10 created + 4 writers x 3 rounds x 5 rows x 4 updates x (updated + stock:updated)
    let total = 10 + 4 * 3 * 5 * 4 * 2;
    receiver
        .wait_delivered(total, Duration::from_secs(60))
        .await;
    assert!(observer.flush(WAIT).await);
    common::assert_complete_and_ordered(&receiver.delivered(), total);
    observer.shutdown(Duration::from_secs(5)).await;
}

/// While a relay streams ten hot rows' backlog, another connection locks the outbox for
/// longer than the lease's margin over the request timeout: the relay cannot renew its
/// lease, so its scheduler lets the rows it holds go. They are handed back and claimed
/// again before any later row of their chains: every row's events still arrive in order.
async fn rows_let_go_for_a_lost_lease_keep_their_order(db: DatabaseConnection, url: &str) {
    use sea_orm::ConnectionTrait;
    let (_guard, logs) = common::capture_logs();
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Delay(Duration::from_millis(10)));
    // 300 ms more than the 2 s timeout: an attempt may start only while the lease covers it.
    let observer = common::outbox_observer_with_lease(
        &db,
        &receiver.url(),
        fast_retries(),
        Duration::from_millis(2_300),
    )
    .await;
    let mut ids = Vec::new();
    for r in 0..10 {
        let p = observer
            .scope(product_am(&format!("hot{r}"), 0).insert(&db))
            .await
            .unwrap();
        ids.push(p.id);
    }
    let mut writers = Vec::new();
    for w in 0..4 {
        let (db, ids) = (db.clone(), ids.clone());
        writers.push(tokio::spawn(observer.scope(async move {
            for round in 0..3 {
                // SQLite refuses a round that read a row another one changed since: again,
                // after a pause, until it commits.
                let deadline = std::time::Instant::now() + WAIT;
                while let Err(e) = write_round(&db, &ids, w, round).await {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "round {round} of writer {w} never committed: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })));
    }
    receiver.wait_delivered(40, WAIT).await;
    // The lock: SQLite's write lock, or PostgreSQL's lock on the outbox table.
    let locker = db::connect(url).await.unwrap();
    let txn = sea_orm::TransactionTrait::begin(&locker).await.unwrap();
    let lock = match locker.get_database_backend() {
        sea_orm::DbBackend::Sqlite => "UPDATE products SET name = name WHERE id = -1",
        _ => "LOCK TABLE vendora_outbox IN ACCESS EXCLUSIVE MODE",
    };
    txn.execute_unprepared(lock).await.unwrap();
    // Held on purpose, for five times the lease's margin.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    txn.rollback().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let total = 10 + 4 * 3 * 5 * 4 * 2;
    receiver
        .wait_delivered(total, Duration::from_secs(60))
        .await;
    assert!(observer.flush(WAIT).await);
    common::assert_complete_and_ordered(&receiver.delivered(), total);
    assert!(
        logs().contains("handed back"),
        "the lease never ran out: the test did not test the hand-back\n{}",
        logs()
    );
    observer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_rows_let_go_for_a_lost_lease_keep_their_order() {
    let (db, url) = common::sqlite_file().await;
    rows_let_go_for_a_lost_lease_keep_their_order(db, &url).await;
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_rows_let_go_for_a_lost_lease_keep_their_order() {
    let (db, url) = common::postgres().await;
    rows_let_go_for_a_lost_lease_keep_their_order(db, &url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_hot_rows_stream_in_order() {
    let (db, _) = common::sqlite_file().await;
    hot_rows_stream_in_order(db).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_hot_rows_stream_in_order() {
    let (db, _) = common::postgres().await;
    hot_rows_stream_in_order(db).await;
}
