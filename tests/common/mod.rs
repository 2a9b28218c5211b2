//! Set-up shared by the end-to-end tests: a real database, a real receiver, an observer
//! scoped to the test.
#![allow(dead_code)]

use std::time::Duration;

use sea_orm::DatabaseConnection;
use vendora_observe::{Observer, RetryPolicy, WebhookConfig};
use vendora_pos::db;
use vendora_pos::receiver::Receiver;

pub const SECRET: &str = "test-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Env {
    pub db: DatabaseConnection,
    pub receiver: Receiver,
    pub observer: Observer,
}

/// A fresh in-memory SQLite with the POS tables, a receiver and a direct-mode observer.
pub async fn env() -> Env {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let receiver = Receiver::start(SECRET).await.unwrap();
    let observer = observer_for(&receiver.url(), fast_retries()).await;
    Env {
        db,
        receiver,
        observer,
    }
}

pub fn config(url: &str) -> WebhookConfig {
    WebhookConfig::builder()
        .url(url)
        .secret(SECRET)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

pub async fn observer_for(url: &str, retry: RetryPolicy) -> Observer {
    Observer::builder(config(url))
        .retry(retry)
        .build()
        .await
        .unwrap()
}

pub fn fast_retries() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(20)
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(200))
        .max_retry_after(Duration::from_secs(2))
        .probe_interval(Duration::from_millis(100))
}

/// `(event, data)` of each delivered request, in arrival order.
pub fn events(requests: &[vendora_pos::receiver::Request]) -> Vec<(String, serde_json::Value)> {
    requests.iter().map(|r| (r.event(), r.data())).collect()
}

/// A fresh SQLite file (WAL) in the temp directory, with the POS tables.
pub async fn sqlite_file() -> (DatabaseConnection, String) {
    let path = std::env::temp_dir().join(format!(
        "vendora-test-{}-{}.sqlite",
        std::process::id(),
        uuid_like()
    ));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let db = db::connect(&url).await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    (db, url)
}

pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{t:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A fresh PostgreSQL database (created through `DATABASE_URL`) with the POS tables. The
/// tests that need PostgreSQL are `#[ignore = "needs DATABASE_URL: …"]`: they run with
/// `cargo test -- --include-ignored`, which is what `bash .ci/run` does once it has
/// started PostgreSQL.
pub async fn postgres() -> (DatabaseConnection, String) {
    let url = postgres_database().await;
    let db = db::connect(&url).await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    (db, url)
}

/// A fresh, empty PostgreSQL database: its URL. Panics, saying what to set, without
/// `DATABASE_URL`: the tests that call it are ignored unless asked for.
pub async fn postgres_database() -> String {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        panic!(
            "DATABASE_URL is not set: this test needs PostgreSQL; set \
             DATABASE_URL=postgres://user:pass@127.0.0.1/db, or run bash .ci/run, which \
             installs and starts PostgreSQL and sets it"
        );
    };
    use sea_orm::ConnectionTrait;
    let admin = db::connect(&admin_url)
        .await
        .expect("DATABASE_URL does not connect");
    drop_stale_databases(&admin).await;
    let name = format!("vendora_t_{}", uuid_like().replace('-', "_"));
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap();
    format!("{base}/{name}")
}

/// Drops the databases of earlier test runs, once per test binary: those `postgres()`
/// made more than an hour ago (their names carry their creation time; a test run takes
/// minutes, so none is still in use). Without this every run leaves its databases behind.
async fn drop_stale_databases(admin: &DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let Ok(rows) = admin
            .query_all_raw(sea_orm::Statement::from_string(
                admin.get_database_backend(),
                "SELECT datname FROM pg_database WHERE datname LIKE 'vendora\\_t\\_%'",
            ))
            .await
        else {
            return;
        };
        for row in rows {
            let Ok(name) = row.try_get::<String>("", "datname") else {
                continue;
            };
            let created = name
                .strip_prefix("vendora_t_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|hex| u128::from_str_radix(hex, 16).ok());
            if created.is_some_and(|t| now.saturating_sub(t) > 3_600 * 1_000_000_000) {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    })
    .await;
}

/// An outbox-mode observer on `db`, polling fast.
pub async fn outbox_observer(db: &DatabaseConnection, url: &str, retry: RetryPolicy) -> Observer {
    // Longer than a request may take (2 s), short enough for the crash test.
    outbox_observer_with_lease(db, url, retry, Duration::from_secs(3)).await
}

/// [`outbox_observer`] with its own lease.
pub async fn outbox_observer_with_lease(
    db: &DatabaseConnection,
    url: &str,
    retry: RetryPolicy,
    lease: Duration,
) -> Observer {
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_millis(50);
    options.lease = lease;
    Observer::builder(config(url))
        .retry(retry)
        .outbox_options(options)
        .build()
        .await
        .unwrap()
}

/// A configuration whose requests may take a minute: a slow answer is waited for, not cut
/// by the timeout and retried.
pub fn patient_config(url: &str) -> WebhookConfig {
    WebhookConfig::builder()
        .url(url)
        .secret(SECRET)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Retries for a receiver that is down for a while, then back: probes every 100 ms, and
/// attempts enough never to dead-letter.
pub fn retries_through_an_outage() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(10_000)
        .base_delay(Duration::from_millis(20))
        .max_delay(Duration::from_millis(300))
        .max_retry_after(Duration::from_secs(1))
        .probe_interval(Duration::from_millis(100))
}

/// An outbox-mode observer on `db` for a relay that stays busy: its requests may take up to
/// 60 s (lease 120 s), and it polls once an hour, so only its own writes and outcomes wake
/// it (on SQLite; a NOTIFY wakes every relay on PostgreSQL).
pub async fn relay_for_slow_requests(db: &DatabaseConnection, url: &str) -> Observer {
    let mut options = vendora_observe::OutboxOptions::new(db.clone());
    options.poll_interval = Duration::from_secs(3600);
    options.lease = Duration::from_secs(120);
    Observer::builder(patient_config(url))
        .outbox_options(options)
        .build()
        .await
        .unwrap()
}

/// Every delivered X-Webhook-Id is unique, `expected_events` arrived, and the product
/// events of each row arrived with strictly increasing stock (each write sets a higher one).
pub fn assert_complete_and_ordered(
    delivered: &[vendora_pos::receiver::Request],
    expected_events: usize,
) {
    use std::collections::{HashMap, HashSet};
    let ids: HashSet<&str> = delivered.iter().map(|r| r.id()).collect();
    assert_eq!(ids.len(), delivered.len(), "a duplicate delivery");
    assert_eq!(delivered.len(), expected_events);
    let mut last: HashMap<i64, i64> = HashMap::new();
    for r in delivered
        .iter()
        .filter(|r| r.event().starts_with("product:"))
    {
        let d = r.data();
        let (id, stock) = (d["id"].as_i64().unwrap(), d["stock"].as_i64().unwrap());
        if let Some(prev) = last.insert(id, stock) {
            assert!(stock > prev, "row {id}: stock {stock} arrived after {prev}");
        }
    }
}

/// A new product with the given name and stock.
pub fn product_am(name: &str, stock: i32) -> vendora_pos::entities::product::ActiveModel {
    use sea_orm::{ActiveValue::NotSet, Set};
    vendora_pos::entities::product::ActiveModel {
        id: NotSet,
        name: Set(name.to_owned()),
        price: Set(1.5),
        stock: Set(stock),
        category_id: Set(None),
        ..Default::default()
    }
}

/// Log lines written while the returned guard lives (this thread: use a current-thread
/// runtime), and a way to read them.
pub fn capture_logs() -> (tracing::subscriber::DefaultGuard, impl Fn() -> String) {
    capture_logs_at(tracing::Level::INFO)
}

/// [`capture_logs`] of events at `level` and above only: `Level::ERROR` is what
/// `tracing_subscriber::fmt::init()` shows with the `env-filter` feature and no `RUST_LOG`.
pub fn capture_logs_at(
    level: tracing::Level,
) -> (tracing::subscriber::DefaultGuard, impl Fn() -> String) {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // tracing caches whether a log statement is wanted the first time it runs. While only
    // one dispatcher exists besides the global one, it asks only the *running thread's*:
    // a concurrent test without a subscriber, reaching a statement first, would turn it
    // off for this test too. A second dispatcher, alive for the whole run, makes tracing
    // ask every live one (and then each thread's own at each statement).
    static KEEP_ASKING_ALL: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    KEEP_ASKING_ALL
        .get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::new()));

    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(level)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (guard, move || {
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    })
}

/// Writes one product through `observer`, waits until it is delivered and the observer is
/// idle, and returns every attempt the receiver saw; all attempts carry one X-Webhook-Id.
pub async fn one_write_attempts(
    observer: &Observer,
    receiver: &vendora_pos::receiver::Receiver,
    db: &DatabaseConnection,
) -> Vec<vendora_pos::receiver::Request> {
    use sea_orm::ActiveModelTrait;
    observer
        .scope(product_am("retry me", 1).insert(db))
        .await
        .unwrap();
    receiver.wait_delivered(1, WAIT).await;
    assert!(observer.flush(WAIT).await);
    let all = receiver.requests();
    assert!(
        all.iter().all(|r| r.id() == all[0].id()),
        "retries keep the X-Webhook-Id"
    );
    all
}

/// Waits for `cond` to hold, polling, or panics after `timeout` with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
pub struct Peer {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// The lines `wait_for` went past.
    pub skipped: std::cell::RefCell<Vec<String>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn spawn(mut cmd: std::process::Command) -> Peer {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer {
            child,
            lines,
            skipped: Default::default(),
        }
    }

    /// The next line for which `pick` gives a value, skipping others; panics after 30 s.
    pub fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            if let Some(v) = pick(&line) {
                return v;
            }
            self.skipped.borrow_mut().push(line);
        }
    }

    /// Whether a line for which `pick` holds has arrived, looking only at what is there now
    /// (the lines looked at are kept in `skipped`).
    pub fn has_printed(&self, pick: impl Fn(&str) -> bool) -> bool {
        if self.skipped.borrow().iter().any(|l| pick(l)) {
            return true;
        }
        while let Ok(line) = self.lines.try_recv() {
            let hit = pick(&line);
            self.skipped.borrow_mut().push(line);
            if hit {
                return true;
            }
        }
        false
    }

    /// The process's resident memory now, in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// The directory of the Node.js peers (tests/node), their npm packages installed from the
/// lockfile when missing. Panics saying what to install without node and npm: the tests
/// that call it are ignored unless asked for.
pub fn node_peers() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok(),
        "node is not on PATH: this test needs Node.js and npm; install them, or run \
         bash .ci/run, which installs them"
    );
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if !dir.join("node_modules/socket.io-client").exists()
            || !dir.join("node_modules/express").exists()
        {
            let status = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .status()
                .expect("npm is needed to install the Node peers");
            assert!(status.success(), "npm ci failed in tests/node");
        }
    });
    dir
}

/// An app: the socket.io v4 client under node, connected to `base` with `token`, printing
/// the events it receives. Returns once it printed "connected" or "connect_error …" (the
/// line is returned).
pub fn app(base: &str, token: Option<&str>, mode: &str, origin: Option<&str>) -> (Peer, String) {
    let dir = node_peers();
    let mut cmd = std::process::Command::new("node");
    cmd.arg(dir.join("client.js"))
        .arg(base)
        .arg(token.unwrap_or(""))
        .arg(mode);
    if let Some(origin) = origin {
        cmd.env("ORIGIN", origin);
    }
    let peer = Peer::spawn(cmd);
    let first = peer.wait_for("the app to connect or be refused", |l| {
        (l == "connected" || l.starts_with("connect_error")).then(|| l.to_owned())
    });
    (peer, first)
}

/// [`app`] asking for the live page's records (`monitor: true`) with `token`.
pub fn app_monitor(base: &str, token: &str) -> (Peer, String) {
    let dir = node_peers();
    let mut cmd = std::process::Command::new("node");
    cmd.arg(dir.join("client.js"))
        .arg(base)
        .arg(token)
        .arg("once")
        .env("MONITOR", "1");
    let peer = Peer::spawn(cmd);
    let first = peer.wait_for("the page to connect or be refused", |l| {
        (l == "connected" || l.starts_with("connect_error")).then(|| l.to_owned())
    });
    (peer, first)
}

/// A fresh directory of the test's own under the temp directory.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vendora-{name}-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A GET of `path` to 127.0.0.1:`port` from the local address `from` (127.0.0.2: another
/// client on the same machine), with `headers`: what came back (up to 4 KiB, or 5 s).
pub async fn get_from(from: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// The next event an app printed: `(event, data)`.
pub fn next_event(app: &Peer) -> (String, serde_json::Value) {
    app.wait_for("an event", |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        Some((v["event"].as_str()?.to_owned(), v["data"].clone()))
    })
}

/// A port of 127.0.0.1 nothing listens on (bound, then closed).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A Redis server of the test's own (Debian's redis-server) on a free port; stopped on
/// drop. Panics saying what to install without it: the tests that call it are ignored
/// unless asked for.
pub struct Redis {
    pub url: String,
    pub port: u16,
    /// Its arguments beyond the port, to start it again the same way.
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Redis {
    /// Runs a command with `redis-cli`; its answer.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (from redis-tools, which redis-server brings) runs");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Kills it at once (SIGKILL): what a crash or an OOM kill does.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same arguments (and data directory).
    pub fn start(&mut self) {
        self.kill();
        self.child = Some(spawn_redis(self.port, &self.args));
    }
}

fn spawn_redis(port: u16, args: &[String]) -> std::process::Child {
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "redis-server cannot start ({e}): this test needs Redis; apt-get install \
                 redis-server, or run bash .ci/run, which installs it"
            )
        });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A Redis server of the test's own, in memory only.
pub fn redis() -> Redis {
    redis_with(&["--save", "", "--appendonly", "no"])
}

/// A Redis server of the test's own that keeps what it acknowledged across a kill: an
/// append-only file synced at every write, in a directory of its own.
pub fn durable_redis() -> Redis {
    let dir = temp_dir("redis");
    redis_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.to_str().unwrap(),
    ])
}

/// A Redis server of the test's own with these arguments beyond its port.
pub fn redis_with(args: &[&str]) -> Redis {
    let port = free_port();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let child = spawn_redis(port, &args);
    Redis {
        url: format!("redis://127.0.0.1:{port}"),
        port,
        args,
        child: Some(child),
    }
}

/// The WebSocket server (vendora-observe-server's program, built here as
/// `server-under-test`) as a process, configured by `env` (WEBHOOK_SECRET, APP_TOKENS, …) on
/// a port the system picks as it binds (`PORT=0`: no other process can take it between a
/// probe and the bind), in an empty working directory (no stray `.env`). Returns it once it
/// listens, with its base URL.
pub fn server(env: &[(&str, &str)]) -> (Peer, String) {
    server_on(0, env)
}

/// The port of a base URL such as `http://127.0.0.1:40123`.
pub fn port_of(base: &str) -> u16 {
    base.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {base}"))
}

/// [`server`] on a given port (a restart on the address a first start was given).
pub fn server_on(port: u16, env: &[(&str, &str)]) -> (Peer, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_server-under-test"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", port.to_string())
        .current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let peer = Peer::spawn(cmd);
    let base = peer.wait_for("the server to listen", |l| {
        l.split_once("listening on ")
            .map(|(_, url)| url.trim().to_owned())
    });
    (peer, base)
}

/// The headers the sender signs a body with (Standard Webhooks and legacy), under `id`.
pub fn signed_headers(secret: &str, id: &str, body: &[u8]) -> Vec<(String, String)> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    vec![
        ("Content-Type".into(), "application/json".into()),
        (
            "X-Webhook-Signature".into(),
            vendora_observe::sign(secret.as_bytes(), body),
        ),
        ("X-Webhook-Id".into(), id.into()),
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            vendora_observe::signature::standard_signature(secret.as_bytes(), id, ts, body),
        ),
    ]
}

/// A POST of `body` signed as the sender signs it: the status.
pub async fn signed_post(url: &str, secret: &str, id: &str, body: &[u8]) -> u16 {
    let headers = signed_headers(secret, id, body);
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    raw_post(url, &refs, body).await
}

/// An app as the product ships it: socket.io-client through the apps' module
/// (tests/node/app.mjs), printing what happens as JSON lines. Lines of another kind than the
/// one waited for are kept, in order, for the next wait: none is lost.
pub struct App {
    pub peer: Peer,
    pending: std::cell::RefCell<std::collections::VecDeque<serde_json::Value>>,
}

/// One event an [`App`] received: name, data, and the meta (`id`, `offset`, `epoch`).
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    pub event: String,
    pub data: serde_json::Value,
    pub meta: serde_json::Value,
}

impl App {
    /// Connects to `base` with `env` (TOKEN, TOKEN_FILE, TRANSPORT, ORIGIN).
    pub fn start(base: &str, env: &[(&str, &str)]) -> App {
        let dir = node_peers();
        let mut cmd = std::process::Command::new("node");
        cmd.arg(dir.join("app.mjs"))
            .env("URL", base)
            .stdin(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        App {
            peer: Peer::spawn(cmd),
            pending: Default::default(),
        }
    }

    /// The next line of `kind`; lines of other kinds before it are kept for later.
    pub fn next_of(&self, kind: &str) -> serde_json::Value {
        self.next_where(&format!("the app's next {kind}"), |v| v["kind"] == kind)
    }

    /// The next line for which `want` holds; others before it are kept for later.
    pub fn next_where(
        &self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut pending = self.pending.borrow_mut();
        if let Some(i) = pending.iter().position(&want) {
            return pending.remove(i).expect("found");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; meanwhile: {pending:?}"
            );
            let v = self
                .peer
                .wait_for(what, |l| serde_json::from_str::<serde_json::Value>(l).ok());
            if want(&v) {
                return v;
            }
            pending.push_back(v);
        }
    }

    /// The lines kept for later waits.
    pub fn pending_lines(&self) -> Vec<serde_json::Value> {
        self.pending.borrow().iter().cloned().collect()
    }

    /// The next `status` line with this state.
    pub fn status(&self, state: &str) -> serde_json::Value {
        self.next_where(&format!("the app's status {state}"), |v| {
            v["kind"] == "status" && v["state"] == state
        })
    }

    /// Waits for `vendora:ready`: `(recovered, offset, epoch)`.
    pub fn ready(&self) -> serde_json::Value {
        self.next_of("ready")
    }

    /// The next event received.
    pub fn event(&self) -> Got {
        let v = self.next_of("event");
        Got {
            event: v["event"].as_str().unwrap_or_default().to_owned(),
            data: v["data"].clone(),
            meta: v["meta"].clone(),
        }
    }

    /// The next `n` events.
    pub fn events(&self, n: usize) -> Vec<Got> {
        (0..n).map(|_| self.event()).collect()
    }

    /// The lines that arrive within `within`, kept for later waits too (for "nothing
    /// more came", or "no duplicate came").
    pub fn lines_within(&self, within: Duration) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + within;
        let mut got = Vec::new();
        while let Ok(line) = self
            .peer
            .lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                got.push(v.clone());
                self.pending.borrow_mut().push_back(v);
            }
        }
        got
    }
}

/// A TCP proxy on 127.0.0.1 to `target`, which a test can cut: every connection through it
/// closed and new ones refused (a phone losing its Wi-Fi), then restored, to the same
/// target or another (the load balancer sending the app to another server).
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let target = std::sync::Arc::new(std::sync::Mutex::new(Self::host(target)));
        let to = target.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = std::sync::Arc::new(cut);
        let watch = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *watch.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut stop = watch.subscribe();
                let target = to.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            cut,
            target,
            task,
        }
    }

    fn host(url: &str) -> String {
        url.strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/')
            .to_owned()
    }

    /// Where new connections go from now on.
    pub fn point_to(&self, target: &str) {
        *self.target.lock().unwrap() = Self::host(target);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        // `send` would leave the value unchanged without a receiver (no connection open).
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// A raw HTTP/1.1 POST returning the status, through a plain TCP exchange so that nothing
/// is signed for us.
pub async fn raw_post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    let answer = raw_post_answer(url, headers, body).await;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// [`raw_post`] with owned headers (as [`signed_headers`] makes them): the whole answer.
pub async fn post_answer(url: &str, headers: &[(String, String)], body: &[u8]) -> String {
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    raw_post_answer(url, &refs, body).await
}

async fn raw_post_answer(url: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await; // the server may answer before reading it all
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}
