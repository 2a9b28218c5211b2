//! The whole architecture end to end: SeaORM writes → signed webhooks → a WebSocket server →
//! a real socket.io v4 client (npm `socket.io-client` under node), which must receive exactly
//! the POS scenario's events, in order, with their data. The server is the Rust receiver twin
//! (examples/receiver.rs, as a process), then a small Node.js server on the npm `socket.io`
//! package playing the existing server.

use crate::common;

use serde_json::{Value, json};
use vendora_observe::{Observer, Webhook};
use vendora_pos::{db, scenario};

const TOKEN: &str = "app-token-of-the-test";

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

fn assert_scenario(app: &common::Peer) {
    let got: Vec<(String, Value)> = (0..scenario::EXPECTED.len())
        .map(|_| common::next_event(app))
        .collect();
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, scenario::EXPECTED);
    assert_eq!(got[0].1, json!({"id": 1, "name": "Beverages"}));
    assert_eq!(got[1].1["name"], "Espresso beans");
    assert_eq!(got[1].1["price"], 12.5);
    assert_eq!(got[4].1, json!({"productId": 1, "newStock": 7}));
    assert_eq!(got[6].1["total"], 37.5);
    assert_eq!(got[7].1["status"], "paid");
    assert_eq!(got[9].1, json!({"id": 1}));
    assert_eq!(got[10].1, json!({"id": 1}));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_scenario_reaches_a_socket_io_app_through_the_rust_twin() {
    let (_twin, base) = common::twin(&[("WEBHOOK_SECRET", common::SECRET), ("APP_TOKENS", TOKEN)]);
    let (app, connected) = common::app(&base, Some(TOKEN), "", None);
    assert_eq!(connected, "connected");
    let observer = run_scenario_to(&format!("{base}/webhook")).await;
    assert_scenario(&app);
    assert!(observer.flush(common::WAIT).await);
    assert_eq!(observer.stats().sent, 12);

    // A redelivery (same X-Webhook-Id) is acknowledged but not broadcast again.
    let service = observer.service().clone();
    let hook = Webhook::build("ping:sent", &json!({"n": 1})).unwrap();
    service.send(&hook).await.unwrap();
    service.send(&hook).await.unwrap();
    service
        .send(&Webhook::build("ping:sent", &json!({"n": 2})).unwrap())
        .await
        .unwrap();
    assert_eq!(
        common::next_event(&app),
        ("ping:sent".into(), json!({"n": 1}))
    );
    assert_eq!(
        common::next_event(&app),
        ("ping:sent".into(), json!({"n": 2}))
    );

    // What the twin refuses.
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
    let not_event = b"[1,2]";
    let sig = vendora_observe::sign(common::SECRET.as_bytes(), not_event);
    assert_eq!(
        common::raw_post(&url, &[json_type, ("X-Webhook-Signature", &sig)], not_event).await,
        400
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_scenario_reaches_a_socket_io_app_through_a_node_socket_io_server() {
    let dir = common::node_peers();
    let mut cmd = std::process::Command::new("node");
    cmd.arg(dir.join("server.js"))
        .env("WEBHOOK_SECRET", common::SECRET);
    let server = common::Peer::spawn(cmd);
    let port = server.wait_for("the node server's port", |l| {
        l.strip_prefix("PORT ").map(str::to_owned)
    });
    let base = format!("http://127.0.0.1:{port}");
    let (app, _) = common::app(&base, None, "", None);
    let observer = run_scenario_to(&format!("{base}/webhook")).await;
    assert_scenario(&app);
    assert!(observer.flush(common::WAIT).await);
    assert_eq!(observer.stats().sent, 12);
}
