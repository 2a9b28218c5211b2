//! Several servers behind one URL share their history and their apps through Redis: each
//! app, on whichever server, gets each event it may see once and in one order; a Redis that
//! goes away is an outage to ride out (503 with Retry-After meanwhile, serving again once
//! it is back), a server may start before Redis does, Redis over TLS works, and its
//! password never reaches a log.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{App, SECRET};
use sea_orm::{ActiveModelTrait, IntoActiveModel, Set};
use serde_json::json;
use vendora_observe::{Observer, WebhookService};

const STORE1: &str = "store-1-till-token";
const STORE2: &str = "store-2-till-token";
const HQ: &str = "head-office-token";

fn env<'a>(redis: &'a str, tokens: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("WEBHOOK_SECRET", SECRET),
        ("APP_TOKENS", tokens),
        ("REDIS_URL", redis),
    ]
}

fn sender(base: &str) -> WebhookService {
    WebhookService::new(common::config(&format!("{base}/webhook"))).unwrap()
}

/// Three servers on one Redis, two stores: the sender alternates between the servers, one
/// event after the other; each app, whichever server it is on, gets exactly its store's
/// events and the untargeted ones, once, in the order they were sent.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node, npm and redis-server: run with --include-ignored (bash .ci/run)"]
async fn three_servers_on_redis_give_each_store_its_events_once_in_order() {
    let redis = common::redis();
    let tokens = format!("{STORE1}=store:1,{STORE2}=store:2,{HQ}");
    let servers: Vec<_> = (0..3)
        .map(|_| common::server(&env(&redis.url, &tokens)))
        .collect();
    let apps = [
        App::start(&servers[0].1, &[("TOKEN", STORE1)]),
        App::start(
            &servers[1].1,
            &[("TOKEN", STORE2), ("TRANSPORT", "polling")],
        ),
        App::start(&servers[2].1, &[("TOKEN", HQ)]),
    ];
    for app in &apps {
        app.ready();
    }
    let senders: Vec<_> = servers.iter().map(|(_, base)| sender(base)).collect();
    let n = 90;
    let rooms_of = |i: usize| match i % 3 {
        0 => None,
        1 => Some("store:1"),
        _ => Some("store:2"),
    };
    for i in 0..=n {
        let body = match (i == n, rooms_of(i)) {
            (true, _) => json!({"event": "sync:end", "data": {}}),
            (false, None) => json!({"event": "stock:updated", "data": {"n": i}}),
            (false, Some(room)) => {
                json!({"event": "order:updated", "data": {"n": i}, "rooms": [room]})
            }
        };
        let body = serde_json::to_vec(&body).unwrap();
        let url = format!("{}/webhook", servers[i % 3].1);
        assert_eq!(
            common::signed_post(&url, SECRET, &format!("e{i}"), &body).await,
            200,
            "event {i}"
        );
    }
    drop(senders);
    let expected = |store: Option<&str>| -> Vec<usize> {
        (0..n)
            .filter(|i| match (store, rooms_of(*i)) {
                (_, None) | (None, _) => true,
                (Some(mine), Some(room)) => mine == room,
            })
            .collect()
    };
    for (app, store) in apps.iter().zip([Some("store:1"), Some("store:2"), None]) {
        let mut got = Vec::new();
        loop {
            let event = app.event();
            if event.event == "sync:end" {
                break;
            }
            got.push(event.data["n"].as_u64().unwrap() as usize);
        }
        assert_eq!(got, expected(store), "the app of {store:?}");
    }
}

/// A product's life on each of three tasks, each sending through its own server.
async fn writes(observer: &Observer, product: i32, updates: i32) {
    let db = vendora_pos::db::connect("sqlite::memory:").await.unwrap();
    vendora_pos::db::create_pos_tables(&db).await.unwrap();
    observer
        .scope(async {
            let mut am = common::product_am(&format!("p{product}"), 0);
            am.id = Set(product);
            let mut row = am.insert(&db).await.unwrap();
            for stock in 1..=updates {
                let mut am = row.into_active_model();
                am.stock = Set(stock);
                am.name = Set(format!("p{product}"));
                row = am.update(&db).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
        .await;
}

/// Redis killed for 5 s (SIGKILL; it keeps what it acknowledged, as a production Redis
/// with an append-only file does) while three tasks send through three servers: every
/// webhook is answered 200 in the end (503 with Retry-After meanwhile, no dead letter),
/// each app gets each event once and all apps in one order, each row's stock increasing;
/// each server says once that Redis is gone and once that it is back.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node, npm and redis-server: run with --include-ignored (bash .ci/run)"]
async fn a_redis_outage_under_a_stream_of_webhooks_loses_nothing_and_repeats_nothing() {
    let mut redis = common::durable_redis();
    let servers: Vec<_> = (0..3)
        .map(|_| common::server(&env(&redis.url, HQ)))
        .collect();
    let apps: Vec<App> = servers
        .iter()
        .map(|(_, base)| App::start(base, &[("TOKEN", HQ)]))
        .collect();
    for app in &apps {
        app.ready();
    }
    let retry = common::fast_retries().max_attempts(1_000);
    let mut observers = Vec::new();
    for (_, base) in &servers {
        observers.push(common::observer_for(&format!("{base}/webhook"), retry.clone()).await);
    }
    let updates = 40;
    let per_task = 1 + 2 * updates as usize; // created, then updated and stock:updated
    let tasks: Vec<_> = observers
        .iter()
        .cloned()
        .enumerate()
        .map(|(k, observer)| {
            tokio::spawn(async move { writes(&observer, 10 + k as i32, updates).await })
        })
        .collect();
    // Some events through, then Redis goes.
    let mut received: Vec<Vec<common::Got>> = vec![Vec::new(); 3];
    received[0].extend(apps[0].events(20));
    redis.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    redis.start();
    for task in tasks {
        task.await.unwrap();
    }
    for observer in &observers {
        assert!(
            observer.flush(Duration::from_secs(60)).await,
            "{:?}",
            observer.stats()
        );
        let stats = observer.stats();
        assert_eq!((stats.sent, stats.dead), (per_task as u64, 0), "{stats:?}");
        assert!(stats.retried > 0, "the outage was seen: {stats:?}");
    }
    let total = 3 * per_task;
    for (app, got) in apps.iter().zip(received.iter_mut()) {
        let left = total - got.len();
        got.extend(app.events(left));
    }
    let order = |got: &[common::Got]| -> Vec<String> {
        got.iter()
            .map(|g| g.meta["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for (k, got) in received.iter().enumerate() {
        let ids = order(got);
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            total,
            "app {k}: each event once"
        );
        assert_eq!(ids, order(&received[0]), "app {k}: the same order as app 0");
        let mut stock: HashMap<i64, i64> = HashMap::new();
        for g in got.iter().filter(|g| g.event == "stock:updated") {
            let (id, s) = (
                g.data["productId"].as_i64().unwrap(),
                g.data["newStock"].as_i64().unwrap(),
            );
            let before = stock.insert(id, s).unwrap_or(0);
            assert!(
                s > before,
                "app {k}: product {id}'s stock {s} after {before}"
            );
        }
    }
    for (server, _) in &servers {
        server.wait_for("the outage's line", |l| {
            l.contains("is unreachable").then_some(())
        });
        server.wait_for("the recovery's line", |l| {
            l.contains("is reachable again").then_some(())
        });
        let lines = server.skipped.borrow();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("is unreachable"))
                .count(),
            0,
            "said once"
        );
    }
}

/// A server started while Redis is down starts (and says so), answers webhooks 503 with
/// Retry-After, and serves them once Redis is up; an app connected meanwhile then gets them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node, npm and redis-server: run with --include-ignored (bash .ci/run)"]
async fn a_server_starts_before_redis_and_serves_once_it_is_up() {
    let mut redis = common::redis();
    redis.kill();
    let (server, base) = common::server(&env(&redis.url, HQ));
    let said = server.wait_for("the outage's line", |l| {
        l.contains("is unreachable").then(|| l.to_owned())
    });
    assert!(said.contains(&redis.url), "{said}");
    let url = format!("{base}/webhook");
    let body = br#"{"event":"stock:updated","data":{"n":1}}"#;
    let answer = common::post_answer(&url, &common::signed_headers(SECRET, "e1", body), body).await;
    assert!(
        answer.starts_with("HTTP/1.1 503")
            && answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let app = App::start(&base, &[("TOKEN", HQ)]);
    redis.start();
    common::eventually(common::WAIT, "the webhook accepted", || async {
        common::signed_post(&url, SECRET, "e1", body).await == 200
    })
    .await;
    // The app goes live once the history can be read: it loads its state then (a first
    // connection), which holds e1, and receives what comes after.
    assert_eq!(app.ready()["recovered"], false);
    let body = br#"{"event":"stock:updated","data":{"n":2}}"#;
    assert_eq!(common::signed_post(&url, SECRET, "e2", body).await, 200);
    // e1 too if the app went live before it was accepted.
    let mut got = app.event().data;
    if got == json!({"n": 1}) {
        got = app.event().data;
    }
    assert_eq!(got, json!({"n": 2}));
}

/// Redis emptied (FLUSHALL) under running servers: its history is lost, so each connected
/// app is told to refetch (`vendora:resync`) before the next event, and an app that comes
/// back with an offset of the old epoch is told the same.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node, npm and redis-server: run with --include-ignored (bash .ci/run)"]
async fn an_emptied_redis_makes_every_app_refetch() {
    let redis = common::redis();
    let (_server, base) = common::server(&env(&redis.url, HQ));
    let app = App::start(&base, &[("TOKEN", HQ)]);
    let first = app.ready();
    let url = format!("{base}/webhook");
    let post = |id: &'static str| {
        let url = url.clone();
        async move {
            let body = format!(r#"{{"event":"stock:updated","data":{{"id":"{id}"}}}}"#);
            common::signed_post(&url, SECRET, id, body.as_bytes()).await
        }
    };
    assert_eq!(post("before").await, 200);
    assert_eq!(app.event().data["id"], "before");
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    assert_eq!(post("after").await, 200);
    let resync = app.next_where("a resync for the lost history", |v| {
        v["kind"] == "resync"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("history was lost"))
    });
    assert_eq!(resync["kind"], "resync");
    let after = app.event();
    assert_eq!(after.data["id"], "after");
    assert_ne!(after.meta["epoch"], first["epoch"], "a new epoch");
}

/// `rediss://` with the certificate authority in REDIS_CA_CERT, and a password: served over
/// TLS, and the password appears in no line the server prints, the outage's included.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node, npm, openssl and redis-server: run with --include-ignored (bash .ci/run)"]
async fn redis_over_tls_with_a_password_that_never_prints() {
    let dir = common::temp_dir("tls");
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 \
        -subj /CN=test-ca 2>/dev/null",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout redis.key -out redis.csr -subj /CN=127.0.0.1 \
        2>/dev/null && printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext \
        && openssl x509 -req -in redis.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out redis.pem \
        -days 1 -extfile ext 2>/dev/null",
    );
    let port = common::free_port().to_string();
    let mut redis = common::redis_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--tls-port",
        &port,
        "--tls-cert-file",
        dir.join("redis.pem").to_str().unwrap(),
        "--tls-key-file",
        dir.join("redis.key").to_str().unwrap(),
        "--tls-ca-cert-file",
        dir.join("ca.pem").to_str().unwrap(),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "hunter2-secret",
    ]);
    let url = format!("rediss://:hunter2-secret@127.0.0.1:{port}");
    let ca = dir.join("ca.pem");
    let mut env = env(&url, HQ);
    env.push(("REDIS_CA_CERT", ca.to_str().unwrap()));
    let (server, base) = common::server(&env);
    let app = App::start(&base, &[("TOKEN", HQ)]);
    app.ready();
    assert_eq!(
        sender(&base)
            .try_dispatch("stock:updated", &json!({"n": 1}))
            .await
            .map(|d| d.status)
            .ok(),
        Some(200)
    );
    assert_eq!(app.event().data, json!({"n": 1}));
    redis.kill();
    let line = server.wait_for("the outage's line", |l| {
        l.contains("is unreachable").then(|| l.to_owned())
    });
    assert!(line.contains("rediss://***@127.0.0.1"), "{line}");
    let printed = server.skipped.borrow().join("\n") + &line;
    assert!(!printed.contains("hunter2"), "{printed}");
}
