//! Apps converge through disconnects: an app is a phone on Wi-Fi, here behind a TCP proxy
//! the test cuts. It comes back with the offset and epoch of the last event it got and
//! receives what it missed, in order, once, then the live events with no gap and no
//! duplicate at the seam; when history cannot cover the gap (a server restarted without
//! Redis, an absence longer than what is kept), it is told `vendora:resync` first.

use crate::common;

use std::time::Duration;

use common::{App, Proxy, SECRET};

const TOKEN: &str = "app-token-of-the-test";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("WEBHOOK_SECRET", SECRET), ("APP_TOKENS", TOKEN)]
}

async fn send(url: &str, n: usize) {
    let body = format!(r#"{{"event":"stock:updated","data":{{"n":{n}}}}}"#);
    let status = common::signed_post(url, SECRET, &format!("event-{n}"), body.as_bytes()).await;
    assert_eq!(status, 200, "event {n}");
}

/// The `n` of the next `count` events, and that none came twice.
fn numbers(app: &App, count: usize) -> Vec<u64> {
    app.events(count)
        .into_iter()
        .map(|g| g.data["n"].as_u64().unwrap())
        .collect()
}

/// No event came twice: the apps' module reports what it dropped as seen before.
fn no_duplicate(app: &App) {
    app.lines_within(Duration::from_millis(200));
    let duplicates: Vec<_> = app
        .pending_lines()
        .into_iter()
        .filter(|l| l["kind"] == "duplicate")
        .collect();
    assert!(duplicates.is_empty(), "{duplicates:?}");
}

/// Connected through `proxy`, live, with one event received (so it has an offset).
async fn live_app(proxy: &Proxy, url: &str, transport: &str) -> App {
    let app = App::start(&proxy.url(), &[("TOKEN", TOKEN), ("TRANSPORT", transport)]);
    app.ready();
    send(url, 0).await;
    assert_eq!(numbers(&app, 1), [0]);
    app
}

/// Offline for 10 s (every connection cut, new ones refused) while 100 events are sent: on
/// reconnecting, the app gets the 100, in order, each once, and is told it recovered.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn an_app_offline_for_10_s_gets_the_100_events_it_missed_in_order() {
    let (_server, base) = common::server(&env());
    let url = format!("{base}/webhook");
    let proxy = Proxy::start(&base).await;
    let app = live_app(&proxy, &url, "polling").await;
    proxy.cut();
    app.status("down");
    for n in 1..=100 {
        send(&url, n).await;
    }
    // The phone is away this long (a length of the test's scenario, not a wait for
    // something to happen).
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();
    let ready = app.ready();
    assert_eq!(ready["recovered"], true, "{ready}");
    send(&url, 101).await;
    assert_eq!(numbers(&app, 101), (1..=101).collect::<Vec<_>>());
    no_duplicate(&app);
}

/// Three servers on Redis: an app offline for 60 s while 100 events go through all three
/// comes back on another server than the one it left, and gets the 100 from the shared
/// history, in order, once.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node, npm and redis-server: run with --include-ignored (bash .ci/run)"]
async fn an_app_offline_for_60_s_catches_up_on_another_server() {
    let redis = common::redis();
    let mut env = env();
    env.push(("REDIS_URL", redis.url.as_str()));
    let servers: Vec<_> = (0..3).map(|_| common::server(&env)).collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|(_, base)| format!("{base}/webhook"))
        .collect();
    let proxy = Proxy::start(&servers[0].1).await;
    let app = live_app(&proxy, &urls[0], "websocket").await;
    proxy.cut();
    app.status("down");
    for n in 1..=100 {
        send(&urls[n % 3], n).await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    proxy.point_to(&servers[1].1);
    proxy.restore();
    let ready = app.ready();
    assert_eq!(ready["recovered"], true, "{ready}");
    send(&urls[2], 101).await;
    assert_eq!(numbers(&app, 101), (1..=101).collect::<Vec<_>>());
    no_duplicate(&app);
}

/// The seam: 600 events missed (more than two pages of history), and 200 more sent while
/// the app is being caught up: it gets the 800 in order, none twice, none missing.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn events_sent_during_a_catch_up_arrive_after_it_without_gap_or_duplicate() {
    let (_server, base) = common::server(&env());
    let url = format!("{base}/webhook");
    let proxy = Proxy::start(&base).await;
    let app = live_app(&proxy, &url, "websocket").await;
    proxy.cut();
    app.status("down");
    for n in 1..=600 {
        send(&url, n).await;
    }
    proxy.restore();
    // Sent while the app reconnects and is caught up.
    for n in 601..=800 {
        send(&url, n).await;
    }
    assert_eq!(numbers(&app, 800), (1..=800).collect::<Vec<_>>());
    no_duplicate(&app);
    let ready = app.ready();
    assert_eq!(ready["recovered"], true, "{ready}");
}

/// A server restarted without Redis has a new epoch: its history is gone, so an app that
/// comes back is told to refetch (`vendora:resync`), then goes live.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn a_server_restarted_without_redis_makes_its_apps_refetch() {
    let (server, base) = common::server(&env());
    let port = common::port_of(&base);
    let url = format!("{base}/webhook");
    let app = App::start(&base, &[("TOKEN", TOKEN)]);
    let first = app.ready();
    send(&url, 1).await;
    assert_eq!(numbers(&app, 1), [1]);
    drop(server);
    app.status("down");
    let (_server, _) = common::server_on(port, &env());
    let resync = app.next_where("the resync", |v| {
        v["kind"] == "resync" && v["reason"] != "first connection"
    });
    assert!(
        resync["reason"].as_str().unwrap().contains("another epoch"),
        "{resync}"
    );
    let ready = app.ready();
    assert_eq!(ready["recovered"], false);
    assert_ne!(ready["epoch"], first["epoch"]);
    send(&url, 2).await;
    assert_eq!(numbers(&app, 1), [2]);
}

/// Away longer than the history is kept (here one second): told to refetch, not given a
/// history with a hole in it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn an_app_away_longer_than_the_history_is_kept_is_told_to_refetch() {
    let mut env = env();
    env.push(("HISTORY_MAX_AGE_SECS", "1"));
    let (_server, base) = common::server(&env);
    let url = format!("{base}/webhook");
    let proxy = Proxy::start(&base).await;
    let app = live_app(&proxy, &url, "websocket").await;
    proxy.cut();
    app.status("down");
    for n in 1..=3 {
        send(&url, n).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The newest event is always kept; the ones before it are past their age.
    send(&url, 4).await;
    proxy.restore();
    let resync = app.next_where("the resync", |v| {
        v["kind"] == "resync" && v["reason"] != "first connection"
    });
    assert!(
        resync["reason"]
            .as_str()
            .unwrap()
            .contains("no longer kept"),
        "{resync}"
    );
    assert_eq!(app.ready()["recovered"], false);
    send(&url, 5).await;
    assert_eq!(numbers(&app, 1), [5]);
}

/// A catch-up is the app's scope too: a store's app away while both stores' orders and the
/// catalogue change gets back its store's and the catalogue's, in order, and nothing of the
/// other store's.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn a_catch_up_holds_only_what_the_apps_scope_allows() {
    let (_server, base) = common::server(&[
        ("WEBHOOK_SECRET", SECRET),
        ("APP_TOKENS", "store-1-token=store:1"),
    ]);
    let url = format!("{base}/webhook");
    let proxy = Proxy::start(&base).await;
    let app = App::start(&proxy.url(), &[("TOKEN", "store-1-token")]);
    app.ready();
    send(&url, 0).await;
    assert_eq!(numbers(&app, 1), [0]);
    proxy.cut();
    app.status("down");
    for n in 1..=30 {
        let body = match n % 3 {
            0 => format!(r#"{{"event":"stock:updated","data":{{"n":{n}}}}}"#),
            1 => format!(r#"{{"event":"order:created","data":{{"n":{n}}},"rooms":["store:1"]}}"#),
            _ => format!(r#"{{"event":"order:created","data":{{"n":{n}}},"rooms":["store:2"]}}"#),
        };
        let status =
            common::signed_post(&url, SECRET, &format!("event-{n}"), body.as_bytes()).await;
        assert_eq!(status, 200);
    }
    proxy.restore();
    send(&url, 31).await;
    let expected: Vec<u64> = (1..=31).filter(|n| n % 3 != 2).collect();
    assert_eq!(numbers(&app, expected.len()), expected);
    assert_eq!(app.ready()["recovered"], true);
    no_duplicate(&app);
}

/// The README's Node recipe: socket.io's own recovery replays what an app missed while
/// its connection was cut, and `vendora:ready` tells the apps' module it recovered.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_node_recipe_replays_what_an_app_missed() {
    let dir = common::node_peers();
    let mut cmd = std::process::Command::new("node");
    cmd.arg(dir.join("express-server.js"))
        .env("WEBHOOK_SECRET", SECRET)
        .env("PORT", "0")
        .env("APP_TOKENS", TOKEN);
    let server = common::Peer::spawn(cmd);
    let port = server.wait_for("the node server's port", |l| {
        l.strip_prefix("PORT ").map(str::to_owned)
    });
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("{base}/webhook");
    let proxy = Proxy::start(&base).await;
    let app = App::start(
        &proxy.url(),
        &[("TOKEN", TOKEN), ("TRANSPORT", "websocket")],
    );
    assert_eq!(app.ready()["recovered"], false);
    send(&url, 0).await;
    assert_eq!(numbers(&app, 1), [0]);
    proxy.cut();
    app.status("down");
    for n in 1..=5 {
        send(&url, n).await;
    }
    proxy.restore();
    let ready = app.ready();
    assert_eq!(ready["recovered"], true, "{ready}");
    send(&url, 6).await;
    assert_eq!(numbers(&app, 6), (1..=6).collect::<Vec<_>>());
}
