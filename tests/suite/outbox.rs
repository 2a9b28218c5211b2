//! Outbox mode against a real SQLite file and a real PostgreSQL (`DATABASE_URL`): rollback,
//! a receiver that is down, answers 503 or 401, or is slow; several relays.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{
    SECRET, WAIT, assert_complete_and_ordered, eventually, fast_retries, outbox_observer, postgres,
    product_am, sqlite_file,
};
use sea_orm::{ActiveModelTrait, DatabaseConnection, IntoActiveModel, Set, TransactionTrait};
use vendora_observe::Observer;
use vendora_observe::trace::TraceParent;
use vendora_pos::entities::product;
use vendora_pos::receiver::{Receiver, Reply, Reserved};

async fn rollback_case(db: DatabaseConnection) {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    observer
        .scope(async {
            for i in 0..500 {
                let txn = db.begin().await.unwrap();
                product_am(&format!("rolled back {i}"), i)
                    .insert(&txn)
                    .await
                    .unwrap();
                txn.rollback().await.unwrap();
            }
            let txn = db.begin().await.unwrap();
            let kept = product_am("committed", 1).insert(&txn).await.unwrap();
            txn.commit().await.unwrap();
            kept
        })
        .await;
    let got = receiver.wait_delivered(1, WAIT).await;
    assert!(observer.flush(WAIT).await);
    assert_eq!(receiver.requests().len(), 1);
    assert_eq!(got[0].data()["name"], "committed");
    assert_eq!(vendora_observe::outbox::pending(&db).await.unwrap(), 0);
    observer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_rolled_back_transactions_send_nothing() {
    let (db, _) = sqlite_file().await;
    rollback_case(db).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_rolled_back_transactions_send_nothing() {
    let (db, _) = postgres().await;
    rollback_case(db).await;
}

async fn write_rows(observer: &Observer, db: &DatabaseConnection, rows: i32, updates: i32) {
    observer
        .scope(async {
            for r in 0..rows {
                let p = product_am(&format!("row {r}"), 0).insert(db).await.unwrap();
                let mut p = p;
                for s in 1..=updates {
                    let mut am = p.into_active_model();
                    am.stock = Set(s);
                    p = am.update(db).await.unwrap();
                }
            }
        })
        .await;
}

async fn down_then_up_case(db: DatabaseConnection) {
    // Reserve a port, leave it closed while writing.
    let port = Reserved::new().unwrap();
    let url = port.url();
    let retry = common::retries_through_an_outage();
    let observer = outbox_observer(&db, &url, retry).await;
    // 100 rows x (created + 5 x (updated + stock:updated)) = 1,100 events.
    write_rows(&observer, &db, 100, 5).await;
    assert!(observer.stats().sent == 0);
    let receiver = Receiver::start_on(port, SECRET).unwrap();
    let delivered = receiver
        .wait_delivered(1100, Duration::from_secs(120))
        .await;
    assert!(observer.flush(WAIT).await);
    assert_complete_and_ordered(&receiver.delivered(), 1100);
    assert!(delivered.iter().all(|r| r.signature_ok));
    observer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_receiver_down_during_writes_then_up_gets_every_event_in_order() {
    let (db, _) = sqlite_file().await;
    down_then_up_case(db).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_receiver_down_during_writes_then_up_gets_every_event_in_order() {
    let (db, _) = postgres().await;
    down_then_up_case(db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_503s_then_200_delivers_once_with_one_id() {
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.queue_replies([
        Reply::Status(503, Some(0)),
        Reply::Status(503, None),
        Reply::Status(503, None),
    ]);
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    let all = common::one_write_attempts(&observer, &receiver, &db).await;
    assert_eq!(
        all.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 503, 503, 200]
    );
    let stats = observer.stats();
    assert_eq!(
        (stats.sent, stats.retried, stats.failed, stats.dead),
        (1, 3, 3, 0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_slower_than_the_timeout_is_retried() {
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // The common config's timeout is 2 s.
    receiver.queue_replies([Reply::Delay(Duration::from_secs(4))]);
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    observer
        .scope(product_am("slow", 1).insert(&db))
        .await
        .unwrap();
    receiver.wait_delivered(1, WAIT).await;
    assert!(observer.flush(WAIT).await);
    let stats = observer.stats();
    assert_eq!(stats.sent, 1);
    assert!(stats.failed >= 1 && stats.retried >= 1, "{stats:?}");
}

/// A relay writes an attempt's outcome only on a row still pending. A relay cut off from the
/// database past its lease (another relay took the row over and delivered it, then newer
/// events of the row) must not turn that delivered row dead when it finally writes its
/// failed attempt: `requeue` would then send the row's old state after the newer events.
#[tokio::test]
async fn a_late_failed_attempt_leaves_a_row_another_relay_delivered_alone() {
    use sea_orm::ConnectionTrait;
    let (_logs, logs) = common::capture_logs();
    let (db, _) = sqlite_file().await;
    let hole = vendora_pos::receiver::Blackhole::start().await.unwrap();
    // The receiver never answers: the event is dead once past its age, one second, at the
    // end of its attempt (a timeout of 2 s).
    let retry = fast_retries().max_age(Duration::from_secs(1));
    let observer = outbox_observer(&db, &hole.url(), retry).await;
    observer
        .scope(product_am("taken over", 1).insert(&db))
        .await
        .unwrap();
    // The relay holds the row; its request goes unanswered until the timeout (2 s).
    let leased = "SELECT COUNT(*) AS n FROM vendora_outbox WHERE claimed_by IS NOT NULL";
    eventually(WAIT, "the row is claimed", || async {
        scalar(&db, leased).await == 1
    })
    .await;
    // Meanwhile another relay delivered it: what its mark of delivered rows writes.
    db.execute_unprepared(
        "UPDATE vendora_outbox SET status = 'delivered', delivered_at = 1, \
         claimed_by = NULL, claimed_until = NULL",
    )
    .await
    .unwrap();
    eventually(
        WAIT,
        "the attempt timed out, past the event's age",
        || async { observer.stats().dead == 1 },
    )
    .await;
    // Every outcome is written once the relay has stopped.
    observer.shutdown(Duration::from_secs(5)).await;
    let counts = vendora_observe::outbox::counts(&db).await.unwrap();
    assert_eq!((counts.delivered, counts.dead), (1, 0), "{counts:?}");
    let logs = logs();
    assert!(
        logs.contains("(row 1) is not recorded: another relay took the row over")
            && logs.contains("the row is now delivered"),
        "the dead letter's line is followed by why the row stays as it is:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_is_dead_lettered_at_once_kept_and_can_be_requeued() {
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Status(401, None));
    let dead = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = dead.clone();
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_millis(50);
    let observer = Observer::builder(common::config(&receiver.url()))
        .retry(fast_retries())
        .outbox_options(options)
        .on_dead_letter(move |d| seen.lock().unwrap().push(d))
        .build()
        .await
        .unwrap();
    observer
        .scope(product_am("unauthorised", 1).insert(&db))
        .await
        .unwrap();
    let outbox = observer.outbox().unwrap().clone();
    eventually(WAIT, "the row is dead", || {
        let db = db.clone();
        async move {
            !vendora_observe::outbox::dead(&db, 10)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
    let rows = vendora_observe::outbox::dead(&db, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].attempts, 1, "a 401 is not retried");
    assert!(
        rows[0].last_error.as_deref().unwrap().contains("401"),
        "{rows:?}"
    );
    assert_eq!(receiver.requests().len(), 1);
    assert_eq!(dead.lock().unwrap().len(), 1);
    assert_eq!(dead.lock().unwrap()[0].webhook.id(), rows[0].event_id);
    // The server is fixed; requeue: delivered with the same id.
    receiver.set_reply(Reply::Ok);
    assert_eq!(outbox.requeue(None).await.unwrap().requeued, 1);
    let got = receiver.wait_delivered(1, WAIT).await;
    assert_eq!(got[0].id(), rows[0].event_id);
    assert!(
        vendora_observe::outbox::dead(&db, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn two_relays_on_one_postgres_send_no_duplicates_and_keep_order() {
    let (_guard, logs) = common::capture_logs();
    let (db, url) = postgres().await;
    two_relays_send_no_duplicates_and_keep_order(db, &url, logs).await;
}

/// On a SQLite file the two relays' claims take the write lock in turn (each claim is one
/// transaction begun `IMMEDIATE`), beside the writes of both instances.
#[tokio::test(flavor = "current_thread")]
async fn two_relays_on_one_sqlite_file_send_no_duplicates_and_keep_order() {
    let (_guard, logs) = common::capture_logs();
    let (db, url) = sqlite_file().await;
    two_relays_send_no_duplicates_and_keep_order(db, &url, logs).await;
}

/// Two instances, each with its own pool and relay, write to the same 40 rows, interleaved:
/// every event is delivered once, each row's in order, and no claim fails.
async fn two_relays_send_no_duplicates_and_keep_order(
    db: DatabaseConnection,
    url: &str,
    logs: impl Fn() -> String,
) {
    let db2 = vendora_pos::db::connect(url).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let a = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    let b = outbox_observer(&db2, &receiver.url(), fast_retries()).await;
    // Both instances write, interleaved, to the same rows.
    let mut ids = Vec::new();
    for r in 0..40 {
        let p = a
            .scope(product_am(&format!("r{r}"), 0).insert(&db))
            .await
            .unwrap();
        ids.push(p.id);
    }
    for s in 1..=10 {
        for (i, id) in ids.iter().enumerate() {
            let (obs, conn) = if (i + s as usize).is_multiple_of(2) {
                (&a, &db)
            } else {
                (&b, &db2)
            };
            let am = product::ActiveModel {
                id: sea_orm::ActiveValue::Unchanged(*id),
                stock: Set(s),
                ..Default::default()
            };
            obs.scope(am.update(conn)).await.unwrap();
        }
    }
    let total = 40 + 40 * 10 * 2;
    receiver
        .wait_delivered(total, Duration::from_secs(60))
        .await;
    assert!(a.flush(WAIT).await && b.flush(WAIT).await);
    assert_complete_and_ordered(&receiver.delivered(), total);
    assert_eq!(a.stats().sent + b.stats().sent, total as u64);
    let logs = logs();
    assert!(!logs.contains("claiming rows failed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_mid_stream_then_restart_delivers_every_committed_event() {
    use sea_orm::EntityTrait;
    use tokio::io::AsyncBufReadExt;
    let (db, db_url) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // The receiver answers slowly so that the child dies with events still queued.
    receiver.set_reply(Reply::Delay(Duration::from_millis(20)));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vendora-test-child"))
        .args(["crash-writer", &db_url, &receiver.url()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut committed = 0;
    while committed < 300 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the child stopped writing")
            .unwrap()
            .expect("the child exited");
        if let Some(n) = line.strip_prefix("committed ") {
            committed = n.parse::<i32>().unwrap() + 1;
        }
    }
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let before_restart = receiver.delivered().len();
    let rows = product::Entity::find().all(&db).await.unwrap();
    assert!(rows.len() >= 300);
    assert!(
        before_restart < rows.len(),
        "the crash should leave events undelivered"
    );
    // Restart: a new relay on the same file takes up what was committed.
    receiver.set_reply(Reply::Ok);
    let _observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    eventually(
        Duration::from_secs(90),
        "every committed event delivered",
        || {
            let db = db.clone();
            async move { vendora_observe::outbox::pending(&db).await.unwrap() == 0 }
        },
    )
    .await;
    // Rows claimed by the dead relay are taken back at once (its process is gone, on this
    // machine). Every committed row's created event arrived, duplicates only with the same
    // id.
    let delivered = receiver.delivered();
    let by_id: HashMap<i64, HashSet<String>> = delivered.iter().fold(HashMap::new(), |mut m, r| {
        m.entry(r.data()["id"].as_i64().unwrap())
            .or_default()
            .insert(r.id().to_owned());
        m
    });
    for row in &rows {
        let ids = by_id
            .get(&(row.id as i64))
            .unwrap_or_else(|| panic!("row {} never sent", row.id));
        assert_eq!(ids.len(), 1, "row {} sent under different ids", row.id);
    }
    assert_eq!(
        by_id.len(),
        rows.len(),
        "an event for a row that was not committed"
    );
}

/// An outbox observer whose poll is far longer than the test's deadline: only a wake-up
/// can deliver in time.
async fn slow_polling_observer(db: &DatabaseConnection, url: &str) -> Observer {
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_secs(600);
    options.lease = Duration::from_secs(3);
    Observer::builder(common::config(url))
        .retry(fast_retries())
        .outbox_options(options)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_autocommit_write_wakes_its_own_relay_at_once() {
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = slow_polling_observer(&db, &receiver.url()).await;
    // Let the relay finish its first (empty) round and go to sleep.
    assert!(observer.flush(WAIT).await);
    observer
        .scope(product_am("woken", 1).insert(&db))
        .await
        .unwrap();
    // 10 s, against a 600 s poll: the in-process signal did it.
    let got = receiver.wait_delivered(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].data()["name"], "woken");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_notify_wakes_a_relay_for_rows_another_instance_commits() {
    let (db, url) = postgres().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = slow_polling_observer(&db, &receiver.url()).await;
    assert!(observer.flush(WAIT).await);
    // Another instance (its own connection, no relay of ours in its process) commits a
    // change with its outbox row in one transaction.
    let other = vendora_pos::db::connect(&url).await.unwrap();
    let recorder_free = Observer::builder(common::config(&receiver.url()))
        .outbox_options({
            let mut o = vendora_observe::OutboxOptions::new(other.clone());
            o.poll_interval = Duration::from_secs(600);
            o.lease = Duration::from_secs(3);
            o
        })
        .build()
        .await
        .unwrap();
    // Stop the other instance's relay first: only ours may deliver.
    recorder_free.shutdown(Duration::from_secs(5)).await;
    let txn = other.begin().await.unwrap();
    recorder_free
        .scope(product_am("notified", 1).insert(&txn))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let got = receiver.wait_delivered(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].data()["name"], "notified");
    assert!(observer.flush(WAIT).await);
    assert_eq!(observer.stats().sent, 1, "our relay delivered it");
}

/// The relay's connections (claims, `LISTEN`) are its own, beside the application's pool:
/// an application whose pool holds a single connection keeps it for its writes (a relay
/// that held it between claims would leave the application waiting on its own pool).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_a_pool_of_one_connection_is_the_applications() {
    let (_, url) = postgres().await;
    let mut options = sea_orm::ConnectOptions::new(url);
    options
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let db = sea_orm::Database::connect(options).await.unwrap();
    vendora_pos::db::create_pos_tables(&db).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    observer
        .scope(async {
            for i in 0..20 {
                let txn = db.begin().await.unwrap();
                product_am(&format!("one connection {i}"), i)
                    .insert(&txn)
                    .await
                    .unwrap();
                txn.commit().await.unwrap();
            }
        })
        .await;
    let got = receiver.wait_delivered(20, WAIT).await;
    assert_complete_and_ordered(&got, 20);
    observer.shutdown(Duration::from_secs(5)).await;
}

/// The connection a relay claims on is its own, kept from claim to claim, named in
/// `pg_stat_activity`. Ended by the server (an administrator, a restart), it is replaced at
/// the next claim: the next event goes out at once, and no claim fails on the way (no
/// "claiming rows failed" warning), as when the pool checked each connection before use.
#[tokio::test]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_a_relay_whose_connection_the_server_ended_claims_on_a_new_one() {
    use sea_orm::ConnectionTrait;
    let (_guard, logs) = common::capture_logs();
    let (db, _) = postgres().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // A poll of 10 minutes: only NOTIFY (or a claim that works at once) delivers in time.
    let observer = slow_polling_observer(&db, &receiver.url()).await;
    let relay_pid = || async {
        db.query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE '%vendora-observe relay'",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<i32>("", "pid").unwrap())
        .collect::<Vec<_>>()
    };
    observer
        .scope(product_am("before", 1).insert(&db))
        .await
        .unwrap();
    receiver.wait_delivered(1, WAIT).await;
    let before = relay_pid().await;
    assert_eq!(before.len(), 1, "one connection of the relay's: {before:?}");
    db.execute_unprepared(&format!("SELECT pg_terminate_backend({})", before[0]))
        .await
        .unwrap();
    // The relay may look for work meanwhile and open its next connection at once.
    eventually(WAIT, "the server ended the relay's connection", || async {
        !relay_pid().await.contains(&before[0])
    })
    .await;
    observer
        .scope(product_am("after", 2).insert(&db))
        .await
        .unwrap();
    let got = receiver.wait_delivered(2, WAIT).await;
    assert_eq!(got[1].data()["name"], "after");
    let after = relay_pid().await;
    assert!(
        after.len() == 1 && after != before,
        "a new connection: {before:?} then {after:?}"
    );
    observer.shutdown(Duration::from_secs(5)).await;
    let logs = logs();
    assert!(
        !logs.contains("claiming rows failed"),
        "no claim failed:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------
// The claim must not walk retained delivered rows (a day of them by default).

/// Fills the outbox as a burst leaves it: `delivered + pending` rows of distinct keys
/// written, the planner's statistics taken (as autovacuum would, mid-burst), then the first
/// `delivered` rows delivered.
async fn fill_outbox(db: &DatabaseConnection, delivered: i64, pending: i64) {
    use sea_orm::ConnectionTrait;
    vendora_observe::outbox::create_table(db).await.unwrap();
    let txn = db.begin().await.unwrap();
    for i in 0..delivered + pending {
        txn.execute_unprepared(&format!(
            "INSERT INTO vendora_outbox (event_id, ordering_key, event, body, \
             next_attempt_at, created_at) VALUES ('e{i}', 'product:{i}', 'product:created', \
             '{{}}', 0, 0)"
        ))
        .await
        .unwrap();
    }
    txn.commit().await.unwrap();
    db.execute_unprepared("ANALYZE").await.unwrap();
    db.execute_unprepared(&format!(
        "UPDATE vendora_outbox SET status = 'delivered', delivered_at = 0 WHERE id <= {delivered}"
    ))
    .await
    .unwrap();
}

/// The claim's first step on `db`: the oldest pending rows not held by this relay (512,
/// the window of a claim of 128 rows).
fn frontier(db: &DatabaseConnection) -> sea_orm::Statement {
    frontier_of(db, 512)
}

fn frontier_of(db: &DatabaseConnection, window: usize) -> sea_orm::Statement {
    vendora_observe::__private::outbox_plan::frontier_statement(
        sea_orm::ConnectionTrait::get_database_backend(db),
        "test-relay",
        window,
        &[],
    )
}

/// The claim's second step: chain heads found by their keys, beyond row `beyond`.
fn skip_scan(db: &DatabaseConnection, beyond: i64) -> sea_orm::Statement {
    vendora_observe::__private::outbox_plan::skip_scan_statement(
        sea_orm::ConnectionTrait::get_database_backend(db),
        "",
        512,
        beyond,
    )
}

/// `statement` run behind `explain` (`EXPLAIN QUERY PLAN`, `EXPLAIN (ANALYZE, …)`): the
/// plan's lines, from the result column `column`.
async fn explain(
    db: &DatabaseConnection,
    explain: &str,
    column: &str,
    statement: sea_orm::Statement,
) -> Vec<String> {
    explain_with(db, explain, column, statement, None).await
}

/// [`explain`] with the PostgreSQL planner settings the relay runs `statement` with
/// (`SET LOCAL`, in a transaction of its own).
async fn explain_with(
    db: &DatabaseConnection,
    explain: &str,
    column: &str,
    statement: sea_orm::Statement,
    settings: Option<&str>,
) -> Vec<String> {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let txn = db.begin().await.unwrap();
    if let Some(settings) = settings {
        txn.execute_unprepared(settings).await.unwrap();
    }
    let plan = txn
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            statement.db_backend,
            format!("{explain} {}", statement.sql),
            statement.values.map(|v| v.0).unwrap_or_default(),
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", column).unwrap())
        .collect();
    txn.commit().await.unwrap();
    plan
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_claim_reads_pending_rows_through_their_own_index() {
    use sea_orm::ConnectionTrait;
    let (db, _dir) = sqlite_file().await;
    fill_outbox(&db, 5_000, 10).await;
    let plan = explain(&db, "EXPLAIN QUERY PLAN", "detail", frontier(&db)).await;
    assert!(
        plan.iter()
            .any(|l| l.contains("USING INDEX vendora_outbox_pending")),
        "the frontier does not read the pending rows' index: {plan:#?}"
    );
    assert!(
        !plan.iter().any(|l| l.contains("TEMP B-TREE")),
        "the frontier sorts: {plan:#?}"
    );
    assert_eq!(db.query_all_raw(frontier(&db)).await.unwrap().len(), 10);
    let plan = explain(&db, "EXPLAIN QUERY PLAN", "detail", skip_scan(&db, 0)).await;
    assert!(
        plan.iter()
            .filter(|l| l.contains("vendora_outbox"))
            .all(|l| l.contains("INDEX vendora_outbox_pending")),
        "the skip scan reads the table other than through the pending rows' indexes: {plan:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_claim_does_not_visit_delivered_rows() {
    let (db, _) = postgres().await;
    fill_outbox(&db, 20_000, 10).await;
    for (step, statement, settings) in [
        (
            "frontier",
            frontier(&db),
            vendora_observe::__private::outbox_plan::frontier_settings(
                sea_orm::DbBackend::Postgres,
                true,
            ),
        ),
        ("skip scan", skip_scan(&db, 0), None),
    ] {
        let plan = explain_with(
            &db,
            "EXPLAIN (ANALYZE, COSTS OFF)",
            "QUERY PLAN",
            statement,
            settings,
        )
        .await;
        let removed: u64 = plan
            .iter()
            .filter_map(|l| l.split("Rows Removed by Filter:").nth(1))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .sum();
        assert!(
            removed < 100,
            "the {step} filtered out {removed} rows (20,000 are delivered): {plan:#?}"
        );
    }
}

/// An outbox whose statistics were taken while nothing was pending (autovacuum's, at a
/// quiet moment), then 300 pending rows on 64 keys, every other one leased to relay `me`:
/// the ids of eight of them.
async fn pending_after_quiet_statistics(db: &DatabaseConnection) -> Vec<i64> {
    use sea_orm::ConnectionTrait;
    fill_outbox(db, 1_500, 0).await;
    db.execute_unprepared("ANALYZE vendora_outbox")
        .await
        .unwrap();
    db.execute_unprepared(
        "INSERT INTO vendora_outbox (event_id, ordering_key, event, body, next_attempt_at, \
         created_at, claimed_by, claimed_until) SELECT 'p' || i, 'product:' || (i % 64), \
         'product:updated', '{}', 0, 0, CASE WHEN i % 2 = 0 THEN 'me' END, \
         CASE WHEN i % 2 = 0 THEN 99999999999999 END FROM generate_series(1, 300) AS i",
    )
    .await
    .unwrap();
    (1_601..1_609).collect()
}

/// The statements that pick rows by id (the lease, the renewal, the hand-back) look them
/// up by primary key in the plan PostgreSQL caches for them (a prepared statement gets a
/// generic plan after five runs and keeps it), even with statistics that say nothing is
/// pending: they never walk the pending rows' indexes to find their few rows.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_rows_picked_by_id_are_looked_up_by_id_whatever_the_statistics() {
    use sea_orm::{ConnectionTrait, Value};
    let (db, _) = postgres().await;
    let ids = pending_after_quiet_statistics(&db).await;
    let statements = vendora_observe::__private::outbox_plan::by_id_statements(
        sea_orm::DbBackend::Postgres,
        "me",
        1_000,
        &ids,
    );
    for (name, statement) in statements {
        let args: Vec<String> = statement
            .values
            .iter()
            .flat_map(|v| v.0.iter())
            .map(|v| match v {
                Value::BigInt(Some(n)) => n.to_string(),
                Value::String(Some(s)) => format!("'{s}'"),
                other => panic!("unexpected value {other:?}"),
            })
            .collect();
        let txn = db.begin().await.unwrap();
        txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
            .await
            .unwrap();
        // A prepared statement outlives the transaction: each has a name of its own.
        txn.execute_unprepared(&format!("PREPARE by_id_{name} AS {}", statement.sql))
            .await
            .unwrap();
        let plan: Vec<String> = txn
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!(
                    "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE by_id_{name}({})",
                    args.join(", ")
                ),
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String>("", "QUERY PLAN").unwrap())
            .collect();
        txn.rollback().await.unwrap();
        let removed: u64 = plan
            .iter()
            .filter_map(|l| l.split("Rows Removed by Filter:").nth(1))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .sum();
        // The scan of the rows updated (the lease's checks scan the table under aliases).
        let scan = |l: &&String| l.contains("Scan") && l.contains(" on vendora_outbox (");
        assert!(
            plan.iter()
                .filter(scan)
                .all(|l| l.contains("Index Scan using vendora_outbox_pkey")),
            "the {name} does not look its rows up by primary key: {plan:#?}"
        );
        // The lease's check for older requeued rows is planned as badly with these
        // statistics (it may walk the pending rows for each row leased): not asserted.
        if name != "lease" {
            assert!(
                removed < 16,
                "the {name} read {removed} rows it did not update (300 are pending): {plan:#?}"
            );
        }
    }
}

/// SQLite looks the rows of the statements that pick them by id up by rowid.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_rows_picked_by_id_are_looked_up_by_rowid() {
    let (db, _dir) = sqlite_file().await;
    fill_outbox(&db, 1_500, 300).await;
    let ids: Vec<i64> = (1_601..1_609).collect();
    let statements = vendora_observe::__private::outbox_plan::by_id_statements(
        sea_orm::DbBackend::Sqlite,
        "me",
        1_000,
        &ids,
    );
    for (name, statement) in statements {
        let plan = explain(&db, "EXPLAIN QUERY PLAN", "detail", statement).await;
        let main: Vec<&String> = plan
            .iter()
            .filter(|l| {
                l.starts_with("SEARCH vendora_outbox") || l.starts_with("SCAN vendora_outbox")
            })
            .collect();
        assert!(
            !main.is_empty() && main.iter().all(|l| l.contains("INTEGER PRIMARY KEY")),
            "the {name} does not look its rows up by rowid: {plan:#?}"
        );
    }
}

/// The claim's first step in the middle of a drain: a relay that holds thousands of the
/// oldest pending rows (20,000 pending on 10 hot rows; its receiver answered the first
/// 2,000, then hangs) reads what its frontier returns, not the rows it holds. The statement
/// is the one the relay runs with those rows held, measured by PostgreSQL's own counts
/// against the same frontier walking past them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_claim_reads_what_it_returns_in_the_middle_of_a_drain() {
    use sea_orm::ConnectionTrait;
    let (db, _) = postgres().await;
    vendora_observe::outbox::create_table(&db).await.unwrap();
    db.execute_unprepared(
        "INSERT INTO vendora_outbox (event_id, ordering_key, event, body, next_attempt_at, \
         created_at) SELECT 'e' || i, 'product:' || (i % 10), 'product:updated', '{}', 0, 0 \
         FROM generate_series(1, 20000) AS i",
    )
    .await
    .unwrap();
    db.execute_unprepared("ANALYZE vendora_outbox")
        .await
        .unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::relay_for_slow_requests(&db, &receiver.url()).await;
    receiver.wait_delivered(2_000, WAIT).await;
    receiver.set_reply(Reply::Delay(Duration::from_secs(120)));
    // The relay claims until it holds all it may; then its rows stand still.
    let held = || async {
        db.query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT claimed_by AS relay, id FROM vendora_outbox \
             WHERE status = 'pending' AND claimed_by IS NOT NULL ORDER BY id",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get::<String>("", "relay").unwrap(),
                r.try_get::<i64>("", "id").unwrap(),
            )
        })
        .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + WAIT;
    // Measured while the rows held stand still: a measurement during which the relay
    // claimed (an outcome recorded late) is taken again.
    loop {
        let mut last = Vec::new();
        loop {
            let now = held().await;
            if now.len() >= 4_000 && now == last {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay still claims, or holds few rows: {}",
                now.len()
            );
            last = now;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let measured = measure_frontier(&db, &last).await;
        if held().await != last {
            assert!(
                std::time::Instant::now() < deadline,
                "the rows held never stood still through a measurement"
            );
            continue;
        }
        for (window, skipping, walking, skipped_runs, scattered, plan) in measured {
            println!(
                "window {window}: {} rows held, {skipped_runs} runs skipped; the frontier \
                 visits {skipping} index entries, {walking} walking past them",
                last.len(),
            );
            // The frontier returns `window` rows; it visits those, and of the held rows
            // only those outside the skipped runs (scattered among rows delivered already,
            // at the front of the drain).
            assert!(
                skipping <= window as u64 + scattered,
                "window {window}: the frontier visited {skipping} entries with {} rows held, \
                 {scattered} outside the runs: {plan:#?}",
                last.len()
            );
            // The measure is real: walking past the held rows visits them.
            assert!(walking >= last.len() as u64, "{walking}");
        }
        break;
    }
    observer.shutdown(Duration::ZERO).await;
}

/// For windows of 512 and 4,096, the index entries the frontier visits with the relay's
/// `held` rows (relay, id) skipped and walking past them, by PostgreSQL's own counts:
/// `(window, skipping, walking, runs skipped, held rows outside the runs, plan)`.
async fn measure_frontier(
    db: &DatabaseConnection,
    held: &[(String, i64)],
) -> Vec<(usize, u64, u64, usize, u64, Vec<String>)> {
    use vendora_observe::__private::outbox_plan::{frontier_settings, frontier_statement, runs_of};
    let relay = &held[0].0;
    assert!(held.iter().all(|(r, _)| r == relay), "one relay holds them");
    let runs = runs_of(held.iter().map(|(_, id)| *id));
    let settings = frontier_settings(sea_orm::DbBackend::Postgres, true);
    let skipped: i64 = runs.iter().map(|(first, last)| last - first + 1).sum();
    let scattered = held.len() as u64 - skipped as u64;
    let mut out = Vec::new();
    for window in [512, 4_096] {
        let mut read = Vec::new();
        for skip in [&runs[..], &[]] {
            let statement = frontier_statement(sea_orm::DbBackend::Postgres, relay, window, skip);
            let plan = explain_with(
                db,
                "EXPLAIN (ANALYZE, COSTS OFF)",
                "QUERY PLAN",
                statement,
                settings,
            )
            .await;
            let field = |l: &str, name: &str| -> u64 {
                l.split(name)
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            // Index entries visited: rows returned by each scan plus those its filter removed.
            let visited: u64 = plan
                .iter()
                .map(|l| {
                    if l.contains("Scan") && l.contains("actual") {
                        field(l, " rows=") * field(l, " loops=").max(1)
                    } else {
                        field(l, "Rows Removed by Filter: ")
                    }
                })
                .sum();
            read.push((visited, plan));
        }
        let [(skipping, plan), (walking, _)] = &read[..] else {
            unreachable!()
        };
        out.push((
            window,
            *skipping,
            *walking,
            runs.len(),
            scattered,
            plan.clone(),
        ));
    }
    out
}

/// A relay killed (SIGKILL) while it holds leased rows: a relay that starts on the same
/// machine sees that the process holding them is gone, takes them back at once instead of
/// waiting out their lease (10 minutes here), and says so.
#[tokio::test]
async fn sqlite_rows_of_a_killed_relay_on_this_machine_are_taken_back_at_once() {
    let (_guard, logs) = common::capture_logs();
    let (db, url) = sqlite_file().await;
    rows_of_a_killed_relay_are_taken_back(db, &url, logs, Start::AfterTheKill).await;
}

#[tokio::test]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_rows_of_a_killed_relay_on_this_machine_are_taken_back_at_once() {
    let (_guard, logs) = common::capture_logs();
    let (db, url) = postgres().await;
    rows_of_a_killed_relay_are_taken_back(db, &url, logs, Start::AfterTheKill).await;
}

/// The same kill while another relay runs beside it (the usual deployment: several
/// instances of one app): the running relay takes the rows back within a second or so of
/// the kill, not at the end of their ten-minute lease, and says so.
#[tokio::test]
async fn sqlite_a_running_relay_takes_back_the_rows_of_a_relay_killed_beside_it() {
    let (_guard, logs) = common::capture_logs();
    let (db, url) = sqlite_file().await;
    rows_of_a_killed_relay_are_taken_back(db, &url, logs, Start::BeforeTheKill).await;
}

#[tokio::test]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_a_running_relay_takes_back_the_rows_of_a_relay_killed_beside_it() {
    let (_guard, logs) = common::capture_logs();
    let (db, url) = postgres().await;
    rows_of_a_killed_relay_are_taken_back(db, &url, logs, Start::BeforeTheKill).await;
}

/// When the relay that takes the rows back starts: after the kill (a restart) or before
/// it (an instance running beside the killed one).
#[derive(PartialEq)]
enum Start {
    AfterTheKill,
    BeforeTheKill,
}

async fn rows_of_a_killed_relay_are_taken_back(
    db: DatabaseConnection,
    db_url: &str,
    logs: impl Fn() -> String,
    start: Start,
) {
    use tokio::io::AsyncBufReadExt;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // The child's first request hangs: what it claims stays leased to it.
    receiver.set_reply(Reply::Delay(Duration::from_secs(20)));
    // On PostgreSQL the child's connections carry its name, to see them end.
    let postgres = db_url.starts_with("postgres");
    let child_url = if postgres {
        let sep = if db_url.contains('?') { '&' } else { '?' };
        format!("{db_url}{sep}application_name=vendora-test-child")
    } else {
        db_url.to_owned()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vendora-test-child"))
        .args(["crash-writer", &child_url, &receiver.url(), "600"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while !tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the child stopped writing")
        .unwrap()
        .expect("the child exited")
        .starts_with("committed 49")
    {}
    let leased = "SELECT COUNT(*) AS n FROM vendora_outbox \
                  WHERE status = 'pending' AND claimed_by IS NOT NULL";
    common::eventually(WAIT, "rows leased to the child", || async {
        scalar(&db, leased).await > 0
    })
    .await;
    let mut observer = None;
    if start == Start::BeforeTheKill {
        receiver.set_reply(Reply::Ok);
        // A lease as long as the child's: nothing here ends by a lease running out.
        observer = Some(
            common::outbox_observer_with_lease(
                &db,
                &receiver.url(),
                fast_retries(),
                Duration::from_secs(600),
            )
            .await,
        );
        common::eventually(
            WAIT,
            "the running relay's look at the child's rows",
            || async {
                logs().contains("are leased to relays of processes running on this machine")
            },
        )
        .await;
    }
    let child_connections = "SELECT COUNT(*) AS n FROM pg_stat_activity \
                             WHERE application_name LIKE 'vendora-test-child%'";
    if postgres {
        assert!(scalar(&db, child_connections).await > 0, "the child's name");
    }
    let child_connections = "SELECT COUNT(*) AS n FROM pg_stat_activity \
                             WHERE application_name LIKE 'vendora-test-child%'";
    if postgres {
        assert!(scalar(&db, child_connections).await > 0, "the child's name");
    }
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    // A statement the child sent just before the kill (its last lease's COMMIT) still runs
    // on the server until its connection ends: counted before that, its rows were missed.
    if postgres {
        common::eventually(WAIT, "the killed child's connections ended", || async {
            scalar(&db, child_connections).await == 0
        })
        .await;
    }
    // A statement the child sent just before the kill (its last lease's COMMIT) still runs
    // on the server until its connection ends: counted before that, its rows were missed.
    if postgres {
        common::eventually(WAIT, "the killed child's connections ended", || async {
            scalar(&db, child_connections).await == 0
        })
        .await;
    }
    // The child's rows (its relay id names its pid). A relay running beside it may take
    // them back before they are counted here (it looks once a second): then none are left
    // under the child's id, and the line tells how many it found.
    let held = scalar(
        &db,
        &format!(
            "SELECT COUNT(*) AS n FROM vendora_outbox \
             WHERE status = 'pending' AND claimed_by LIKE '%:{pid}:%'"
        ),
    )
    .await;
    receiver.set_reply(Reply::Ok);
    let _observer = match observer {
        Some(observer) => observer,
        None => outbox_observer(&db, &receiver.url(), fast_retries()).await,
    };
    // Without the take-back, the child's rows (and every later row of its one task) would
    // wait ten minutes.
    common::eventually(WAIT, "every committed event delivered", || {
        let db = db.clone();
        async move { vendora_observe::outbox::pending(&db).await.unwrap() == 0 }
    })
    .await;
    let told = logs();
    let took_back = format!(
        "pending event(s) leased to a relay whose process (pid {pid}, this machine) is gone"
    );
    let counted = if held > 0 {
        format!("took back {held} {took_back}")
    } else {
        took_back
    };
    assert!(told.contains(&counted), "{told}");
    // Not waited for: no "leased to another relay" notice, no "no longer renews".
    assert!(!told.contains("are leased to another relay"), "{told}");
    assert!(!told.contains("no longer renews"), "{told}");
}

/// Rows leased to a relay whose process runs on this machine (here: this one) are left to
/// it: a second relay starting beside it neither takes them nor reports a stopped relay,
/// and says at info level what its chains wait for.
#[tokio::test]
async fn rows_leased_to_a_running_relay_on_this_machine_are_left_to_it() {
    let (_guard, logs) = common::capture_logs();
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // The first relay's first request hangs: what it claimed stays leased to it.
    receiver.set_reply(Reply::Delay(Duration::from_secs(20)));
    let url = receiver.url();
    let relay =
        || common::outbox_observer_with_lease(&db, &url, fast_retries(), Duration::from_secs(600));
    let first = relay().await;
    in_one_transaction(&first, &db, "held", 3).await;
    let leased = "SELECT COUNT(*) AS n FROM vendora_outbox \
                  WHERE status = 'pending' AND claimed_by IS NOT NULL";
    common::eventually(WAIT, "three rows leased to the first relay", || async {
        scalar(&db, leased).await == 3
    })
    .await;
    let holders = || async {
        use sea_orm::ConnectionTrait;
        db.query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT DISTINCT claimed_by AS relay FROM vendora_outbox \
             WHERE status = 'pending' AND claimed_by IS NOT NULL",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "relay").unwrap())
        .collect::<Vec<_>>()
    };
    let holder = holders().await;
    assert_eq!(holder.len(), 1, "{holder:?}");
    let second = relay().await;
    common::eventually(WAIT, "the second relay's look at them", || async {
        logs().contains(
            "3 pending event(s) are leased to relays of processes running on this machine",
        )
    })
    .await;
    // Still the first relay's three, none taken back.
    assert_eq!(scalar(&db, leased).await, 3);
    assert_eq!(holders().await, holder);
    let told = logs();
    assert!(!told.contains("took back"), "{told}");
    assert!(!told.contains("are leased to another relay"), "{told}");
    second.shutdown(Duration::from_millis(100)).await;
    first.shutdown(Duration::from_millis(100)).await;
}

/// Rows left leased by a relay this one cannot judge (on another machine, in another pid
/// namespace, or an id of an older version) wait out their lease: the next start says so
/// at once, with their count and why, instead of a silent minute; they go out when the
/// lease ends. Rows of a relay that stops renewing its lease while this one runs are told
/// of too.
#[tokio::test]
async fn sqlite_rows_left_leased_by_a_killed_relay_are_told_of_and_sent_after_the_lease() {
    let (_guard, logs) = common::capture_logs();
    let (db, _) = sqlite_file().await;
    rows_left_leased_by_a_killed_relay(db, logs).await;
}

#[tokio::test]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_rows_left_leased_by_a_killed_relay_are_told_of_and_sent_after_the_lease() {
    let (_guard, logs) = common::capture_logs();
    let (db, _) = postgres().await;
    rows_left_leased_by_a_killed_relay(db, logs).await;
}

async fn rows_left_leased_by_a_killed_relay(db: DatabaseConnection, logs: impl Fn() -> String) {
    use sea_orm::ConnectionTrait;
    let receiver = Receiver::start(SECRET).await.unwrap();
    vendora_observe::outbox::create_table(&db).await.unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // As a relay leaves rows when killed right after renewing their lease (10 s here), in
    // one transaction.
    let leased = |relay: &'static str, key: &'static str, n: usize, until: i64| {
        let db = db.clone();
        async move {
            let txn = db.begin().await.unwrap();
            for i in 0..n {
                txn.execute_unprepared(&format!(
                    "INSERT INTO vendora_outbox (event_id, ordering_key, unit_key, event, body, \
                     next_attempt_at, created_at, claimed_by, claimed_until) VALUES \
                     ('{relay}-{i}', '{key}', '{relay}', 'product:updated', \
                     '{{\"event\":\"product:updated\",\"data\":{{\"id\":{i}}}}}', \
                     0, 0, '{relay}', {until})"
                ))
                .await
                .unwrap();
            }
            txn.commit().await.unwrap();
        }
    };
    leased("killed-relay", "product:1", 3, now() + 10_000).await;
    let observer = common::outbox_observer_with_lease(
        &db,
        &receiver.url(),
        fast_retries(),
        Duration::from_secs(10),
    )
    .await;
    common::eventually(WAIT, "the start-up notice", || async {
        logs().contains("3 pending event(s) are leased to another relay")
    })
    .await;
    let told = logs();
    assert!(told.contains("OutboxOptions::lease, 10 s"), "{told}");
    assert!(told.contains("kill -9"), "{told}");
    assert!(
        receiver.delivered().is_empty(),
        "sent before their lease ended"
    );
    // The lease ends (moved to now, not waited for): they go out, in order.
    db.execute_unprepared(&format!(
        "UPDATE vendora_outbox SET claimed_until = {} WHERE claimed_by = 'killed-relay'",
        now() - 1
    ))
    .await
    .unwrap();
    let sent = receiver.wait_delivered(3, WAIT).await;
    let ids: Vec<_> = sent.iter().map(|r| r.data()["id"].clone()).collect();
    assert_eq!(ids, [0, 1, 2]);

    // Running now: a relay whose rows' lease ends in 4.9 s has not renewed it for 5.1 s (a
    // live one renews every 2.5 s here). Told of once.
    leased("stalled-relay", "product:2", 4, now() + 4_900).await;
    common::eventually(
        WAIT,
        "the notice of a relay that stopped renewing",
        || async {
            logs().contains(
                "4 pending event(s) are leased to a relay that no longer renews its lease",
            )
        },
    )
    .await;
    receiver.wait_delivered(7, WAIT).await;
    assert!(observer.flush(WAIT).await);
    assert_eq!(logs().matches("are leased to").count(), 2, "{}", logs());
}

/// Two relays share one SQLite file behind a slow receiver, with a lease (3 s) shorter
/// than the time the three events take one after the other (3 x 1.2 s): the relay holding
/// them renews their lease while they wait, the other never takes them, and every event
/// arrives once. (Each answer, 1.2 s, stays well inside the 2 s request timeout.)
#[tokio::test(flavor = "multi_thread")]
async fn rows_held_behind_a_slow_receiver_keep_their_lease_and_are_sent_once() {
    let (db, url) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Delay(Duration::from_millis(1200)));
    let a = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    let other = vendora_pos::db::connect(&url).await.unwrap();
    let b = outbox_observer(&other, &receiver.url(), fast_retries()).await;
    in_one_transaction(&a, &db, "slow", 3).await;
    receiver.wait_delivered(3, WAIT).await;
    assert!(a.flush(WAIT).await && b.flush(WAIT).await);
    // The receiver records a request when it answers: let every send in flight finish.
    a.shutdown(Duration::from_secs(10)).await;
    b.shutdown(Duration::from_secs(10)).await;
    let ids: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r.id().to_owned())
        .collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 3, "each event sent once: {ids:?}");
    assert_eq!(distinct.len(), 3, "three events: {ids:?}");
}

/// The one integer `sql` selects, as column `n`.
async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait;
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .unwrap()
    .expect("one row")
    .try_get("", "n")
    .unwrap()
}

/// `n` products written through `observer` in one transaction (one unit of work), named
/// `{prefix} 0` to `{prefix} {n-1}`, with stock 0 to n-1.
async fn in_one_transaction(observer: &Observer, db: &DatabaseConnection, prefix: &str, n: i32) {
    observer
        .scope(async {
            let txn = db.begin().await.unwrap();
            for i in 0..n {
                product_am(&format!("{prefix} {i}"), i)
                    .insert(&txn)
                    .await
                    .unwrap();
            }
            txn.commit().await.unwrap();
        })
        .await;
}

/// `Stats::pending` follows a backlog while the relay works through it, whatever the
/// features: it was counted only by a look for work that found nothing to take (or each
/// second by the `metrics` feature's sampler), so while the relay held all it may hold a
/// health check reading it saw the few rows of its last look, not the thousands waiting.
#[tokio::test(flavor = "multi_thread")]
async fn stats_pending_counts_the_backlog_while_the_relay_works_through_it() {
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // Every request hangs until the sender's timeout (2 s): nothing is delivered.
    receiver.set_reply(Reply::Delay(Duration::from_secs(30)));
    // Claims of 4 rows, 16 held at most.
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_millis(50);
    options.batch = 4;
    options.max_batch = 4;
    let observer = Observer::builder(common::config(&receiver.url()))
        .retry(fast_retries())
        .outbox_options(options)
        .build()
        .await
        .unwrap();
    // 200 units of work, one row each.
    for i in 0..200 {
        in_one_transaction(&observer, &db, &format!("unit {i}"), 1).await;
    }
    eventually(WAIT, "pending counts the whole backlog", || async {
        observer.stats().pending == 200
    })
    .await;
    receiver.set_reply(Reply::Ok);
    assert!(observer.flush(WAIT).await);
    assert_eq!(observer.stats().pending, 0);
    observer.shutdown(Duration::from_secs(5)).await;
}

/// Rows this relay has claimed and not yet written an outcome for.
async fn claimed(db: &DatabaseConnection) -> i64 {
    scalar(
        db,
        "SELECT COUNT(*) AS n FROM vendora_outbox \
         WHERE status = 'pending' AND claimed_by IS NOT NULL",
    )
    .await
}

/// 300 events (30 tasks, so 30 units of work of 10 rows each: no chain's share of a relay
/// binds) written to a SQLite file with no relay running, product names of `name_len`
/// bytes, and a receiver that answers nothing within the test (requests time out and are
/// retried): rows stay claimed once a relay takes them.
async fn backlog_behind_a_stalled_receiver(
    name_len: usize,
) -> (DatabaseConnection, String, Receiver) {
    let (db, url) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    // Writes only: its relay stops before anything is written.
    let writer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    writer.shutdown(Duration::ZERO).await;
    for chunk in 0..30 {
        let db = db.clone();
        tokio::spawn(writer.scope(async move {
            let txn = db.begin().await.unwrap();
            for i in 0..10 {
                let name = format!("backlog {chunk:02}.{i} ");
                let name = format!("{name}{}", "x".repeat(name_len.saturating_sub(name.len())));
                product_am(&name, i).insert(&txn).await.unwrap();
            }
            txn.commit().await.unwrap();
        }))
        .await
        .unwrap();
    }
    receiver.set_reply(Reply::Delay(Duration::from_secs(60)));
    (db, url, receiver)
}

/// A relay on `db` whose claims start at 8 rows and may grow to `max_batch`.
async fn growing_relay(
    db: &DatabaseConnection,
    receiver: &Receiver,
    max_held_bytes: usize,
    max_batch: usize,
) -> Observer {
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_millis(50);
    options.lease = Duration::from_secs(3);
    options.batch = 8;
    options.max_batch = max_batch;
    options.max_held_bytes = max_held_bytes;
    Observer::builder(common::config(&receiver.url()))
        .retry(fast_retries())
        .outbox_options(options)
        .build()
        .await
        .unwrap()
}

/// How many distinct events (by X-Webhook-Id) the receiver answered 2xx.
fn distinct_delivered(receiver: &Receiver) -> usize {
    receiver
        .delivered()
        .iter()
        .map(|r| r.id().to_owned())
        .collect::<HashSet<String>>()
        .len()
}

/// The receiver answers again: every one of the 300 events arrives, once.
async fn all_delivered_once(db: &DatabaseConnection, receiver: &Receiver, relay: &Observer) {
    receiver.set_reply(Reply::Ok);
    assert!(relay.flush(WAIT).await);
    assert_eq!(distinct_delivered(receiver), 300);
    assert_eq!(claimed(db).await, 0);
}

/// A relay starting on a backlog takes larger claims while they come back full: behind a
/// receiver that does not answer, with `batch` 8 and `max_batch` 64, it comes to hold more
/// than the 32 rows (4 x 8) that claims of a fixed size allow, and never more than 256
/// (4 x 64). Once the receiver answers, every event arrives, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_on_a_backlog_claims_more_rows_at_once_up_to_max_batch() {
    let (db, _url, receiver) = backlog_behind_a_stalled_receiver(0).await;
    let relay = growing_relay(&db, &receiver, 32 << 20, 64).await;
    eventually(WAIT, "the relay holds more than 4 x batch rows", || {
        let db = db.clone();
        async move { claimed(&db).await > 32 }
    })
    .await;
    // It goes on claiming up to its bound (4 x 64 of the 300 rows), and no further.
    eventually(WAIT, "the relay holds 4 x max_batch rows", || {
        let db = db.clone();
        async move { claimed(&db).await == 256 }
    })
    .await;
    all_delivered_once(&db, &receiver, &relay).await;
}

/// The latest lease end among claimed rows: it moves each time the relay renews, once per
/// turn of its loop on a heartbeat.
async fn lease_end(db: &DatabaseConnection) -> i64 {
    scalar(
        db,
        "SELECT COALESCE(MAX(claimed_until), 0) AS n FROM vendora_outbox",
    )
    .await
}

/// Claims grow only while the bodies held fit in `max_held_bytes`: with bodies of ~10 KB
/// and a budget of 100 bodies, the relay still grows past 4 x `batch` (32 rows), but after
/// several more turns of its loop (lease renewals) it holds no more than 100 rows, where
/// the row bound alone (4 x 64) would let it take 256.
#[tokio::test(flavor = "multi_thread")]
async fn claims_grow_only_while_the_bodies_held_fit_in_max_held_bytes() {
    let (db, _url, receiver) = backlog_behind_a_stalled_receiver(10_000).await;
    let body = scalar(&db, "SELECT MAX(LENGTH(body)) AS n FROM vendora_outbox").await;
    let relay = growing_relay(&db, &receiver, 100 * body as usize, 64).await;
    eventually(WAIT, "the relay holds more than 4 x batch rows", || {
        let db = db.clone();
        async move { claimed(&db).await > 32 }
    })
    .await;
    // Five renewals: five more turns of the loop, each free to claim again.
    for _ in 0..5 {
        let before = lease_end(&db).await;
        eventually(WAIT, "the relay renews its lease", || {
            let db = db.clone();
            async move { lease_end(&db).await > before }
        })
        .await;
    }
    let held = claimed(&db).await;
    assert!(
        (33..=100).contains(&held),
        "{held} rows of ~{body} bytes held with a budget of 100 such bodies"
    );
    all_delivered_once(&db, &receiver, &relay).await;
}

/// The events of one row leave one after the other: each becomes claimable once the one
/// before it is written delivered, and that write wakes the relay, not its poll.
#[tokio::test(flavor = "multi_thread")]
async fn later_events_of_one_row_follow_without_waiting_for_the_poll() {
    let (db, _dir) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = slow_polling_observer(&db, &receiver.url()).await;
    assert!(observer.flush(WAIT).await);
    observer
        .scope(async {
            let txn = db.begin().await.unwrap();
            let p = product_am("one row", 0).insert(&txn).await.unwrap();
            for stock in 1..=10 {
                let mut am = p.clone().into_active_model();
                am.stock = Set(stock);
                am.update(&txn).await.unwrap();
            }
            txn.commit().await.unwrap();
        })
        .await;
    // created, then 10 × (updated, stock:updated): 10 s against a 600 s poll.
    let got = receiver.wait_delivered(21, Duration::from_secs(10)).await;
    let stocks: Vec<i64> = got
        .iter()
        .filter(|r| r.event() == "stock:updated")
        .map(|r| r.data()["newStock"].as_i64().unwrap())
        .collect();
    assert_eq!(stocks, (1..=10).collect::<Vec<i64>>());
    observer.shutdown(Duration::from_secs(5)).await;
}

/// `shutdown` delivers the whole backlog before its deadline, not only the rows the relay
/// holds: 300 events written with no relay running, a relay that holds at most 32 rows
/// (claims of 8), shut down as soon as it starts. Every event arrives, nothing is left
/// pending, and the report says drained. A backlog still pending at the deadline is not
/// reported as drained.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_delivers_a_backlog_larger_than_the_relay_holds() {
    let (db, _url, receiver) = backlog_behind_a_stalled_receiver(0).await;
    receiver.set_reply(Reply::Ok);
    let relay = growing_relay(&db, &receiver, 32 << 20, 8).await;
    let report = relay.shutdown(WAIT).await;
    assert_eq!(
        (
            report.left,
            report.outcome_unknown,
            report.pending_in_outbox
        ),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(report.drained, "{report:?}");
    assert_eq!(distinct_delivered(&receiver), 300);

    // The same backlog behind a receiver that does not answer: the deadline passes with
    // rows pending, and the report and the log say so.
    let (db, _url, receiver) = backlog_behind_a_stalled_receiver(0).await;
    let relay = growing_relay(&db, &receiver, 32 << 20, 8).await;
    let (_guard, logs) = common::capture_logs();
    let report = relay.shutdown(Duration::from_millis(500)).await;
    assert_eq!(report.pending_in_outbox, 300, "{report:?}");
    assert!(!report.drained, "{report:?}");
    let logs = logs();
    assert!(
        logs.contains("WARN") && logs.contains("outbox: 300 event(s) still pending"),
        "{logs}"
    );
}

/// An instance that shuts down while another relay holds rows (a rolling restart) left
/// nothing of its own: the rows pending in the table are told of as information, not as a
/// warning that this program should act on. One thread, so that the log capture sees every
/// task.
#[tokio::test(flavor = "current_thread")]
async fn shutdown_beside_a_busy_relay_warns_of_nothing() {
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.reply_when("slow", Reply::Delay(Duration::from_secs(30)));
    let busy = common::relay_for_slow_requests(&db, &receiver.url()).await;
    // Outside a transaction: committed before the write wakes the relay, which polls
    // only once an hour.
    busy.scope(product_am("slow", 1).insert(&db)).await.unwrap();
    receiver.wait_until_arrived("slow", WAIT).await;

    let (_guard, logs) = common::capture_logs();
    let other = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    let report = other.shutdown(Duration::from_millis(100)).await;
    assert_eq!(
        (
            report.left,
            report.outcome_unknown,
            report.pending_in_outbox
        ),
        (0, 0, 1),
        "{report:?}"
    );
    let text = logs();
    assert!(text.contains("none of them held here"), "{text}");
    assert!(!text.contains("WARN"), "{text}");
    busy.shutdown(Duration::ZERO).await;
}

/// A request in flight when the shutdown deadline passes is reported as of unknown outcome,
/// not dead; its row stays pending with its lease handed back, so the next start sends it
/// again at once, with the same X-Webhook-Id.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_cuts_a_request_as_unknown_and_the_next_start_resends_it() {
    use sea_orm::ConnectionTrait;
    let (db, _) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.reply_when("cut short", Reply::Delay(Duration::from_secs(5)));
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    observer
        .scope(product_am("cut short", 1).insert(&db))
        .await
        .unwrap();
    receiver.wait_until_arrived("cut short", WAIT).await;
    let report = observer.shutdown(Duration::from_millis(200)).await;
    assert_eq!(
        (
            report.outcome_unknown,
            report.left,
            report.pending_in_outbox
        ),
        (1, 0, 1),
        "{report:?}"
    );
    assert!(!report.drained);
    assert_eq!(report.stats.dead, 0);
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT event_id, claimed_by, traceparent FROM vendora_outbox WHERE status = 'pending'",
        ))
        .await
        .unwrap()
        .expect("the row stays pending");
    assert_eq!(
        row.try_get::<Option<String>>("", "claimed_by").unwrap(),
        None
    );
    let event_id: String = row.try_get("", "event_id").unwrap();
    let stored: String = row.try_get("", "traceparent").unwrap();
    let stored = TraceParent::parse(&stored).expect("the write's trace is stored with the row");
    receiver.clear_rules();
    let again = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    assert!(again.flush(WAIT).await);
    assert_eq!(again.stats().sent, 1);
    assert!(receiver.delivered().iter().any(|r| r.id() == event_id));
    // The attempt after the restart is a span of the write's trace.
    let attempts: Vec<TraceParent> = receiver
        .delivered()
        .iter()
        .map(|r| TraceParent::parse(r.header("traceparent").unwrap()).unwrap())
        .collect();
    assert_eq!(attempts.len(), 1);
    assert!(
        attempts.iter().all(|a| a.trace_id() == stored.trace_id()),
        "{attempts:?} vs {stored:?}"
    );
}

/// A table made by an earlier version (no `traceparent`, `kind`, … columns) is brought up
/// to date at start, and its rows are delivered, each in a trace of its own.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_outbox_table_is_upgraded_and_its_rows_delivered() {
    use sea_orm::ConnectionTrait;
    let (db, _) = sqlite_file().await;
    db.execute_unprepared(
        "CREATE TABLE vendora_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, \
         event_id VARCHAR(64) NOT NULL UNIQUE, ordering_key TEXT NOT NULL, event TEXT NOT NULL, \
         body TEXT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'pending', \
         attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at BIGINT NOT NULL, last_error TEXT, \
         created_at BIGINT NOT NULL, delivered_at BIGINT, claimed_by VARCHAR(64), \
         claimed_until BIGINT)",
    )
    .await
    .unwrap();
    db.execute_unprepared(
        "INSERT INTO vendora_outbox (event_id, ordering_key, event, body, next_attempt_at, \
         created_at) VALUES ('old-1', 'product:1', 'product:updated', \
         '{\"event\":\"product:updated\",\"data\":{\"id\":1}}', 0, 0)",
    )
    .await
    .unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    observer
        .scope(product_am("new", 1).insert(&db))
        .await
        .unwrap();
    assert!(observer.flush(WAIT).await);
    let got = receiver.delivered();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id(), "old-1");
    for r in &got {
        assert!(TraceParent::parse(r.header("traceparent").unwrap()).is_some());
    }
}

/// An entity of its own, so that no other test of this binary has warned about it yet
/// (the warning is once per entity and process).
mod note {
    use sea_orm::entity::prelude::*;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
    #[sea_orm(table_name = "notes")]
    #[observe(event = "note")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub text: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

fn note_am(text: &str) -> note::ActiveModel {
    note::ActiveModel {
        id: sea_orm::ActiveValue::NotSet,
        text: Set(text.to_owned()),
    }
}

/// The first outbox write of an entity outside a transaction says, once, that a crash
/// between the two commits would lose its event, and what to do.
#[tokio::test(flavor = "current_thread")]
async fn an_autocommit_outbox_write_warns_once_per_entity() {
    let (_guard, logs) = common::capture_logs();
    let (db, _) = sqlite_file().await;
    vendora_pos::db::create_table(&db, note::Entity)
        .await
        .unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    observer
        .scope(async {
            let txn = db.begin().await.unwrap();
            product_am("in a transaction", 1)
                .insert(&txn)
                .await
                .unwrap();
            txn.commit().await.unwrap();
        })
        .await;
    assert!(!logs().contains("outside a transaction"), "{}", logs());
    observer
        .scope(async {
            note_am("autocommit 1").insert(&db).await.unwrap();
            note_am("autocommit 2").insert(&db).await.unwrap();
        })
        .await;
    let text = logs();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("outside a transaction"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("`note`"), "{}", warnings[0]);
    assert!(warnings[0].contains("db.transaction"), "{}", warnings[0]);
    assert!(observer.flush(WAIT).await);
}

/// The claim reads a bounded number of rows whatever the backlog: 20,000 pending rows on
/// 10 keys (ten hot rows), measured by PostgreSQL's own row counts, before the table has
/// statistics (autovacuum off: as a role that may not `ANALYZE` the table meets it until
/// autovacuum comes by) and after `ANALYZE`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_claim_cost_does_not_follow_the_backlog_of_hot_rows() {
    use sea_orm::ConnectionTrait;
    use vendora_observe::__private::outbox_plan::frontier_settings;
    let backlog = frontier_settings(sea_orm::DbBackend::Postgres, true);
    let (db, _) = postgres().await;
    vendora_observe::outbox::create_table(&db).await.unwrap();
    db.execute_unprepared("ALTER TABLE vendora_outbox SET (autovacuum_enabled = off)")
        .await
        .unwrap();
    db.execute_unprepared(
        "INSERT INTO vendora_outbox (event_id, ordering_key, unit_key, event, body, \
         next_attempt_at, created_at) SELECT 'e' || i, 'product:' || (i % 10), 'u' || (i % 10), \
         'product:updated', '{}', 0, 0 FROM generate_series(1, 20000) AS i",
    )
    .await
    .unwrap();
    let beyond = scalar(
        &db,
        "SELECT id AS n FROM vendora_outbox ORDER BY id OFFSET 511 LIMIT 1",
    )
    .await;
    for statistics in ["none", "ANALYZE"] {
        if statistics == "ANALYZE" {
            db.execute_unprepared("ANALYZE vendora_outbox")
                .await
                .unwrap();
        }
        // A claim of 128 rows, and the largest frontier (a claim of 1,024 rows or more
        // reads 4,096): each reads what its window holds, not the 20,000.
        for (step, statement, settings, bound) in [
            ("frontier", frontier(&db), backlog, 2_000),
            ("skip scan", skip_scan(&db, beyond), None, 2_000),
            ("largest frontier", frontier_of(&db, 4_096), backlog, 4_200),
        ] {
            let plan = explain_with(
                &db,
                "EXPLAIN (ANALYZE, COSTS OFF)",
                "QUERY PLAN",
                statement,
                settings,
            )
            .await;
            // Rows produced by every scan of the table, each loop counted.
            let read: u64 = plan
                .iter()
                .filter(|l| l.contains("Scan") && l.contains("actual"))
                .map(|l| {
                    let field = |name: &str| -> u64 {
                        l.split(name)
                            .nth(1)
                            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0)
                    };
                    field(" rows=") * field(" loops=").max(1)
                })
                .sum();
            assert!(
                read < bound,
                "statistics: {statistics}; the {step} read {read} rows of 20,000 pending: {plan:#?}"
            );
        }
    }
}

/// A table left by an older version whose trigger function differs from this version's:
/// start-up replaces the function (it used to keep any function of that name), and changes
/// nothing once it is current.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_an_older_trigger_function_is_replaced_at_start() {
    use sea_orm::ConnectionTrait;
    let (db, _) = postgres().await;
    vendora_observe::outbox::create_table(&db).await.unwrap();
    let source = |db: DatabaseConnection| async move {
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT prosrc FROM pg_proc WHERE proname = 'vendora_outbox_notify'",
        ))
        .await
        .unwrap()
        .expect("the trigger function")
        .try_get::<String>("", "prosrc")
        .unwrap()
    };
    let current = source(db.clone()).await;
    assert!(current.contains("pg_notify('vendora_outbox'"), "{current}");
    db.execute_unprepared(
        "CREATE OR REPLACE FUNCTION vendora_outbox_notify() RETURNS trigger AS $$ \
         BEGIN RETURN NULL; END; $$ LANGUAGE plpgsql",
    )
    .await
    .unwrap();
    vendora_observe::outbox::create_table(&db).await.unwrap();
    assert_eq!(source(db.clone()).await, current);
    // Current now: a second start finds nothing to change (no DDL, so its `xmin` stays).
    let version = "SELECT xmin::text AS v FROM pg_proc WHERE proname = 'vendora_outbox_notify'";
    let before = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            version,
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<String>("", "v")
        .unwrap();
    vendora_observe::outbox::create_table(&db).await.unwrap();
    let after = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            version,
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<String>("", "v")
        .unwrap();
    assert_eq!(
        before, after,
        "a start with everything current rewrote the function"
    );
}

/// Five instances start at once on a fresh PostgreSQL database, twenty times: every start
/// creates or finds the outbox table (its trigger included) without an error.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_schema_creation_is_safe_under_concurrent_starts() {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};
    let mut children: Vec<_> = (0..5)
        .map(|_| {
            let mut child = Command::new(env!("CARGO_BIN_EXE_vendora-test-child"))
                .arg("schema")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            (child, out)
        })
        .collect();
    let next = |out: &mut std::io::BufReader<std::process::ChildStdout>| -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "a child exited");
            let l = line.trim();
            if l == "ready" || l == "ok" || l.starts_with("error") {
                return l.to_owned();
            }
        }
    };
    let mut failures = Vec::new();
    for round in 0..20 {
        let url = common::postgres_database().await;
        for (child, _) in &mut children {
            writeln!(child.stdin.as_mut().unwrap(), "{url}").unwrap();
        }
        for (_, out) in &mut children {
            assert_eq!(next(out), "ready");
        }
        for (child, _) in &mut children {
            writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
        }
        for (_, out) in &mut children {
            let result = next(out);
            if result != "ok" {
                failures.push(format!("round {round}: {result}"));
            }
        }
    }
    for (mut child, _) in children {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of 100 starts failed: {failures:#?}",
        failures.len()
    );
}

/// An idle relay looks for work once a poll with one statement: it used to count the
/// pending rows again after each look (two statements a poll, each a line in a log that
/// shows SeaORM's statements, which SeaORM's default does at `info`). The count comes from
/// the look. PostgreSQL, whose statements run (and are logged) on the task that awaits
/// them, and one thread, so that the log capture sees every task; SQLite's run on a
/// thread of their own.
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_an_idle_relay_runs_one_statement_per_poll() {
    let (_guard, logs) = common::capture_logs();
    let (_db, url) = postgres().await;
    // SeaORM's defaults: every statement logged at `info`.
    let db = sea_orm::Database::connect(url.as_str()).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    let started = logs().len();
    let looks = |text: &str| {
        text.matches("SELECT id, ordering_key, unit_key, claimed_until")
            .count()
    };
    common::eventually(WAIT, "twenty polls", || {
        let text = logs();
        async move { looks(&text[started..]) >= 20 }
    })
    .await;
    let text = logs();
    let idle = &text[started..];
    // The `metrics` feature (on in this suite) samples the backlog gauge once a second
    // with a count of its own: a few in all, where the relay's own were one per look.
    let counts = idle.matches("SELECT COUNT(*)").count();
    assert!(counts * 2 < looks(idle), "{counts} counts:\n{idle}");
    assert_eq!(observer.stats().pending, 0);
    assert!(observer.shutdown(Duration::from_secs(5)).await.drained);
}

/// Creating the table on PostgreSQL leaves nothing in the application's log: the `IF
/// EXISTS` clauses' "does not exist, skipping" notices reached it at `info` through sqlx.
/// One thread, so that the log capture sees every task.
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_creating_the_table_logs_no_notice() {
    let (db, _url) = postgres().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let (_guard, logs) = common::capture_logs();
    let observer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    assert!(observer.shutdown(Duration::from_secs(5)).await.drained);
    let logs = logs();
    assert!(!logs.contains("notice"), "{logs}");
    let created = scalar(
        &db,
        "SELECT COUNT(*) AS n FROM pg_indexes WHERE tablename = 'vendora_outbox'",
    )
    .await;
    assert!(created > 1, "the table and its indexes were created");
}

/// An application role that may not change the schema (on PostgreSQL 15 and later, any
/// role but the database's owner) starts an outbox observer on a table a migration made,
/// and delivers through it. Before the migration, start-up fails and says what to run and
/// grant. (Start-up used to run `CREATE … IF NOT EXISTS` every time, which PostgreSQL
/// refuses to such a role even when everything exists.) Through a backlog, the relay's
/// statistics refresh, which such a role may not run, logs no warning (PostgreSQL's
/// "only table or database owner can analyze it" reached the application's log once a
/// minute through sqlx). One thread, so that the log capture sees every task.
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_an_application_role_without_ddl_rights_starts_on_a_prepared_table() {
    use sea_orm::ConnectionTrait;
    let (_guard, logs) = common::capture_logs();
    let (owner, url) = postgres().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let role = format!("vendora_t_app_{nanos:x}");
    // Roles an earlier failed run left behind, once nothing is granted to them any more
    // (their databases are dropped after an hour): roles are the cluster's, not the
    // database's.
    let stale = owner
        .query_all_raw(sea_orm::Statement::from_string(
            owner.get_database_backend(),
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'vendora\\_t\\_app\\_%'",
        ))
        .await
        .unwrap();
    for r in stale {
        let name: String = r.try_get("", "rolname").unwrap();
        let _ = owner
            .execute_unprepared(&format!("DROP ROLE IF EXISTS {name}"))
            .await;
    }
    for sql in [
        format!("CREATE ROLE {role} LOGIN PASSWORD 'app'"),
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"),
    ] {
        owner.execute_unprepared(&sql).await.unwrap();
    }
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host_and_db) = rest.split_once('@').unwrap();
    let app = vendora_pos::db::connect(&format!("{scheme}://{role}:app@{host_and_db}"))
        .await
        .unwrap();

    let refused = Observer::builder(common::config(&receiver.url()))
        .outbox(app.clone())
        .build()
        .await
        .map(|_| ())
        .unwrap_err();
    // What to do in the message; what PostgreSQL said is its cause, once, not in the
    // message too.
    let cause = std::error::Error::source(&refused).expect("the database's error");
    assert!(cause.to_string().contains("permission denied"), "{cause}");
    assert!(
        !refused.to_string().contains("permission denied"),
        "{refused}"
    );
    let refused = vendora_observe::ErrorChain(&refused).to_string();
    for part in [
        "permission denied",
        "vendora_observe::outbox::create_table",
        "SELECT, INSERT, UPDATE, DELETE on vendora_outbox",
        "USAGE on vendora_outbox_id_seq",
    ] {
        assert!(refused.contains(part), "{part:?} not in: {refused}");
    }

    // The migration, by the owner.
    vendora_observe::outbox::create_table(&owner).await.unwrap();
    for sql in [
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON vendora_outbox TO {role}"),
        format!("GRANT USAGE ON SEQUENCE vendora_outbox_id_seq TO {role}"),
    ] {
        owner.execute_unprepared(&sql).await.unwrap();
    }
    let observer = outbox_observer(&app, &receiver.url(), fast_retries()).await;
    observer
        .scope(async {
            let txn = app.begin().await.unwrap();
            product_am("least privilege", 1).insert(&txn).await.unwrap();
            txn.commit().await.unwrap();
        })
        .await;
    let got = receiver.wait_delivered(1, WAIT).await;
    assert_eq!(got[0].event(), "product:created");
    // A backlog: the relay's first full claim refreshes the statistics.
    in_one_transaction(&observer, &app, "backlog", 300).await;
    receiver.wait_delivered(301, WAIT).await;
    // The relay's tasks end with it, the refresh included.
    assert!(observer.shutdown(Duration::from_secs(5)).await.drained);
    // Nothing of the role's missing rights reached the log: no refused ANALYZE, no
    // notice. (A loaded machine may log a slow pool or a lease renewed late: not this.)
    let logs = logs();
    assert!(!logs.contains("analyze"), "{logs}");
    assert!(
        !logs.lines().any(|l| l.contains("WARN")
            && (l.contains("permission") || l.contains("owner") || l.contains("skipping"))),
        "{logs}"
    );

    app.close().await.unwrap();
    for sql in [
        format!("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"),
        format!("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"),
        format!("DROP ROLE {role}"),
    ] {
        owner.execute_unprepared(&sql).await.unwrap();
    }
}

/// The bench's two ceilings do what BENCHMARKS.md says: the relay's statements alone mark
/// every row delivered and send nothing; the reader sends every pending row once, in id
/// order across its batches, and writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_bench_ceilings_send_or_write_what_they_say() {
    use vendora_observe::__private::outbox_plan::{drain_without_sending, send_without_writing};
    let (db, _file) = sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    let writer = outbox_observer(&db, &receiver.url(), fast_retries()).await;
    // Writes only, as in the bench: the relay is stopped before anything is written.
    writer.shutdown(Duration::ZERO).await;
    // 5 rows x (created + updated + stock:updated) = 15 events.
    write_rows(&writer, &db, 5, 1).await;
    let pending = vendora_observe::outbox::counts(&db).await.unwrap().pending;
    assert_eq!(pending, 15);

    let not_direct = send_without_writing(&db, &writer, 4).await;
    assert!(not_direct.is_err(), "an outbox observer is refused");
    let direct = common::observer_for(&receiver.url(), fast_retries()).await;
    assert_eq!(send_without_writing(&db, &direct, 4).await.unwrap(), 15);
    let got = receiver.wait_delivered(15, WAIT).await;
    assert_complete_and_ordered(&got, 15);
    let counts = vendora_observe::outbox::counts(&db).await.unwrap();
    assert_eq!(
        (counts.pending, counts.delivered),
        (15, 0),
        "nothing written"
    );

    assert_eq!(drain_without_sending(&db, 4).await.unwrap(), 15);
    let counts = vendora_observe::outbox::counts(&db).await.unwrap();
    assert_eq!((counts.pending, counts.delivered), (0, 15));
    assert!(direct.flush(WAIT).await);
    assert_eq!(
        receiver.delivered().len(),
        15,
        "the statements alone send nothing"
    );
    direct.shutdown(Duration::from_secs(5)).await;
}

/// A write in a transaction wakes the relay before it commits (the hook runs inside the
/// transaction, and SeaORM has no commit hook): the relay, finding nothing yet, looks again
/// shortly after and sends it at its commit, without waiting for a poll (this relay polls
/// once an hour, and SQLite has no NOTIFY).
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_write_in_a_transaction_goes_out_at_its_commit_without_a_poll() {
    use sea_orm::ConnectionTrait;
    let (_, url) = common::sqlite_file().await;
    // Several connections (SeaORM's SQLite default is one, on which the relay's look would
    // wait for the transaction), in WAL mode, where a read does not wait for the open
    // transaction: the relay's look finds nothing.
    let mut options = sea_orm::ConnectOptions::new(url);
    options.max_connections(4).sqlx_logging(false);
    let db = sea_orm::Database::connect(options).await.unwrap();
    db.execute_unprepared("PRAGMA journal_mode=WAL")
        .await
        .unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = common::relay_for_slow_requests(&db, &receiver.url()).await;
    for i in 0..5 {
        observer
            .scope(async {
                let txn = db.begin().await.unwrap();
                product_am(&format!("in a transaction {i}"), i)
                    .insert(&txn)
                    .await
                    .unwrap();
                // The relay, woken by the insert, looks while the transaction is open.
                tokio::time::sleep(Duration::from_millis(20)).await;
                txn.commit().await.unwrap();
            })
            .await;
        receiver.wait_delivered(i as usize + 1, WAIT).await;
    }
    observer.shutdown(Duration::from_secs(5)).await;
}
