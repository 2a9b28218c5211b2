//! Interop with real Node.js: bodies are fixed points of `JSON.stringify(JSON.parse(_))`,
//! and a node receiver (http + crypto, no npm) verifies every signature both over the raw
//! body and over the re-stringified body.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};
use vendora_observe::{WebhookBody, WebhookConfig, WebhookService};

/// `node`, or a failure saying what to install: the tests that call it are ignored unless
/// asked for.
fn node() -> &'static str {
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => "node",
        _ => panic!(
            "node is not on PATH: this test needs Node.js; install it, or run bash .ci/run, \
             which installs it"
        ),
    }
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node")
        .join(name)
        .display()
        .to_string()
}

/// Numbers where serde_json and JavaScript disagree, and their neighbours.
fn number() -> impl Strategy<Value = Value> {
    const SAFE: i64 = (1 << 53) - 1;
    prop_oneof![
        (-SAFE..=SAFE).prop_map(Value::from),
        (-1_000_000i64..1_000_000).prop_map(|i| json!(i as f64)), // integral floats: 10.0
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (-30i32..30, 1u32..10_000).prop_map(|(e, m)| json!(m as f64 * 10f64.powi(e))),
        (1e-7f64..1e-5).prop_map(|f| json!(f)), // the 1e-6 / 1e-7 boundary
        (1e20f64..1e22).prop_map(|f| json!(f)), // the 1e21 boundary
        Just(json!(-0.0)),
        Just(json!(5e-324)),
        Just(json!(f64::MAX)),
        Just(json!(0.1 + 0.2)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 _/-]{0,12}",
        "\\PC{0,12}",                                         // any printable unicode
        "[\\x00-\\x1f\"\\\\/\u{7f}\u{2028}\u{2029}é😀]{0,8}", // controls, quotes, separators
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        (0u32..5000).prop_map(|i| i.to_string()), // array-index keys JS reorders
        Just("4294967295".to_owned()),            // not an index: keeps its place
        Just("01".to_owned()),
        Just("-1".to_owned()),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn generated(n: usize) -> Vec<WebhookBody> {
    // A fixed seed: every run checks the same 3,000 bodies, so a failure reproduces.
    let algorithm = proptest::test_runner::RngAlgorithm::ChaCha;
    let mut runner = TestRunner::new_with_rng(
        Config {
            rng_algorithm: algorithm,
            ..Config::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(algorithm),
    );
    let strategy = (text(), value());
    (0..n)
        .map(|_| {
            let (event, data) = strategy.new_tree(&mut runner).unwrap().current();
            WebhookBody::from_value(&event, &data)
        })
        .collect()
}

#[test]
#[ignore = "needs node: run with --include-ignored (bash .ci/run)"]
fn bodies_survive_json_parse_and_stringify_in_node() {
    let bodies = generated(3000);
    // The Rust side first: the body is JSON and means the data it was built from.
    for b in &bodies {
        let back: Value = serde_json::from_slice(b.as_bytes()).unwrap();
        assert_eq!(back["event"], b.event());
    }
    let node = node();
    let mut child = Command::new(node)
        .arg(script("restringify.js"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for b in &bodies {
            serde_json::to_writer(&mut stdin, b.as_str()).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mismatches: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("MISMATCH"))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {}:\n{}",
        mismatches.len(),
        bodies.len(),
        mismatches.join("\n")
    );
    assert_eq!(
        stdout.lines().last(),
        Some(format!("checked {}", bodies.len()).as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node: run with --include-ignored (bash .ci/run)"]
async fn a_node_receiver_verifies_raw_and_restringified_bodies() {
    let node = node();
    let mut child = tokio::process::Command::new(node)
        .arg(script("receiver.js"))
        .env("WEBHOOK_SECRET", common::SECRET)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    // Read node's lines on a plain thread: a blocking pipe reader.
    let std_stdout = stdout.into_owned_fd().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(std::fs::File::from(std_stdout)).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let port_line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("node printed no port");
    let port: u16 = port_line.strip_prefix("PORT ").unwrap().parse().unwrap();

    let service = WebhookService::new(
        WebhookConfig::builder()
            .url(format!("http://127.0.0.1:{port}/webhook"))
            .secret(common::SECRET)
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut payloads: Vec<(String, Value)> = vec![
        (
            "product:created".into(),
            json!({"id": 1, "name": "Espresso", "price": 12.0, "stock": 10}),
        ),
        (
            "stock:updated".into(),
            json!({"productId": 1, "newStock": 7}),
        ),
        (
            "order:created".into(),
            json!({"total": 1e21, "tax": 1e-7, "discount": -0.0, "fee": 0.000001}),
        ),
        (
            "category:created".into(),
            json!({"name": "Thé & café \u{1} / \u{2028} 😀", "10": 1, "2": 2, "a": 3}),
        ),
        ("product:deleted".into(), json!({"id": 9007199254740991i64})),
    ];
    for (i, b) in generated(200).into_iter().enumerate() {
        let v: Value = serde_json::from_slice(b.as_bytes()).unwrap();
        payloads.push((format!("generated:{i}"), v["data"].clone()));
    }
    for (event, data) in &payloads {
        service.try_dispatch(event, data).await.unwrap();
    }
    let mut lines = Vec::new();
    while lines.len() < payloads.len() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("node stopped answering");
        lines.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    for (line, (event, _)) in lines.iter().zip(&payloads) {
        assert_eq!(line["event"], json!(event));
        assert_eq!(line["rawOk"], json!(true), "{line}");
        assert_eq!(line["restringifiedOk"], json!(true), "{line}");
        assert_eq!(line["contentType"], json!("application/json"));
        assert!(
            line["userAgent"]
                .as_str()
                .unwrap()
                .starts_with("vendora-observe/")
        );
    }
    let _ = child.kill().await;
}

/// Installs the npm packages of tests/node from the lockfile when missing.
fn npm_ready() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
        if !dir.join("node_modules/express").exists() {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .status()
                .expect("npm is needed to install the Node peers");
            assert!(status.success(), "npm ci failed in tests/node");
        }
    });
}

/// The README's Express server (tests/node/express-server.js, the same text) verifies our
/// webhooks, refuses forged, missing, short and non-JSON requests without falling over,
/// and acknowledges a redelivery without broadcasting it again.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and npm: run with --include-ignored (bash .ci/run)"]
async fn the_readme_express_server_verifies_and_refuses_what_it_should() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let file = std::fs::read_to_string(script("express-server.js")).unwrap();
    let at = readme
        .find("## Connecting your Node server")
        .expect("README has the Node section");
    let start = readme[at..].find("```js\n").expect("a js block") + at + 6;
    let end = readme[start..].find("\n```").unwrap() + start;
    assert_eq!(
        &readme[start..=end],
        file,
        "README.md's Express snippet differs from tests/node/express-server.js"
    );

    npm_ready();
    let mut child = tokio::process::Command::new(node())
        .arg(script("express-server.js"))
        .env("WEBHOOK_SECRET", common::SECRET)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::time::timeout(Duration::from_secs(20), stdout.read_line(&mut line))
        .await
        .expect("the server printed its port")
        .unwrap();
    let port: u16 = line.trim().strip_prefix("PORT ").unwrap().parse().unwrap();
    let url = format!("http://127.0.0.1:{port}/webhook");
    let service = |secret: &str| {
        WebhookService::new(
            WebhookConfig::builder()
                .url(url.clone())
                .secret(secret)
                .build()
                .unwrap(),
        )
        .unwrap()
    };
    let ok = service(common::SECRET);
    let hook =
        vendora_observe::Webhook::build("stock:updated", &json!({"productId": 1, "newStock": 7}))
            .unwrap();
    assert_eq!(ok.send(&hook).await.unwrap().status, 200);
    // A redelivery: acknowledged.
    assert_eq!(ok.send(&hook).await.unwrap().status, 200);
    let wrong = service("not-the-secret")
        .try_dispatch("stock:updated", &json!({"productId": 1}))
        .await
        .unwrap_err();
    assert_eq!(wrong.status(), Some(401), "{wrong}");
    let body = br#"{"event":"x","data":1}"#.to_vec();
    for (content_type, signature, expected) in [
        ("application/json", None, 401),
        ("application/json", Some("abc".to_owned()), 401),
        ("application/json", Some("0".repeat(64)), 401),
        ("text/plain", None, 415),
    ] {
        let got = raw_post(&url, content_type, signature.clone(), body.clone()).await;
        assert_eq!(got, expected, "{content_type} {signature:?}");
    }
    // Still standing.
    let again = vendora_observe::Webhook::build("ping:sent", &json!({"n": 1})).unwrap();
    assert_eq!(ok.send(&again).await.unwrap().status, 200);
    let _ = child.kill().await;
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
    let _ = s.write_all(&body).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
