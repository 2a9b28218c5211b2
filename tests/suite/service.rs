//! `WebhookService` against a real HTTP receiver on 127.0.0.1: headers and signature, a
//! closed port, a receiver slower than the timeout, a redirect, 401 and 500.

use crate::common;

use std::time::{Duration, SystemTime};

use common::SECRET;
use serde_json::json;
use vendora_observe::signature::verify_standard;
use vendora_observe::{DeliveryError, WebhookConfig, WebhookService};
use vendora_pos::receiver::{Blackhole, Receiver, Reply, closed_port_url};

fn service(url: &str, timeout: Duration) -> WebhookService {
    WebhookService::new(
        WebhookConfig::builder()
            .url(url)
            .secret(SECRET)
            .timeout(timeout)
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// One `try_dispatch`, which must finish within 10 s (`what` names the hang).
async fn try_within_10s(
    s: &WebhookService,
    what: &str,
) -> Result<vendora_observe::Delivered, DeliveryError> {
    tokio::time::timeout(Duration::from_secs(10), s.try_dispatch("x:y", &json!({})))
        .await
        .unwrap_or_else(|_| panic!("{what}"))
}

#[tokio::test]
async fn dispatch_posts_the_signed_body_with_the_protocol_headers() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let s = service(&receiver.url(), Duration::from_secs(5));
    s.dispatch("product:deleted", &json!({"id": 3})).await;
    s.dispatch("product:deleted", &json!({"id": 3})).await;
    let got = receiver.wait_delivered(2, common::WAIT).await;
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/webhook");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("user-agent"),
        Some(concat!("vendora-observe/", "0.1.0"))
    );
    assert_eq!(
        r.body_str(),
        r#"{"event":"product:deleted","data":{"id":3}}"#
    );
    let sig = r.header("x-webhook-signature").unwrap();
    assert_eq!(sig.len(), 64);
    assert!(
        sig.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );
    assert!(vendora_observe::verify(SECRET.as_bytes(), &r.body, sig));
    assert!(r.signature_ok);
    // Ids are unique per event (a UUID), not per body.
    assert_eq!(r.id().len(), 36);
    assert_ne!(got[0].id(), got[1].id());
    // The Standard Webhooks headers beside the legacy one, by default: the same id, a
    // signature over id, time and body.
    assert_eq!(r.header("webhook-id"), Some(r.id()));
    let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    assert_eq!(
        r.header("webhook-signature"),
        Some(
            vendora_observe::signature::standard_signature(SECRET.as_bytes(), r.id(), ts, &r.body)
                .as_str()
        )
    );
    assert!(r.header("authorization").is_none());
    assert_eq!(r.header("host"), receiver.url().split('/').nth(2));
}

/// Credentials in WEBSOCKET_SERVER_URL are sent as HTTP Basic authentication (decoded), as
/// browsers and HTTP clients do, and the query string is kept.
#[tokio::test]
async fn credentials_in_the_url_are_sent_as_basic_auth() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let url = receiver
        .url()
        .replace("http://", "http://pos%40shop:s3cret@")
        + "?tenant=7";
    let s = service(&url, Duration::from_secs(5));
    s.try_dispatch("x:y", &json!({})).await.unwrap();
    let r = &receiver.wait_delivered(1, common::WAIT).await[0];
    // base64("pos@shop:s3cret")
    assert_eq!(
        r.header("authorization"),
        Some("Basic cG9zQHNob3A6czNjcmV0")
    );
    assert_eq!(r.path, "/webhook");
    assert!(!format!("{s:?}").contains("s3cret"));
}

#[tokio::test]
async fn the_signature_matches_an_independent_implementation() {
    // Expected hex from python3: hmac.new(b"test-secret-0123456789", body, hashlib.sha256).
    let receiver = Receiver::start(SECRET).await.unwrap();
    let s = service(&receiver.url(), Duration::from_secs(5));
    s.try_dispatch("stock:updated", &json!({"productId": 1, "newStock": 7}))
        .await
        .unwrap();
    let r = &receiver.delivered()[0];
    assert_eq!(
        r.body_str(),
        r#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#
    );
    assert_eq!(
        r.header("x-webhook-signature").unwrap(),
        "13004f0914d15d409662f514ede0c6e8c4cc3ec737d67204c626a134ece93ecc"
    );
}

#[tokio::test]
async fn standard_webhooks_headers_verify_when_switched_on() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let s = WebhookService::new(
        WebhookConfig::builder()
            .url(receiver.url())
            .secret(SECRET)
            .standard_headers(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    s.try_dispatch("category:created", &json!({"id": 1, "name": "Tea"}))
        .await
        .unwrap();
    let r = &receiver.delivered()[0];
    assert_eq!(r.header("webhook-id"), Some(r.id()));
    let verdict = verify_standard(
        SECRET.as_bytes(),
        r.header("webhook-id").unwrap(),
        r.header("webhook-timestamp").unwrap(),
        r.header("webhook-signature").unwrap(),
        &r.body,
        SystemTime::now(),
        Duration::from_secs(300),
    );
    assert_eq!(verdict, Ok(()));
}

#[tokio::test]
async fn a_closed_port_fails_fast_with_a_connect_error() {
    let url = closed_port_url().await;
    let s = service(&url, Duration::from_secs(30));
    // Well before the 30 s timeout: the connection is refused at once.
    let result = try_within_10s(&s, "dispatch to a closed port hung").await;
    assert!(
        matches!(result, Err(DeliveryError::Connect { .. })),
        "{result:?}"
    );
    // And dispatch neither panics nor hangs.
    tokio::time::timeout(Duration::from_secs(10), s.dispatch("x:y", &json!({})))
        .await
        .expect("dispatch hung");
}

#[tokio::test]
async fn a_receiver_slower_than_the_timeout_is_abandoned_at_the_timeout() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Delay(Duration::from_secs(30)));
    let s = service(&receiver.url(), Duration::from_millis(300));
    let started = std::time::Instant::now();
    let result = try_within_10s(&s, "the timeout was not applied").await;
    assert!(
        matches!(result, Err(DeliveryError::Timeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    // A blackhole (accepts, never answers) is the same.
    let hole = Blackhole::start().await.unwrap();
    let s = service(&hole.url(), Duration::from_millis(300));
    let result = try_within_10s(&s, "the timeout was not applied").await;
    assert!(
        matches!(result, Err(DeliveryError::Timeout { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Redirect);
    let s = service(&receiver.url(), Duration::from_secs(5));
    let err = s.try_dispatch("x:y", &json!({})).await.unwrap_err();
    match &err {
        DeliveryError::Redirect { status, location } => {
            assert_eq!(*status, 302);
            assert_eq!(location.as_deref(), Some("/elsewhere"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());
    // Only the one request: nothing went to /elsewhere.
    let all = receiver.requests();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].path, "/webhook");
}

#[tokio::test]
async fn status_errors_are_reported_and_a_401_names_the_secret() {
    let receiver = Receiver::start("the-server-has-another-secret")
        .await
        .unwrap();
    let s = service(&receiver.url(), Duration::from_secs(5));
    let err = s.try_dispatch("x:y", &json!({})).await.unwrap_err();
    assert!(
        matches!(&err, DeliveryError::Status { status, .. } if *status == 401),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("WEBHOOK_SECRET probably differs"),
        "{err}"
    );

    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.set_reply(Reply::Status(500, None));
    let s = service(&receiver.url(), Duration::from_secs(5));
    let err = s.try_dispatch("x:y", &json!({})).await.unwrap_err();
    assert!(
        matches!(&err, DeliveryError::Status { status, .. } if *status == 500),
        "{err:?}"
    );
    assert!(err.is_retryable());

    receiver.set_reply(Reply::Status(503, Some(7)));
    let err = s.try_dispatch("x:y", &json!({})).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
}

#[tokio::test(flavor = "current_thread")]
async fn dispatch_logs_failures_without_the_secret() {
    let (_guard, logs) = common::capture_logs();

    let receiver = Receiver::start("another-secret").await.unwrap();
    let s = service(&receiver.url(), Duration::from_secs(5));
    s.dispatch("product:created", &json!({"id": 1})).await;
    let closed = closed_port_url().await;
    service(&closed, Duration::from_secs(5))
        .dispatch("product:updated", &json!({"id": 1}))
        .await;

    let text = logs();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("ERROR") && lines[0].contains("event=\"product:created\""),
        "{text}"
    );
    assert!(
        lines[0].contains("status=401") && lines[0].contains("WEBHOOK_SECRET probably differs"),
        "{text}"
    );
    assert!(lines[0].contains(&receiver.url()), "{text}");
    assert!(
        lines[1].contains("WARN") && lines[1].contains("kind=\"connect\""),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    assert!(!format!("{s:?}").contains(SECRET));
}

/// A raw HTTP/1.1 server on 127.0.0.1: on each connection it reads requests one by one and
/// lets `answer(connection, request)` say whether to answer 200 (and keep the connection)
/// or to drop the connection without a word. Returns its URL and the X-Webhook-Id of every
/// request it read, with its connection's number.
async fn dropping_server(
    answer: fn(usize, usize) -> bool,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for connection in 0.. {
            let (socket, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                for request in 0.. {
                    let (mut length, mut id) = (0, String::new());
                    loop {
                        let mut line = String::new();
                        if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if let Some(v) = lower.strip_prefix("x-webhook-id:") {
                            id = v.trim().to_owned();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    socket.read_exact(&mut body).await.unwrap();
                    log.lock().unwrap().push((connection, id));
                    if !answer(connection, request) {
                        return; // dropped: closed without an answer
                    }
                    // With a body, as the Node server answers: the sender reads it to keep
                    // the connection.
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}")
                        .await
                        .unwrap();
                }
            });
        }
    });
    (url, seen)
}

/// The receiver closes a kept-alive connection under the next request (its idle timeout or
/// connection cap, racing the sender): the request is sent once more at once on a new
/// connection, with the same X-Webhook-Id, and delivered; no failed attempt.
#[tokio::test]
async fn a_kept_alive_connection_closed_under_a_request_is_resent_on_a_new_one() {
    // Connection 0 answers its first request and drops its second; the others answer.
    let (url, seen) = dropping_server(|connection, request| connection > 0 || request == 0).await;
    let s = service(&url, Duration::from_secs(5));
    assert_eq!(try_within_10s(&s, "first").await.unwrap().status, 200);
    assert_eq!(try_within_10s(&s, "second").await.unwrap().status, 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!((seen[1].0, seen[2].0), (0, 1), "resent on a new connection");
    assert_eq!(seen[1].1, seen[2].1, "with the same X-Webhook-Id");
}

/// A receiver that answers 200 and then never finishes the answer's body: the delivery
/// stands (the receiver decided), the connection is not reused, and the next request goes
/// out on a new one.
#[tokio::test]
async fn an_answer_whose_body_stalls_still_delivers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                // 100 bytes announced, 2 sent, then silence (the socket stays open).
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let s = service(&url, Duration::from_millis(500));
    for n in 1..=2 {
        let delivered = try_within_10s(&s, "a stalled answer body hung the sender").await;
        assert_eq!(delivered.unwrap().status, 200);
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), n);
    }
}

/// A receiver that drops every request: one resend, then the attempt fails (the scheduler's
/// backoff takes over), not a loop.
#[tokio::test]
async fn a_receiver_that_drops_every_request_gets_one_resend_and_an_error() {
    let (url, seen) = dropping_server(|_, _| false).await;
    let s = service(&url, Duration::from_secs(5));
    let error = try_within_10s(&s, "dropping receiver").await.unwrap_err();
    assert_eq!(error.kind(), "transport", "{error}");
    assert!(error.is_retryable());
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// Every attempt carries a W3C `traceparent` in the event's trace, with a span of its own.
#[tokio::test]
async fn every_attempt_carries_a_traceparent_in_the_events_trace() {
    use vendora_observe::trace::TraceParent;
    let receiver = Receiver::start(SECRET).await.unwrap();
    receiver.queue_replies([Reply::Status(503, None)]);
    let s = service(&receiver.url(), Duration::from_secs(5));
    let webhook = vendora_observe::Webhook::build("x:y", &json!({})).unwrap();
    assert!(s.send(&webhook).await.is_err());
    assert_eq!(s.send(&webhook).await.unwrap().status, 200);
    let parents: Vec<TraceParent> = receiver
        .requests()
        .iter()
        .map(|r| TraceParent::parse(r.header("traceparent").expect("a traceparent")).unwrap())
        .collect();
    assert_eq!(parents.len(), 2);
    for p in &parents {
        assert_eq!(p.trace_id(), webhook.trace().trace_id());
        assert_ne!(p.span_id(), webhook.trace().span_id());
    }
    assert_ne!(parents[0].span_id(), parents[1].span_id());
}
