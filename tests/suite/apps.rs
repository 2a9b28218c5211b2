//! Each app sees what it may and nothing else: two stores' apps side by side through the
//! server, scoped and minted tokens, expiry and revocation during the session, the live
//! page's own credential, origins, sessions bound to their client, an app that does not
//! read. Apps are real socket.io clients (node, through the apps' module).

use crate::common;

use std::time::Duration;

use common::{App, SECRET};
use serde_json::json;
use vendora_observe::{Observer, WebhookConfig, WebhookService};
use vendora_observe_server::{AppToken, Scope};
use vendora_pos::{db, scenario};

const STORE1: &str = "store-1-till-token";
const STORE2: &str = "store-2-till-token";
const HQ: &str = "head-office-token";
const ADMIN: &str = "admin-token-of-the-test";

fn tokens() -> String {
    format!("{STORE1}=store:1,{STORE2}=store:2,{HQ}")
}

fn sender(url: &str) -> WebhookService {
    WebhookService::new(common::config(url)).unwrap()
}

/// Runs the POS scenario (one store's orders each, the shared catalogue) to `url`.
async fn scenario_to(url: &str) {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let observer = Observer::builder(common::config(url))
        .retry(common::fast_retries())
        .build()
        .await
        .unwrap();
    observer
        .scope(scenario::run(&db, false, async |_| {}))
        .await
        .unwrap();
    assert!(observer.flush(common::WAIT).await);
    assert_eq!(observer.stats().sent, scenario::EXPECTED.len() as u64);
}

/// An event every app receives, sent last: nothing the app was not to see came before it.
async fn end_marker(url: &str) {
    let delivered = sender(url).try_dispatch("sync:end", &json!({})).await;
    assert_eq!(delivered.map(|d| d.status).ok(), Some(200));
}

/// The events `app` receives up to the end marker: their names, and their offsets in order.
fn until_end(app: &App) -> Vec<String> {
    let mut names = Vec::new();
    let mut last = String::new();
    loop {
        let got = app.event();
        let offset = got.meta["offset"].as_str().unwrap().to_owned();
        assert!(
            offset_key(&offset) > offset_key(&last),
            "offsets grow: {last} then {offset}"
        );
        last = offset;
        if got.event == "sync:end" {
            return names;
        }
        names.push(got.event);
    }
}

fn offset_key(offset: &str) -> (u64, u64) {
    offset
        .split_once('-')
        .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
        .unwrap_or((0, 0))
}

fn live(app: &App) {
    let ready = app.ready();
    assert_eq!(ready["recovered"], false, "a first connection: {ready}");
}

/// Two stores side by side: each store's app receives exactly the catalogue's events and
/// its own store's orders, in order, each with its meta; head office (a bare token) every
/// event. An app's token opens neither the live page nor another store by asking.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn each_store_sees_its_orders_and_the_catalogue_and_nothing_else() {
    let tokens = tokens();
    let (_server, base) = common::server(&[
        ("WEBHOOK_SECRET", SECRET),
        ("APP_TOKENS", &tokens),
        ("ADMIN_TOKEN", ADMIN),
    ]);
    let store1 = App::start(&base, &[("TOKEN", STORE1)]);
    let store2 = App::start(&base, &[("TOKEN", STORE2), ("TRANSPORT", "polling")]);
    let hq = App::start(&base, &[("TOKEN", HQ)]);
    for app in [&store1, &store2, &hq] {
        live(app);
    }
    let url = format!("{base}/webhook");
    scenario_to(&url).await;
    end_marker(&url).await;
    assert_eq!(until_end(&store1), scenario::expected_for_store(1));
    assert_eq!(until_end(&store2), scenario::expected_for_store(2));
    assert_eq!(until_end(&hq), scenario::EXPECTED);

    // An app token asking for the live page's records: refused, with the reason.
    let (_peeker, first) = common::app_monitor(&base, STORE1);
    assert!(
        first.starts_with("connect_error the live page needs the server's ADMIN_TOKEN"),
        "{first}"
    );
}

/// Apps authenticate on the handshake: without a token, with a wrong, expired or forged
/// one, or from an origin not allowed (a DNS name rebound to the server's address
/// included), they are refused; with a listed token or one the backend minted, they
/// connect. APP_AUTH=off lets anyone in, and says so; without any way to authenticate the
/// server does not start.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn apps_must_authenticate() {
    let minting = "minting-secret";
    let tokens = tokens();
    let (_server, base) = common::server(&[
        ("WEBHOOK_SECRET", SECRET),
        ("APP_TOKENS", &tokens),
        ("APP_TOKEN_SECRET", minting),
        ("ALLOWED_ORIGINS", "https://pos.example"),
    ]);
    let port = base.rsplit(':').next().unwrap().to_owned();
    let minted = AppToken::new(
        "till-7",
        Scope::rooms(["store:1"]),
        Duration::from_secs(600),
    )
    .mint(minting.as_bytes());
    let expired =
        AppToken::new("till-7", Scope::rooms(["store:1"]), Duration::ZERO).mint(minting.as_bytes());
    let forged =
        AppToken::new("till-7", Scope::All, Duration::from_secs(600)).mint(b"not-the-secret");
    let rebound = format!("http://evil.example:{port}");
    let own = format!("http://127.0.0.1:{port}");
    for (token, origin, expected) in [
        (None, None, "connect_error a token is required"),
        (Some("wrong"), None, "connect_error the token is not valid"),
        (
            Some(expired.as_str()),
            None,
            "connect_error the token has expired",
        ),
        (
            Some(forged.as_str()),
            None,
            "connect_error the token is not valid",
        ),
        (Some(STORE1), Some("https://evil.example"), "connect_error"),
        (Some(STORE1), Some(rebound.as_str()), "connect_error"),
        (Some(STORE1), None, "connected"),
        (Some(minted.as_str()), None, "connected"),
        (Some(STORE1), Some("https://pos.example"), "connected"),
        (Some(STORE1), Some(own.as_str()), "connected"),
    ] {
        let (_app, first) = common::app(&base, token, "once", origin);
        assert!(
            first.starts_with(expected),
            "token {token:?} origin {origin:?}: {first}"
        );
    }
    let (open, open_base) = common::server(&[("WEBHOOK_SECRET", SECRET), ("APP_AUTH", "off")]);
    let printed = open.skipped.borrow().join("\n");
    assert!(
        printed.contains("APP_AUTH=off: any app may connect"),
        "{printed}"
    );
    let (_app, first) = common::app(&open_base, None, "once", Some("https://anywhere.example"));
    assert_eq!(first, "connected");
    // Without a way to authenticate and without APP_AUTH=off, the server does not start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_server-under-test"))
        .env_clear()
        .env("WEBHOOK_SECRET", SECRET)
        .env("PORT", "0")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && err.contains("set APP_TOKENS"),
        "{err}"
    );
}

/// A minted token is enforced during the session: at its expiry the app is told why and
/// disconnected; the apps' module fetches a fresh token (here from a file the test rewrites)
/// and reconnects, catching up what was sent meanwhile.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn a_token_expires_during_the_session_and_the_app_comes_back_with_a_fresh_one() {
    let minting = "minting-secret";
    let (server, base) =
        common::server(&[("WEBHOOK_SECRET", SECRET), ("APP_TOKEN_SECRET", minting)]);
    let dir = common::temp_dir("token");
    let file = dir.join("token");
    let mint =
        |ttl| AppToken::new("till-7", Scope::rooms(["store:1"]), ttl).mint(minting.as_bytes());
    // Written beside and renamed: the module never reads a token half-written.
    let give = |ttl| {
        let next = dir.join("token.next");
        std::fs::write(&next, mint(Duration::from_secs(ttl))).unwrap();
        std::fs::rename(&next, &file).unwrap();
    };
    let mut ttl = 3;
    give(ttl);
    let app = App::start(&base, &[("TOKEN_FILE", file.to_str().unwrap())]);
    // On a loaded machine the short token may expire before the app is live: the module
    // then asks for one again, and gets a fresh one, longer each time, until it is live.
    loop {
        let v = app.next_where("the app live, or its token expired", |v| {
            v["kind"] == "ready" || (v["kind"] == "status" && v["state"] == "down")
        });
        if v["kind"] == "ready" {
            assert_eq!(v["recovered"], false, "a first connection: {v}");
            break;
        }
        ttl *= 2;
        give(ttl);
    }
    // The next token, for when the module asks.
    give(600);
    let url = format!("{base}/webhook");
    let send = |n: i64| {
        let url = url.clone();
        async move {
            let body = json!({"event": "order:updated", "data": {"id": n}, "rooms": ["store:1"]});
            let body = serde_json::to_vec(&body).unwrap();
            common::signed_post(&url, SECRET, &format!("order-{n}"), &body).await
        }
    };
    assert_eq!(send(1).await, 200);
    assert_eq!(app.event().data, json!({"id": 1}));
    let down = app.status("down");
    assert_eq!(
        (down["state"].as_str(), down["detail"].as_str()),
        (Some("down"), Some("the token has expired")),
        "{down}"
    );
    server.wait_for("the expiry in the server's log", |l| {
        l.contains("app \"till-7\" (store:1) disconnected: the token has expired")
            .then_some(())
    });
    assert_eq!(send(2).await, 200);
    let ready = app.ready();
    assert_eq!(ready["recovered"], true, "{ready}");
    // What was sent while it was away, then what comes next: once each, in order.
    assert_eq!(send(3).await, 200);
    let got: Vec<_> = app.events(2).into_iter().map(|g| g.data).collect();
    assert_eq!(got, [json!({"id": 2}), json!({"id": 3})]);
}

/// Tokens are revoked without a restart: a static token removed from APP_TOKENS_FILE, and a
/// minted token's subject listed in APP_REVOCATIONS_FILE, disconnect their apps within
/// moments (told why), and neither connects again.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn tokens_are_revoked_without_a_restart() {
    let minting = "minting-secret";
    let dir = common::temp_dir("revoke");
    let tokens = dir.join("tokens");
    let revoked = dir.join("revoked");
    std::fs::write(&tokens, format!("{STORE1}=store:1\n{STORE2}=store:2\n")).unwrap();
    std::fs::write(&revoked, "# none yet\n").unwrap();
    let (server, base) = common::server(&[
        ("WEBHOOK_SECRET", SECRET),
        ("APP_TOKENS_FILE", tokens.to_str().unwrap()),
        ("APP_REVOCATIONS_FILE", revoked.to_str().unwrap()),
        ("APP_TOKEN_SECRET", minting),
    ]);
    let minted = AppToken::new(
        "lost-phone",
        Scope::rooms(["store:2"]),
        Duration::from_secs(600),
    )
    .mint(minting.as_bytes());
    let kept = App::start(&base, &[("TOKEN", STORE2)]);
    let removed = App::start(&base, &[("TOKEN", STORE1)]);
    let lost = App::start(&base, &[("TOKEN", &minted)]);
    for app in [&kept, &removed, &lost] {
        live(app);
    }
    std::fs::write(&tokens, format!("{STORE2}=store:2\n")).unwrap();
    let status = removed.status("refused");
    assert_eq!(
        (status["state"].as_str(), status["detail"].as_str()),
        (Some("refused"), Some("the token was revoked")),
        "{status}"
    );
    std::fs::write(&revoked, "lost-phone\n").unwrap();
    let status = lost.status("refused");
    assert_eq!(
        (status["state"].as_str(), status["detail"].as_str()),
        (Some("refused"), Some("the token was revoked")),
        "{status}"
    );
    server.wait_for("the revocation in the log", |l| {
        l.contains("app \"lost-phone\" (store:2) disconnected: the token was revoked")
            .then_some(())
    });
    // They cannot come back; the app whose token stayed still hears its store.
    for token in [STORE1, minted.as_str()] {
        let (_app, first) = common::app(&base, Some(token), "once", None);
        assert!(first.starts_with("connect_error the token"), "{first}");
    }
    let body = br#"{"event":"order:created","data":{"id":5},"rooms":["store:2"]}"#;
    assert_eq!(
        common::signed_post(&format!("{base}/webhook"), SECRET, "o5", body).await,
        200
    );
    assert_eq!(kept.event().data, json!({"id": 5}));
}

/// The engine.io session id travels in URLs (proxies log them): whoever holds it must not
/// be able to poll or upgrade the session from elsewhere. The app's session, its id leaked,
/// is refused to a client on another address (127.0.0.2), over polling and WebSocket,
/// while the app goes on receiving.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn a_leaked_session_id_takes_nothing_over() {
    let tokens = tokens();
    let (server, base) = common::server(&[("WEBHOOK_SECRET", SECRET), ("APP_TOKENS", &tokens)]);
    let app = App::start(
        &base,
        &[
            ("TOKEN", STORE1),
            ("TRANSPORT", "polling"),
            ("SHOW_SID", "1"),
        ],
    );
    let sid = app.next_of("sid")["sid"].as_str().unwrap().to_owned();
    live(&app);
    let printed = server.skipped.borrow().join("\n");
    assert!(!printed.contains(&sid), "the session id is never printed");
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    for path in [
        format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
        format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
    ] {
        let answer = common::get_from(
            "127.0.0.2",
            port,
            &path,
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("Session ID unknown"),
            "{path}: {answer}"
        );
    }
    server.wait_for("the refusal", |l| {
        l.contains("refused a session used from 127.0.0.2 while it was opened from 127.0.0.1")
            .then_some(())
    });
    let body = br#"{"event":"order:created","data":{"id":8},"rooms":["store:1"]}"#;
    assert_eq!(
        common::signed_post(&format!("{base}/webhook"), SECRET, "o8", body).await,
        200
    );
    assert_eq!(app.event().data, json!({"id": 8}));
}

/// An app that stops reading fills its buffer and is dropped; every webhook is still
/// answered 200, and an app that reads gets every event.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn an_app_that_does_not_read_is_dropped_not_the_webhooks() {
    let (server, base) = common::server(&[("WEBHOOK_SECRET", SECRET), ("APP_TOKENS", HQ)]);
    let (slow, first) = common::app(&base, Some(HQ), "slow", None);
    assert_eq!(first, "connected");
    let (reader, first) = common::app(&base, Some(HQ), "", None);
    assert_eq!(first, "connected");
    let sender = sender(&format!("{base}/webhook"));
    let padding = "p".repeat(4_000);
    // Until the slow app is dropped: the kernel's socket buffers take a few megabytes
    // before its own buffer fills, more on some machines than others.
    let dropped = |l: &str| {
        l.contains("app dropped: an app with a static token for every room: its buffer is full")
    };
    let mut n = 0;
    while !server.has_printed(dropped) {
        assert!(n < 20_000, "the slow app was never dropped");
        for _ in 0..100 {
            let delivered = sender
                .try_dispatch(
                    "product:updated",
                    &json!({"id": 1, "n": n, "padding": padding}),
                )
                .await;
            assert_eq!(
                delivered.map(|d| d.status).map_err(|e| e.to_string()),
                Ok(200),
                "webhook {n}"
            );
            n += 1;
        }
    }
    for i in 0..n {
        let (event, data) = common::next_event(&reader);
        assert_eq!((event.as_str(), &data["n"]), ("product:updated", &json!(i)));
    }
    drop(slow);
}

/// The README's Quick start sends to the server the way a newcomer does: the scenario
/// through `WebhookConfig::from_env`-like defaults reaches an app (the server, not the
/// `listen` inspector, is what apps connect to).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_server_takes_the_senders_defaults() {
    let (_server, base) = common::server(&[("WEBHOOK_SECRET", SECRET), ("APP_TOKENS", HQ)]);
    let app = App::start(&base, &[("TOKEN", HQ)]);
    live(&app);
    let config = WebhookConfig::builder()
        .url(format!("{base}/webhook"))
        .secret(SECRET)
        .build()
        .unwrap();
    let delivered = WebhookService::new(config)
        .unwrap()
        .try_dispatch("stock:updated", &json!({"productId": 1, "newStock": 7}))
        .await
        .unwrap();
    assert_eq!(delivered.status, 200);
    let got = app.event();
    assert_eq!(
        (got.event.as_str(), got.data),
        ("stock:updated", json!({"productId": 1, "newStock": 7}))
    );
}
