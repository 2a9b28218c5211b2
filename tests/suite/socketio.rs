//! The whole architecture end to end: SeaORM writes → signed webhooks → a WebSocket server →
//! real socket.io v4 clients (npm `socket.io-client` under node, through the apps' module),
//! which must receive exactly the POS scenario's events their store may see, in order, with
//! their data. The server is vendora-observe-server (as a process), then the README's Node
//! recipe (tests/node/express-server.js, npm `socket.io` and Express) playing the existing
//! server: tokens, rooms and replays work the same there.

use crate::common;

use std::time::Duration;

use common::{App, SECRET};
use serde_json::{Value, json};
use vendora_observe::{Observer, Webhook};
use vendora_observe_server::{AppToken, Scope};
use vendora_pos::{db, scenario};

const HQ: &str = "head-office-token";

async fn run_scenario_to(url: &str) -> Observer {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    // The default causal order: one task's writes reach the app in the order it made them.
    let observer = Observer::builder(common::config(url))
        .retry(common::fast_retries())
        .build()
        .await
        .unwrap();
    observer
        .scope(scenario::run(&db, false, async |_| {}))
        .await
        .unwrap();
    observer
}

fn assert_scenario(got: &[(String, Value)]) {
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, scenario::EXPECTED);
    assert_eq!(got[0].1, json!({"id": 1, "name": "Beverages"}));
    assert_eq!(got[1].1["name"], "Espresso beans");
    assert_eq!(got[1].1["price"], 12.5);
    assert_eq!(got[4].1, json!({"productId": 1, "newStock": 7}));
    assert_eq!(got[6].1["total"], 37.5);
    assert_eq!(got[6].1["storeId"], 1);
    assert_eq!(got[7].1["status"], "paid");
    assert_eq!(got[8].1["storeId"], 2);
    assert_eq!(got[10].1, json!({"id": 1}));
    assert_eq!(got[11].1, json!({"id": 1}));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_scenario_reaches_a_socket_io_app_through_the_server() {
    let (_server, base) = common::server(&[("WEBHOOK_SECRET", SECRET), ("APP_TOKENS", HQ)]);
    let app = App::start(&base, &[("TOKEN", HQ)]);
    app.ready();
    let observer = run_scenario_to(&format!("{base}/webhook")).await;
    let got: Vec<(String, Value)> = app
        .events(scenario::EXPECTED.len())
        .into_iter()
        .map(|g| (g.event, g.data))
        .collect();
    assert_scenario(&got);
    assert!(observer.flush(common::WAIT).await);
    assert_eq!(observer.stats().sent, 12);

    // A redelivery (same id) is acknowledged but not sent to the apps again.
    let service = observer.service().clone();
    let hook = Webhook::build("ping:sent", &json!({"n": 1})).unwrap();
    service.send(&hook).await.unwrap();
    service.send(&hook).await.unwrap();
    service
        .send(&Webhook::build("ping:sent", &json!({"n": 2})).unwrap())
        .await
        .unwrap();
    let pings: Vec<Value> = app.events(2).into_iter().map(|g| g.data).collect();
    assert_eq!(pings, [json!({"n": 1}), json!({"n": 2})]);

    // What the server refuses.
    let url = format!("{base}/webhook");
    let json_type = ("Content-Type", "application/json");
    let forged = b"{\"event\":\"x\",\"data\":1}";
    let zeros = "0".repeat(64);
    assert_eq!(
        common::raw_post(&url, &[json_type, ("X-Webhook-Signature", &zeros)], forged).await,
        401
    );
    assert_eq!(
        common::raw_post(&url, &[("Content-Type", "text/plain")], b"hello").await,
        415
    );
    assert_eq!(
        common::raw_post(&url, &[json_type], &vec![b' '; 2 << 20]).await,
        413
    );
    assert_eq!(
        common::signed_post(&url, SECRET, "not-an-event", b"[1,2]").await,
        400
    );
}

/// The README's Node recipe for the apps: tokens checked on the handshake (a listed token
/// with rooms, a minted one), each store's apps get exactly their store's events and the
/// catalogue's, in order; a wrong token is refused.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn two_stores_through_the_readme_node_server() {
    let dir = common::node_peers();
    let minting = "minting-secret";
    let mut cmd = std::process::Command::new("node");
    cmd.arg(dir.join("express-server.js"))
        .env("WEBHOOK_SECRET", SECRET)
        .env("PORT", "0")
        .env("APP_TOKENS", format!("store-1-token=store:1,{HQ}"))
        .env("APP_TOKEN_SECRET", minting);
    let server = common::Peer::spawn(cmd);
    let port = server.wait_for("the node server's port", |l| {
        l.strip_prefix("PORT ").map(str::to_owned)
    });
    let base = format!("http://127.0.0.1:{port}");
    let till2 = AppToken::new(
        "till-2",
        Scope::rooms(["store:2"]),
        Duration::from_secs(600),
    )
    .mint(minting.as_bytes());
    let store1 = App::start(&base, &[("TOKEN", "store-1-token")]);
    let store2 = App::start(&base, &[("TOKEN", &till2), ("TRANSPORT", "polling")]);
    let hq = App::start(&base, &[("TOKEN", HQ)]);
    for app in [&store1, &store2, &hq] {
        let ready = app.ready();
        assert_eq!(ready["recovered"], false, "{ready}");
        // The module asks the app to load its state on a first connection.
        assert_eq!(app.next_of("resync")["reason"], "first connection");
    }
    let observer = run_scenario_to(&format!("{base}/webhook")).await;
    assert!(observer.flush(common::WAIT).await);
    let names = |app: &App, n: usize| -> Vec<String> {
        app.events(n).into_iter().map(|g| g.event).collect()
    };
    assert_eq!(names(&store1, 11), scenario::expected_for_store(1));
    assert_eq!(names(&store2, 10), scenario::expected_for_store(2));
    let all: Vec<(String, Value)> = hq
        .events(12)
        .into_iter()
        .map(|g| (g.event, g.data))
        .collect();
    assert_scenario(&all);
    // Nothing more reached the stores' apps.
    let end = Webhook::build("sync:end", &json!({})).unwrap();
    observer.service().send(&end).await.unwrap();
    assert_eq!(store1.event().event, "sync:end");
    assert_eq!(store2.event().event, "sync:end");
    let (_stranger, first) = common::app(&base, Some("stolen"), "once", None);
    assert_eq!(first, "connect_error a valid token is required");
}
