//! The whole architecture end to end: SeaORM writes → signed webhooks → a WebSocket server →
//! a real socket.io v4 client (npm `socket.io-client` under node), which must receive exactly
//! the POS scenario's events, in order, with their data. The server is the Rust receiver twin
//! (`examples/receiver.rs`), then a small Node.js server on the npm `socket.io` package
//! playing the existing server.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver as Lines, channel};
use std::time::Duration;

use serde_json::{Value, json};
use vendora_observe::{Observer, Webhook};
use vendora_pos::{db, scenario};

const LINE_WAIT: Duration = Duration::from_secs(30);

fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Installs the npm peers from the lockfile when missing; fails saying what to install
/// where node is absent (the tests that call it are ignored unless asked for).
fn npm_ready() {
    assert!(
        Command::new("node").arg("--version").output().is_ok(),
        "node is not on PATH: this test needs Node.js and npm; install them, or run \
         bash .ci/run, which installs them"
    );
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if !node_dir().join("node_modules/socket.io-client").exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(node_dir())
                .status()
                .expect("npm is needed to install the socket.io peers");
            assert!(status.success(), "npm ci failed in tests/node");
        }
    });
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
struct Peer {
    child: Child,
    lines: Lines<String>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    fn spawn(mut cmd: Command) -> Peer {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer { child, lines }
    }

    /// The next line for which `pick` gives a value, skipping others.
    fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + LINE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            if let Some(v) = pick(&line) {
                return v;
            }
        }
    }
}

fn twin() -> (Peer, String) {
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join(format!("receiver{}", std::env::consts::EXE_SUFFIX));
    let mut cmd = Command::new(exe);
    cmd.env("WEBHOOK_SECRET", common::SECRET).env("PORT", "0");
    let peer = Peer::spawn(cmd);
    let base = peer.wait_for("the twin's address", |l| {
        l.strip_prefix("listening on ").map(str::to_owned)
    });
    (peer, base)
}

fn node_server() -> (Peer, String) {
    let mut cmd = Command::new("node");
    cmd.arg(node_dir().join("server.js"))
        .env("WEBHOOK_SECRET", common::SECRET);
    let peer = Peer::spawn(cmd);
    let port = peer.wait_for("the node server's port", |l| {
        l.strip_prefix("PORT ").map(str::to_owned)
    });
    (peer, format!("http://127.0.0.1:{port}"))
}

fn app(base: &str) -> Peer {
    let mut cmd = Command::new("node");
    cmd.arg(node_dir().join("client.js")).arg(base);
    let peer = Peer::spawn(cmd);
    peer.wait_for("the app to connect", |l| (l == "connected").then_some(()));
    peer
}

fn next_event(app: &Peer) -> (String, Value) {
    app.wait_for("an event", |l| {
        let v: Value = serde_json::from_str(l).ok()?;
        Some((v["event"].as_str()?.to_owned(), v["data"].clone()))
    })
}

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

fn assert_scenario(app: &Peer) {
    let got: Vec<(String, Value)> = (0..scenario::EXPECTED.len())
        .map(|_| next_event(app))
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
    npm_ready();
    let (_twin, base) = twin();
    let app = app(&base);
    let observer = run_scenario_to(&format!("{base}/webhook")).await;
    assert_scenario(&app);
    assert!(observer.flush(common::WAIT).await);
    assert_eq!(observer.stats().sent, 11);

    // A redelivery (same X-Webhook-Id) is acknowledged but not broadcast again.
    let service = observer.service().clone();
    let hook = Webhook::build("ping:sent", &json!({"n": 1})).unwrap();
    service.send(&hook).await.unwrap();
    service.send(&hook).await.unwrap();
    service
        .send(&Webhook::build("ping:sent", &json!({"n": 2})).unwrap())
        .await
        .unwrap();
    assert_eq!(next_event(&app), ("ping:sent".into(), json!({"n": 1})));
    assert_eq!(next_event(&app), ("ping:sent".into(), json!({"n": 2})));

    // What the twin refuses.
    let url = format!("{base}/webhook");
    let forged = b"{\"event\":\"x\",\"data\":1}".to_vec();
    assert_eq!(
        raw_post(&url, "application/json", Some("0".repeat(64)), forged).await,
        401
    );
    assert_eq!(
        raw_post(&url, "text/plain", None, b"hello".to_vec()).await,
        415
    );
    assert_eq!(
        raw_post(&url, "application/json", None, vec![b' '; 2 << 20]).await,
        413
    );
    let not_event = b"[1,2]".to_vec();
    let sig = vendora_observe::sign(common::SECRET.as_bytes(), &not_event);
    assert_eq!(
        raw_post(&url, "application/json", Some(sig), not_event).await,
        400
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_scenario_reaches_a_socket_io_app_through_a_node_socket_io_server() {
    npm_ready();
    let (_server, base) = node_server();
    let app = app(&base);
    let observer = run_scenario_to(&format!("{base}/webhook")).await;
    assert_scenario(&app);
    assert!(observer.flush(common::WAIT).await);
    assert_eq!(observer.stats().sent, 11);
}

/// A raw POST returning the status, through a plain TCP exchange so that nothing is
/// signed for us.
async fn raw_post(url: &str, content_type: &str, signature: Option<String>, body: Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(sig) = signature {
        head.push_str(&format!("X-Webhook-Signature: {sig}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&body).await; // the server may answer 413 before reading it all
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
