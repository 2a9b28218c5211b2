//! `#[derive(Observed)]` end to end: SeaORM writes on a real SQLite database, webhooks to
//! a real HTTP receiver on 127.0.0.1 that verifies every signature.

use crate::common;

use std::time::Duration;

use common::{WAIT, env, events};
use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, EntityTrait, IntoActiveModel, ModelTrait, Set,
};
use serde_json::json;
use vendora_pos::entities::{category, order, product};
use vendora_pos::receiver::Reply;

fn new_product(name: &str, stock: i32) -> product::ActiveModel {
    product::ActiveModel {
        id: NotSet,
        name: Set(name.to_owned()),
        price: Set(12.5),
        stock: Set(stock),
        category_id: Set(None),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn created_updated_watched_and_deleted_events_carry_the_documented_payloads() {
    let env = env().await;
    let db = &env.db;
    env.observer
        .scope(async {
            let p = new_product("Espresso beans", 10).insert(db).await.unwrap();
            // A rename: product:updated only.
            let mut am = p.clone().into_active_model();
            am.name = Set("Espresso beans 1kg".into());
            let p = am.update(db).await.unwrap();
            // Stock 10 -> 7: product:updated then stock:updated.
            let mut am = p.clone().into_active_model();
            am.stock = Set(7);
            let p = am.update(db).await.unwrap();
            // Stock set to 7 again: not a change.
            let mut am = p.clone().into_active_model();
            am.stock = Set(7);
            let p = am.update(db).await.unwrap();
            p.delete(db).await.unwrap();
        })
        .await;
    let got = env.receiver.wait_delivered(6, WAIT).await;
    assert!(got.iter().all(|r| r.signature_ok));
    let ev = events(&got);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "product:created",
            "product:updated",
            "product:updated",
            "stock:updated",
            "product:updated",
            "product:deleted"
        ]
    );
    let id = ev[0].1["id"].as_i64().unwrap();
    // The full model is the model's Serialize form (camelCase here, by serde attribute).
    assert_eq!(ev[0].1["name"], "Espresso beans");
    assert_eq!(ev[0].1["stock"], 10);
    assert_eq!(ev[0].1["price"], 12.5);
    assert!(ev[0].1["createdAt"].is_string(), "{}", ev[0].1);
    assert_eq!(ev[1].1["name"], "Espresso beans 1kg");
    assert_eq!(ev[2].1["stock"], 7);
    assert_eq!(ev[3].1, json!({"productId": id, "newStock": 7}));
    assert_eq!(ev[5].1, json!({"id": id}));
    // Exact bytes for the small payloads.
    assert_eq!(
        got[3].body_str(),
        format!(r#"{{"event":"stock:updated","data":{{"productId":{id},"newStock":7}}}}"#)
    );
    assert_eq!(
        got[5].body_str(),
        format!(r#"{{"event":"product:deleted","data":{{"id":{id}}}}}"#)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_narrows_the_events_and_delete_needs_only_the_primary_key() {
    let env = env().await;
    let db = &env.db;
    env.observer
        .scope(async {
            let c = category::ActiveModel {
                id: NotSet,
                name: Set("Beverages".into()),
            }
            .insert(db)
            .await
            .unwrap();
            let o = order::ActiveModel {
                id: NotSet,
                store_id: Set(1),
                product_id: Set(1),
                quantity: Set(2),
                status: Set("pending".into()),
                total: Set(25.0),
            }
            .insert(db)
            .await
            .unwrap();
            // Orders have no deleted event.
            o.delete(db).await.unwrap();
            // An ActiveModel with only the key set is enough for a delete.
            category::ActiveModel {
                id: Set(c.id),
                name: NotSet,
            }
            .delete(db)
            .await
            .unwrap();
        })
        .await;
    let got = env.receiver.wait_delivered(3, WAIT).await;
    let ev = events(&got);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    // order:created and category events are on different rows: compare as a set, then
    // check per-row order.
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["category:created", "category:deleted", "order:created"]
    );
    let cat: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("category"))
        .collect();
    assert_eq!(cat, ["category:created", "category:deleted"]);
    let order_created = ev.iter().find(|(n, _)| n == "order:created").unwrap();
    // 25.0 is sent as JavaScript prints it.
    assert!(
        got.iter()
            .any(|r| r.body_str().contains(r#""total":25},"rooms":["store:1"]}"#))
    );
    assert_eq!(order_created.1["status"], "pending");
    let deleted = ev.iter().find(|(n, _)| n == "category:deleted").unwrap();
    assert_eq!(
        deleted.1,
        json!({"id": ev.iter().find(|(n, _)| n == "category:created").unwrap().1["id"]})
    );
    // Nothing else arrives: flush the observer, then count again.
    assert!(env.observer.flush(WAIT).await);
    assert_eq!(env.receiver.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_write_returns_while_the_receiver_is_still_answering() {
    let env = env().await;
    let db = &env.db;
    env.receiver
        .set_reply(Reply::Delay(Duration::from_millis(1500)));
    let p = env
        .observer
        .scope(async { new_product("Slow", 1).insert(db).await })
        .await
        .unwrap();
    // The insert has returned; the receiver records a request only once it answers, so
    // nothing can have been recorded yet if the write did not wait for it.
    assert!(
        env.receiver.requests().is_empty(),
        "the write waited for the receiver"
    );
    assert_eq!(env.observer.stats().pending, 1);
    let got = env.receiver.wait_delivered(1, WAIT).await;
    assert_eq!(got[0].data()["id"], p.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn quietly_sends_nothing_for_the_writes_inside_it() {
    let env = env().await;
    let db = &env.db;
    let p = env
        .observer
        .scope(async {
            let p = vendora_observe::quietly(async {
                let p = new_product("Quiet", 5).insert(db).await.unwrap();
                let mut am = p.into_active_model();
                am.stock = Set(4);
                am.update(db).await.unwrap()
            })
            .await;
            // Loud again: the same row, so the same lane, after the quiet ones.
            let mut am = p.clone().into_active_model();
            am.name = Set("Loud".into());
            am.update(db).await.unwrap()
        })
        .await;
    let got = env.receiver.wait_delivered(1, WAIT).await;
    assert!(env.observer.flush(WAIT).await);
    let all = env.receiver.requests();
    assert_eq!(all.len(), 1, "{:?}", events(&all));
    assert_eq!(got[0].event(), "product:updated");
    assert_eq!(got[0].data()["name"], "Loud");
    assert_eq!(got[0].data()["id"], p.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_writers_on_different_rows_each_get_their_own_stock_event() {
    let env = env().await;
    let db = env.db.clone();
    let mut ids = Vec::new();
    for i in 0..50 {
        let p = env
            .observer
            .scope(new_product(&format!("p{i}"), 100).insert(&db))
            .await
            .unwrap();
        ids.push(p.id);
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let db = db.clone();
        let observer = env.observer.clone();
        tasks.push(tokio::spawn(observer.scope(async move {
            let p = product::Entity::find_by_id(id)
                .one(&db)
                .await
                .unwrap()
                .unwrap();
            let mut am = p.into_active_model();
            // Even rows change stock, odd rows write the same value again.
            am.stock = Set(if i.is_multiple_of(2) { i as i32 } else { 100 });
            am.update(&db).await.unwrap();
        })));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 50 created + 50 updated + 25 stock:updated
    let got = env.receiver.wait_delivered(125, WAIT).await;
    assert!(env.observer.flush(WAIT).await);
    assert_eq!(env.receiver.requests().len(), 125);
    let stock: Vec<serde_json::Value> = got
        .iter()
        .filter(|r| r.event() == "stock:updated")
        .map(|r| r.data())
        .collect();
    assert_eq!(stock.len(), 25);
    for (i, id) in ids.iter().enumerate() {
        let mine: Vec<_> = stock.iter().filter(|d| d["productId"] == *id).collect();
        if i.is_multiple_of(2) {
            assert_eq!(mine, [&json!({"productId": id, "newStock": i})], "row {id}");
        } else {
            assert!(mine.is_empty(), "row {id} did not change but got {mine:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_on_one_row_report_each_real_change_in_order() {
    let env = env().await;
    let db = env.db.clone();
    let p = env
        .observer
        .scope(new_product("hot", 0).insert(&db))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 1..=50 {
        let db = db.clone();
        let observer = env.observer.clone();
        let id = p.id;
        tasks.push(tokio::spawn(observer.scope(async move {
            let am = product::ActiveModel {
                id: sea_orm::ActiveValue::Unchanged(id),
                stock: Set(i),
                ..Default::default()
            };
            am.update(&db).await.unwrap();
        })));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every write sets a value no other write sets, so each one is a real change.
    let got = env.receiver.wait_delivered(1 + 50 + 50, WAIT).await;
    let ev = events(&got);
    let mut last_updated_stock = None;
    let mut seen = std::collections::BTreeSet::new();
    for (name, data) in &ev[1..] {
        match name.as_str() {
            "product:updated" => last_updated_stock = Some(data["stock"].clone()),
            "stock:updated" => {
                // Right after the product:updated of the same write, with its value.
                assert_eq!(Some(data["newStock"].clone()), last_updated_stock);
                assert!(
                    seen.insert(data["newStock"].as_i64().unwrap()),
                    "{:?}",
                    ev.iter()
                        .map(|(n, d)| format!(
                            "{n}={}",
                            if n == "stock:updated" {
                                &d["newStock"]
                            } else {
                                &d["stock"]
                            }
                        ))
                        .collect::<Vec<_>>()
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(seen, (1..=50).collect());
    // Direct mode reports each write in the order its hooks ran; which of two concurrent
    // autocommit writes of one row ran its hook first is not the database's commit order
    // (see the README's guarantees: the outbox keeps commit order for one row).
    let _ = p;
}
