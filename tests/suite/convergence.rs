//! The apps end on the database's state: latest-wins coalescing, dead events and requeue,
//! exact watch events under concurrent transactions, and no stale old value after a failed
//! write. Real SQLite (file) and PostgreSQL, a real receiver.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{SECRET, WAIT, product_am};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Unchanged, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityTrait, IntoActiveModel, Set, TransactionTrait,
};
use vendora_observe::{Observer, RetryPolicy, testing::Recorder};
use vendora_pos::entities::product;
use vendora_pos::receiver::{Receiver, Reply};

/// A price list entry whose apps only need the latest value: `latest_wins`.
mod price {
    use sea_orm::entity::prelude::*;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
    #[sea_orm(table_name = "prices")]
    #[observe(event = "price", watch = "amount", latest_wins)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub amount: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// One task creates a price and changes it 30 times while the receiver answers slowly:
/// superseded events are skipped, the app sees the creation first and ends on the last
/// value, every value it sees newer than the one before.
async fn latest_wins_case(db: DatabaseConnection, observer: Observer, receiver: Receiver) {
    vendora_pos::db::create_table(&db, price::Entity)
        .await
        .unwrap();
    observer
        .scope(async {
            let mut p = price::ActiveModel {
                id: sea_orm::ActiveValue::NotSet,
                amount: Set(0),
            }
            .insert(&db)
            .await
            .unwrap();
            for amount in 1..=30 {
                let mut am = p.into_active_model();
                am.amount = Set(amount);
                p = am.update(&db).await.unwrap();
            }
        })
        .await;
    assert!(observer.flush(WAIT).await);
    let got = receiver.delivered();
    let names: Vec<String> = got.iter().map(|r| r.event()).collect();
    assert_eq!(names[0], "price:created");
    let amounts = |event: &str| -> Vec<i64> {
        got.iter()
            .filter(|r| r.event() == event)
            .map(|r| {
                let d = r.data();
                d.get("amount")
                    .or_else(|| d.get("newAmount"))
                    .and_then(|v| v.as_i64())
                    .unwrap()
            })
            .collect()
    };
    for event in ["price:updated", "amount:updated"] {
        let seen = amounts(event);
        assert_eq!(seen.last(), Some(&30), "{event}: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{event}: {seen:?}");
    }
    let stats = observer.stats();
    assert!(
        stats.superseded > 0 && got.len() < 61,
        "nothing was coalesced: {} sent, {stats:?}",
        got.len()
    );
    assert_eq!(stats.sent + stats.superseded, 61, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_latest_wins_skips_superseded_events_and_ends_on_the_last_value() {
    let env = common::env().await;
    env.receiver
        .set_reply(Reply::Delay(Duration::from_millis(100)));
    latest_wins_case(env.db, env.observer, env.receiver).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_latest_wins_skips_superseded_events_and_ends_on_the_last_value() {
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Delay(Duration::from_millis(100)));
    let observer = common::outbox_observer(&db, &receiver.url(), common::fast_retries()).await;
    latest_wins_case(db, observer, receiver).await;
}

/// The last full-state event and the last `stock:updated` each row's app saw, by arrival.
fn last_seen(receiver: &Receiver) -> HashMap<i64, (Option<i64>, Option<i64>)> {
    let mut got = receiver.delivered();
    got.sort_by_key(|r| r.received_at);
    let mut last: HashMap<i64, (Option<i64>, Option<i64>)> = HashMap::new();
    for r in got {
        let d = r.data();
        match r.event().as_str() {
            "product:created" | "product:updated" => {
                last.entry(d["id"].as_i64().unwrap()).or_default().0 = d["stock"].as_i64();
            }
            "stock:updated" => {
                last.entry(d["productId"].as_i64().unwrap()).or_default().1 =
                    d["newStock"].as_i64();
            }
            other => panic!("unexpected {other}"),
        }
    }
    last
}

/// The receiver refuses every event (422: not retried, so each dies at its first attempt);
/// then it accepts again and three of the five rows are written again. Requeueing
/// everything must leave every row's app on the row's final state: the dead events of the
/// three rows written again are stale and are not resent; those of the other two are.
async fn dead_events_then_requeue_end_on_the_final_state(db: DatabaseConnection) {
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Status(422, None));
    let retry = RetryPolicy::default()
        .max_attempts(2)
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(20))
        .max_retry_after(Duration::from_secs(1))
        .probe_interval(Duration::from_millis(100));
    let observer = common::outbox_observer(&db, &receiver.url(), retry).await;
    let outbox = observer.outbox().unwrap().clone();
    let mut rows = Vec::new();
    observer
        .scope(async {
            for r in 0..5 {
                let mut p = product_am(&format!("row{r}"), 0).insert(&db).await.unwrap();
                for stock in 1..=2 {
                    let mut am = p.into_active_model();
                    am.stock = Set(stock);
                    p = am.update(&db).await.unwrap();
                }
                rows.push(p.id);
            }
        })
        .await;
    // 5 rows x (created + 2 x (updated + stock:updated))
    common::eventually(Duration::from_secs(30), "every event dead", || {
        let db = db.clone();
        async move { vendora_observe::outbox::dead(&db, 100).await.unwrap().len() == 25 }
    })
    .await;
    receiver.set_reply(Reply::Ok);
    observer
        .scope(async {
            for id in &rows[..3] {
                let am = product::ActiveModel {
                    id: Unchanged(*id),
                    stock: Set(10),
                    ..Default::default()
                };
                am.update(&db).await.unwrap();
            }
        })
        .await;
    receiver.wait_delivered(6, WAIT).await;
    assert!(observer.flush(WAIT).await);
    let requeued = outbox.requeue(None).await.unwrap();
    // The three rows' dead events were marked stale when their newer events were
    // delivered; the other two rows' ten dead events go out again.
    assert_eq!(requeued.requeued, 10, "{requeued:?}");
    receiver.wait_delivered(16, WAIT).await;
    assert!(observer.flush(WAIT).await);
    let last = last_seen(&receiver);
    for id in rows {
        let row = product::Entity::find_by_id(id)
            .one(&db)
            .await
            .unwrap()
            .unwrap();
        let stock = Some(row.stock as i64);
        assert_eq!(
            last[&(id as i64)],
            (stock, stock),
            "row {id}: the app's last events are not the row's state"
        );
    }
    let counts = vendora_observe::outbox::counts(&db).await.unwrap();
    assert_eq!((counts.dead, counts.pending), (0, 0), "{counts:?}");
    assert_eq!(counts.superseded, 15, "{counts:?}");
    observer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_dead_events_then_requeue_end_on_the_final_state() {
    let (db, _) = common::sqlite_file().await;
    dead_events_then_requeue_end_on_the_final_state(db).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_dead_events_then_requeue_end_on_the_final_state() {
    let (db, _) = common::postgres().await;
    dead_events_then_requeue_end_on_the_final_state(db).await;
}

/// Two relays share the table. One dead-letters an event of a row (the receiver refuses it)
/// while the other is busy with a slow request; the busy one then delivers the row's next
/// event, which makes the dead one stale: it is marked superseded, so a requeue does not
/// resend old state after new. (A relay learned of the dead rows of other relays only when
/// idle, and marked its deliveries without looking for stale dead rows while busy.) SQLite:
/// the busy relay polls once an hour and nothing else wakes it, so the other relay is the
/// one that meets the refusal; on PostgreSQL a NOTIFY wakes both.
/// A requeue while the shop is open: events of 192 rows die (the receiver refuses them),
/// then requeues run again and again while eight tasks go on writing the same rows, over
/// three such cycles, with two relays. A requeued event is resent only while no newer
/// event of its row has gone out: every row's app ends on the row's state, and no app ever
/// sees a row's stock go back.
async fn requeue_during_live_writes_leaves_no_row_stale(db: DatabaseConnection, url: &str) {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let retry = common::fast_retries().max_attempts(1);
    let relays = [
        common::outbox_observer(&db, &receiver.url(), retry.clone()).await,
        common::outbox_observer(
            &vendora_pos::db::connect(url).await.unwrap(),
            &receiver.url(),
            retry,
        )
        .await,
    ];
    // 8 tasks x 24 rows, each write a higher stock.
    let mut rows: Vec<Vec<i32>> = Vec::new();
    for t in 0..8 {
        let mut ids = Vec::new();
        for r in 0..24 {
            let p = relays[0]
                .scope(product_am(&format!("t{t}r{r}"), 0).insert(&db))
                .await
                .unwrap();
            ids.push(p.id);
        }
        rows.push(ids);
    }
    let stock = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(1));
    let write_round = |relay: usize| {
        let (db, rows, stock) = (db.clone(), rows.clone(), stock.clone());
        let observer = relays[relay].clone();
        async move {
            let tasks: Vec<_> =
                rows.into_iter()
                    .map(|ids| {
                        let (db, stock, observer) = (db.clone(), stock.clone(), observer.clone());
                        tokio::spawn(async move {
                            observer
                                .scope(async {
                                    for id in ids {
                                        let am = product::ActiveModel {
                                            id: Unchanged(id),
                                            stock: Set(stock
                                                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)),
                                            ..Default::default()
                                        };
                                        // In transactions on PostgreSQL; SQLite's one writer
                                        // would refuse concurrent ones (SQLITE_BUSY on a read
                                        // that turns into a write).
                                        if db.get_database_backend() == DbBackend::Postgres {
                                            let txn = db.begin().await.unwrap();
                                            am.update(&txn).await.unwrap();
                                            txn.commit().await.unwrap();
                                        } else {
                                            am.update(&db).await.unwrap();
                                        }
                                    }
                                })
                                .await
                        })
                    })
                    .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    for cycle in 0..3 {
        // Refused: each event dies at its one attempt.
        receiver.set_reply(Reply::Status(422, None));
        write_round(cycle % 2).await;
        common::eventually(WAIT, "the round's events dead", || async {
            vendora_observe::outbox::counts(&db).await.unwrap().pending == 0
        })
        .await;
        // Accepted again (each answer takes a moment, so that events are on their way
        // while requeues run): writes go on, and requeues run until they are done.
        receiver.set_reply(Reply::Delay(Duration::from_millis(2)));
        let writes = tokio::spawn(write_round((cycle + 1) % 2));
        while !writes.is_finished() {
            // Three operators at once: none may fail (they deadlocked each other).
            let (a, b, c) = tokio::join!(
                vendora_observe::outbox::requeue(&db, None),
                vendora_observe::outbox::requeue(&db, None),
                vendora_observe::outbox::requeue(&db, None),
            );
            for r in [a, b, c] {
                r.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writes.await.unwrap();
    }
    // Whatever is still dead (events refused in the last round, never made stale) goes out.
    vendora_observe::outbox::requeue(&db, None).await.unwrap();
    for relay in &relays {
        // A deadline for a loaded machine (six tests at a time): the work takes seconds.
        assert!(relay.flush(3 * WAIT).await);
    }
    // Per row, in the order the receiver got them: the stock never goes back.
    let mut seen: HashMap<i64, i64> = HashMap::new();
    let mut violations = Vec::new();
    for r in receiver.delivered() {
        let d = r.data();
        let (id, s) = match r.event().as_str() {
            "product:created" | "product:updated" => (d["id"].as_i64(), d["stock"].as_i64()),
            "stock:updated" => (d["productId"].as_i64(), d["newStock"].as_i64()),
            _ => continue,
        };
        let (Some(id), Some(s)) = (id, s) else {
            continue;
        };
        if let Some(before) = seen.insert(id, s)
            && s < before
        {
            violations.push((id, before, s));
        }
    }
    let mut stale = Vec::new();
    for id in rows.iter().flatten() {
        let row = product::Entity::find_by_id(*id)
            .one(&db)
            .await
            .unwrap()
            .unwrap();
        if seen.get(&(*id as i64)) != Some(&(row.stock as i64)) {
            stale.push((*id, row.stock, seen.get(&(*id as i64)).copied()));
        }
    }
    assert!(violations.is_empty(), "stock went back: {violations:?}");
    assert!(
        stale.is_empty(),
        "apps left on old state (row, stock, last seen): {stale:?}"
    );
    let counts = vendora_observe::outbox::counts(&db).await.unwrap();
    assert_eq!((counts.pending, counts.dead), (0, 0), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_requeue_during_live_writes_leaves_no_row_stale() {
    let (db, url) = common::sqlite_file().await;
    requeue_during_live_writes_leaves_no_row_stale(db, &url).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL (PostgreSQL): run with --include-ignored (bash .ci/run)"]
async fn postgres_a_requeue_during_live_writes_leaves_no_row_stale() {
    let (db, url) = common::postgres().await;
    requeue_during_live_writes_leaves_no_row_stale(db, &url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_busy_relay_supersedes_the_dead_event_another_relay_left() {
    let (db, _) = common::sqlite_file().await;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.reply_when("slow", Reply::Delay(Duration::from_secs(30)));
    receiver.reply_when("refused", Reply::Status(400, None));
    let busy = common::relay_for_slow_requests(&db, &receiver.url()).await;
    // It has looked: no dead rows.
    assert!(busy.flush(WAIT).await);
    busy.scope(product_am("slow", 0).insert(&db)).await.unwrap();
    receiver.wait_until_arrived("slow", WAIT).await;

    let other = common::outbox_observer(&db, &receiver.url(), common::fast_retries()).await;
    // Written by other tasks than the slow one: other units of work, not held behind it.
    let db2 = db.clone();
    let refused = tokio::spawn(
        other.scope(async move { product_am("refused", 1).insert(&db2).await.unwrap() }),
    )
    .await
    .unwrap();
    let counts = || async { vendora_observe::outbox::counts(&db).await.unwrap() };
    common::eventually(WAIT, "the refused event dead", || async {
        counts().await.dead == 1
    })
    .await;
    assert_eq!(other.stats().dead, 1, "the other relay dead-lettered it");
    // At once: its flush would wait for the slow row, which is the busy relay's.
    other.shutdown(Duration::ZERO).await;

    // The row's next event, through the busy relay (its own write wakes it).
    let db2 = db.clone();
    tokio::spawn(busy.scope(async move {
        let mut am = refused.into_active_model();
        am.name = Set("accepted".into());
        am.update(&db2).await.unwrap();
    }))
    .await
    .unwrap();
    common::eventually(WAIT, "the newer event recorded delivered", || async {
        counts().await.delivered == 1
    })
    .await;
    let after = counts().await;
    assert_eq!((after.dead, after.superseded), (0, 1), "{after:?}");
    let requeued = busy.outbox().unwrap().requeue(None).await.unwrap();
    assert_eq!(requeued.requeued, 0, "{requeued:?}");
    busy.shutdown(Duration::from_millis(100)).await;
}

/// An audit of every real change of a product's stock, written by the database itself
/// (a trigger), in the order the changes committed.
async fn audit_stock_changes(db: &DatabaseConnection) {
    let statements: Vec<String> = match db.get_database_backend() {
        DbBackend::Postgres => vec![
            "CREATE TABLE stock_audit (id BIGSERIAL PRIMARY KEY, new_stock INTEGER NOT NULL)"
                .into(),
            "CREATE FUNCTION audit_stock() RETURNS trigger AS $$ BEGIN \
             INSERT INTO stock_audit (new_stock) VALUES (NEW.stock); RETURN NULL; END; $$ \
             LANGUAGE plpgsql"
                .into(),
            "CREATE TRIGGER audit_stock AFTER UPDATE OF stock ON products FOR EACH ROW \
             WHEN (OLD.stock <> NEW.stock) EXECUTE FUNCTION audit_stock()"
                .into(),
        ],
        _ => vec![
            "CREATE TABLE stock_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             new_stock INTEGER NOT NULL)"
                .into(),
            "CREATE TRIGGER audit_stock AFTER UPDATE OF stock ON products \
             WHEN OLD.stock <> NEW.stock BEGIN \
             INSERT INTO stock_audit (new_stock) VALUES (NEW.stock); END"
                .into(),
        ],
    };
    for s in statements {
        db.execute_unprepared(&s).await.unwrap();
    }
}

/// Eight tasks each commit twelve transactions setting one product's stock to 0, 1 or 2
/// (so many writes change nothing, and concurrent writers change it back and forth). Each
/// real change, as the database's own trigger saw it, must have exactly its
/// `stock:updated`, in commit order, and the last one must be the final value.
async fn concurrent_transactions_report_every_real_change(db: DatabaseConnection) {
    audit_stock_changes(&db).await;
    let recorder = Recorder::new();
    let p = recorder
        .scope(product_am("contended", 0).insert(&db))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (db, recorder) = (db.clone(), recorder.clone());
        tasks.push(tokio::spawn(recorder.scope(async move {
            for i in 0..12 {
                let stock = (t + i) % 3;
                // SQLite refuses a transaction that read a row another one changed since
                // (SQLITE_BUSY): the application tries again, as it would in production.
                loop {
                    let txn = db.begin().await.unwrap();
                    let am = product::ActiveModel {
                        id: Unchanged(p.id),
                        stock: Set(stock),
                        ..Default::default()
                    };
                    if am.update(&txn).await.is_ok() && txn.commit().await.is_ok() {
                        break;
                    }
                }
            }
        })));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let reported: Vec<i64> = recorder
        .named("stock:updated")
        .iter()
        .map(|e| e.data()["newStock"].as_i64().unwrap())
        .collect();
    let audited: Vec<i64> = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT new_stock FROM stock_audit ORDER BY id",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| i64::from(r.try_get::<i32>("", "new_stock").unwrap()))
        .collect();
    assert!(
        audited.len() > 5,
        "too few real changes to mean anything: {audited:?}"
    );
    assert_eq!(
        reported, audited,
        "reported changes differ from the real ones"
    );
    let final_stock = product::Entity::find_by_id(p.id)
        .one(&db)
        .await
        .unwrap()
        .unwrap()
        .stock;
    assert_eq!(reported.last(), Some(&(final_stock as i64)));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_concurrent_transactions_report_every_real_change_of_a_watched_column() {
    let (db, _) = common::sqlite_file().await;
    concurrent_transactions_report_every_real_change(db).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs DATABASE_URL: run with --include-ignored (bash .ci/run)"]
async fn postgres_concurrent_transactions_report_every_real_change_of_a_watched_column() {
    let (db, _) = common::postgres().await;
    concurrent_transactions_report_every_real_change(db).await;
}

/// An update of the stock fails after its old value was read (a trigger refuses it); the
/// next update of the row by the same task, which does not touch the stock, must not find
/// that old value: another task has changed the stock meanwhile, and a leftover would make
/// it report a change it did not make.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_write_leaves_no_old_value_behind() {
    let (db, _) = common::sqlite_file().await;
    db.execute_unprepared(
        "CREATE TRIGGER no_negative_stock BEFORE UPDATE OF stock ON products \
         WHEN NEW.stock < 0 BEGIN SELECT RAISE(ABORT, 'negative stock'); END",
    )
    .await
    .unwrap();
    let recorder = Recorder::new();
    let p = recorder
        .scope(product_am("guarded", 10).insert(&db))
        .await
        .unwrap();
    let mine = {
        let (db, recorder) = (db.clone(), recorder.clone());
        move |am: product::ActiveModel| {
            let (db, recorder) = (db.clone(), recorder.clone());
            async move { recorder.scope(am.update(&db)).await }
        }
    };
    let failed = mine(product::ActiveModel {
        id: Unchanged(p.id),
        stock: Set(-1),
        ..Default::default()
    })
    .await;
    assert!(failed.is_err());
    // Another task changes the stock.
    tokio::spawn(recorder.clone().scope({
        let db = db.clone();
        async move {
            product::ActiveModel {
                id: Unchanged(p.id),
                stock: Set(5),
                ..Default::default()
            }
            .update(&db)
            .await
            .unwrap();
        }
    }))
    .await
    .unwrap();
    recorder.clear();
    mine(product::ActiveModel {
        id: Unchanged(p.id),
        name: Set("renamed".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(recorder.names(), ["product:updated"]);
}
