//! A real HTTP receiver on 127.0.0.1 that checks what the WebSocket server checks, records
//! every request, and answers as a test tells it to (2xx, an error status, late, never).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How the receiver answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200 OK.
    Ok,
    /// This status, with an optional `Retry-After` in seconds.
    Status(u16, Option<u64>),
    /// 302 to another path.
    Redirect,
    /// Wait, then 200 (the sender may give up first).
    Delay(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// `X-Webhook-Signature` verified over the raw body with the receiver's secret.
    pub signature_ok: bool,
    /// The status the receiver answered.
    pub status: u16,
    pub received_at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn id(&self) -> &str {
        self.header("x-webhook-id").unwrap_or("")
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn event(&self) -> String {
        self.json()["event"].as_str().unwrap_or("").to_owned()
    }
    pub fn data(&self) -> Value {
        self.json()["data"].clone()
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("")
    }
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

struct Shared {
    secret: Vec<u8>,
    requests: Mutex<Vec<Request>>,
    script: Mutex<(VecDeque<Reply>, Reply)>,
    /// Replies for requests whose body contains a text, before the script.
    rules: Mutex<Vec<(String, Reply)>>,
    /// Bodies as they arrive (requests are recorded when answered).
    arrivals: Mutex<Vec<String>>,
    changed: Notify,
}

/// A port of 127.0.0.1 held for a receiver that comes up later ([`Receiver::start_on`]):
/// bound but not listening, so connections are refused meanwhile (a receiver that is down)
/// and no other test is given the port, as it could be once a probe listener is dropped.
pub struct Reserved(tokio::net::TcpSocket);

impl Reserved {
    pub fn new() -> std::io::Result<Reserved> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        Ok(Reserved(socket))
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.local_addr().expect("bound")
    }

    /// The URL a receiver started on this port answers at.
    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr())
    }
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts on an ephemeral port of 127.0.0.1, answering 200 to everything.
    pub async fn start(secret: &str) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(listener, secret)
    }

    /// Starts on a port held until now (see [`Reserved`]).
    pub fn start_on(port: Reserved, secret: &str) -> std::io::Result<Receiver> {
        Self::serve(port.0.listen(1024)?, secret)
    }

    fn serve(listener: TcpListener, secret: &str) -> std::io::Result<Receiver> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            secret: secret.as_bytes().to_vec(),
            requests: Mutex::new(Vec::new()),
            script: Mutex::new((VecDeque::new(), Reply::Ok)),
            rules: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            changed: Notify::new(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to configure as `WEBSOCKET_SERVER_URL`; the path is checked by nobody.
    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// Answer every later request with `reply` (after any queued replies).
    pub fn set_reply(&self, reply: Reply) {
        self.shared.script.lock().unwrap().1 = reply;
    }

    /// Answer the next requests with these replies, in order, then the default again.
    pub fn queue_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().0.extend(replies);
    }

    /// Answer every request whose body contains `text` with `reply`, until
    /// [`clear_rules`](Self::clear_rules).
    pub fn reply_when(&self, text: &str, reply: Reply) {
        self.shared
            .rules
            .lock()
            .unwrap()
            .push((text.to_owned(), reply));
    }

    /// Forgets every [`reply_when`](Self::reply_when) rule.
    pub fn clear_rules(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Every request so far (each attempt of each event).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests answered 2xx, in the order they arrived.
    pub fn delivered(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::delivered)
            .collect()
    }

    /// Waits until at least `n` requests were answered 2xx, or panics after `timeout`
    /// with what did arrive.
    pub async fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(timeout, |r| r.iter().filter(|r| r.delivered()).count() >= n)
            .await;
        self.delivered()
    }

    /// Waits until at least `n` requests arrived (whatever the answer).
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_until(timeout, |r| r.len() >= n).await;
        self.requests()
    }

    /// Waits until a request whose body contains `text` has arrived (it may still be
    /// waiting for its answer), or panics after `timeout`.
    /// How many requests whose body contains `text` have arrived, answered or not.
    pub fn arrivals_with(&self, text: &str) -> usize {
        self.shared
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b.contains(text))
            .count()
    }

    pub async fn wait_until_arrived(&self, text: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self
                .shared
                .arrivals
                .lock()
                .unwrap()
                .iter()
                .any(|b| b.contains(text))
            {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("receiver: no request with {text:?} arrived within {timeout:?}");
            }
        }
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Request]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.shared.requests.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let got = self.requests();
                let summary: Vec<String> = got
                    .iter()
                    .map(|r| format!("{} {}", r.status, r.body_str()))
                    .collect();
                panic!(
                    "receiver: condition not met within {timeout:?}; {} requests:\n{}",
                    got.len(),
                    summary.join("\n")
                );
            }
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Instant::now();
    let signature_ok = headers
        .get("x-webhook-signature")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|sig| vendora_observe::verify(&shared.secret, &body, sig));
    shared
        .arrivals
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    shared.changed.notify_waiters();
    let rule = {
        let rules = shared.rules.lock().unwrap();
        let text = std::str::from_utf8(&body).unwrap_or("");
        rules
            .iter()
            .find(|(t, _)| text.contains(t.as_str()))
            .map(|(_, r)| r.clone())
    };
    let reply = rule.unwrap_or_else(|| {
        let mut script = shared.script.lock().unwrap();
        script.0.pop_front().unwrap_or_else(|| script.1.clone())
    });
    if let Reply::Delay(d) = &reply {
        tokio::time::sleep(*d).await;
    }
    let (status, retry_after) = match (&reply, signature_ok) {
        (_, false) => (401, None),
        (Reply::Ok | Reply::Delay(_), true) => (200, None),
        (Reply::Status(s, ra), true) => (*s, *ra),
        (Reply::Redirect, true) => (302, None),
    };
    shared.requests.lock().unwrap().push(Request {
        method,
        path: uri.path().to_owned(),
        headers,
        body,
        signature_ok,
        status,
        received_at,
    });
    shared.changed.notify_waiters();
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, "").into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    if status == 302 {
        response
            .headers_mut()
            .insert("location", "/elsewhere".parse().unwrap());
    }
    response
}

/// A port that accepts connections and never answers: a hung receiver.
pub struct Blackhole {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Blackhole {
    pub async fn start() -> std::io::Result<Blackhole> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket); // keep it open, read nothing, answer nothing
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Ok(Blackhole {
            addr,
            task,
            connections,
        })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }
}

/// An address on 127.0.0.1 where nothing listens (bound, then closed).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/webhook")
}
