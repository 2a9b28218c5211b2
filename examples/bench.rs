//! Benchmarks, side by side in one run: what observing costs a write, how fast events
//! arrive, memory under a burst, and compile time. Prints every figure as it is measured,
//! then writes `BENCHMARKS.md` and `benchmarks-latency.svg`. Asserts nothing.
//!
//! ```text
//! cargo run --release --example bench            # DATABASE_URL=postgres://… adds PostgreSQL
//! cargo run --release --example bench -- --quick # fewer iterations
//! cargo run --release --example bench -- --delivery-only [direct] [sqlite] [postgres] [rust] [node]
//! ```
//! With `--delivery-only`, `BENCH_CASE="causal, 8 writer tasks"` runs one case and
//! `BENCH_CASE=latency` the commit-to-received latency instead of the drains,
//! `BENCH_WRITES=30000` makes the drains longer (for a profiler, or steadier figures) and
//! `BENCH_BATCH=512` and `BENCH_MAX_BATCH=4096` set the outbox's `OutboxOptions::batch` and
//! `max_batch` (defaults 128 and 2,048); `BENCH_WAL=1` puts the SQLite outbox file in WAL
//! journal mode (SQLite's default is a rollback journal). For the latency rows,
//! `BENCH_LATENCY_MODE="outbox SQLite WAL"` runs one mode, `BENCH_SLOW=0,64,64@100` other
//! slow rows (`@`: each updated every so many ms; every 1,000 without) and
//! `BENCH_SLOW_FAST=1` answers the slow rows at once (their writes' load without their
//! slowness).
//!
//! The delivery-rate comparison needs `wrk` (Debian: `apt-get install wrk`), and node with
//! npm for the Node socket.io server of `tests/node`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, ActiveValue::Unchanged, DatabaseConnection, Set,
    TransactionTrait,
};
use tokio::sync::watch;
use vendora_observe::{Observer, Order, OutboxOptions, RetryPolicy, WebhookConfig, WebhookService};
use vendora_pos::db;
use vendora_pos::receiver::{Blackhole, closed_port_url};

const SECRET: &str = "bench-secret";

/// The same table three ways: observed by the derive, not observed, and the original
/// design's observer that awaits the POST inside the hook.
mod observed {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
    #[sea_orm(table_name = "bench_observed")]
    #[observe(event = "product", watch = "stock")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        pub price: f64,
        pub stock: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod plain {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
    #[sea_orm(table_name = "bench_plain")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        pub price: f64,
        pub stock: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

mod inline {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
    #[sea_orm(table_name = "bench_inline")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        pub price: f64,
        pub stock: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    /// The Laravel design: the observer posts inline and waits for the answer.
    #[vendora_observe::async_trait]
    impl ActiveModelBehavior for ActiveModel {
        async fn after_save<C>(model: Model, _db: &C, insert: bool) -> Result<Model, DbErr>
        where
            C: ConnectionTrait,
        {
            if let Some(service) = super::INLINE.get() {
                let event = if insert {
                    "product:created"
                } else {
                    "product:updated"
                };
                service.dispatch(event, &model).await;
            }
            Ok(model)
        }
    }
}

static INLINE: OnceLock<WebhookService> = OnceLock::new();

// ---------------------------------------------------------------------------------------
// A counting receiver with a gate, so that delivery can be measured from a full queue.

#[derive(Default)]
struct Counter {
    received: AtomicU64,
    /// Record arrival times (latency phase only: the rate phase, ours and wrk's, does the
    /// same work per request: verify and count).
    record: std::sync::atomic::AtomicBool,
    /// Arrival by row id, in ms since the epoch (the Node server's clock too).
    arrivals: Mutex<HashMap<i64, f64>>,
}

/// How long both receivers take to answer an event of a row named `slow-row…` (the
/// latency rows with slow rows beside the measured ones).
const SLOW_ANSWER: Duration = Duration::from_secs(2);

/// Whether the Rust receiver answers slow rows slowly (turned off to drain them after a
/// latency run).
static SLOW_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

struct Sink {
    addr: SocketAddr,
    counter: Arc<Counter>,
    gate: watch::Sender<bool>,
}

async fn sink_handler(
    State((counter, gate)): State<(Arc<Counter>, watch::Receiver<bool>)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut gate = gate;
    let _ = gate.wait_for(|open| *open).await;
    let sig = headers
        .get("x-webhook-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !vendora_observe::verify(SECRET.as_bytes(), &body, sig) {
        return StatusCode::UNAUTHORIZED;
    }
    let now = unix_ms();
    if SLOW_ON.load(Ordering::Relaxed) && body.windows(8).any(|w| w == b"slow-row") {
        tokio::time::sleep(SLOW_ANSWER).await;
        return StatusCode::OK;
    }
    counter.received.fetch_add(1, Ordering::Relaxed);
    // `"id":N` of full-model events, for commit-to-received latency.
    if !counter.record.load(Ordering::Relaxed) {
        return StatusCode::OK;
    }
    if let Some(pos) = body.windows(5).position(|w| w == b"\"id\":") {
        let digits: String = body[pos + 5..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .map(|b| *b as char)
            .collect();
        if let Ok(id) = digits.parse::<i64>() {
            counter.arrivals.lock().unwrap().entry(id).or_insert(now);
        }
    }
    StatusCode::OK
}

impl Sink {
    /// The receiver runs on its own runtime, on threads named `sink-*`, so that its CPU
    /// time can be told apart from the sender's (see [`Cpu`]). It lives as long as the bench.
    async fn start() -> Sink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = Arc::new(Counter::default());
        let (gate, rx) = watch::channel(true);
        let app = Router::new()
            .fallback(sink_handler)
            .with_state((counter.clone(), rx));
        std::thread::Builder::new()
            .name("sink-main".into())
            .spawn(move || {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("sink-worker")
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                        let _ = axum::serve(listener, app).await;
                    });
            })
            .unwrap();
        Sink {
            addr,
            counter,
            gate,
        }
    }
    fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }
    fn received(&self) -> u64 {
        self.counter.received.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------
// Measurement helpers.

/// CPU time read from /proc, in clock ticks: the receiver's threads (`sink-*`), this whole
/// process, and the whole machine (busy time over all cores). On two shared cores a sender
/// that spends more CPU per request leaves less for the receiver: these say where it went.
#[derive(Clone, Copy, Default)]
struct Cpu {
    sink: u64,
    process: u64,
    machine: u64,
}

/// Microseconds of CPU per event, split by who spent them.
#[derive(Clone, Copy)]
struct CpuPerEvent {
    /// The receiver (the sink's threads).
    receiver: f64,
    /// The rest of this process: observer, lanes or relay, reqwest, in-process SQLite.
    sender: f64,
    /// Other processes: PostgreSQL, or `wrk` itself.
    others: f64,
}

fn ticks_of_stat(stat: &str) -> u64 {
    // Fields after the parenthesised name: state is 3rd, utime 14th, stime 15th.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

impl Cpu {
    fn now() -> Cpu {
        let process =
            ticks_of_stat(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
        let mut sink = 0;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                if stat.contains("(sink-") {
                    sink += ticks_of_stat(&stat);
                }
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_owned();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: busy = all but idle, iowait
                Some(v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?)
            })
            .unwrap_or(0);
        Cpu {
            sink,
            process,
            machine,
        }
    }

    /// Per event since `before`, for `events` events.
    fn per_event(before: Cpu, events: u64) -> CpuPerEvent {
        static TICK_US: OnceLock<f64> = OnceLock::new();
        let tick_us = *TICK_US.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map(|hz| 1e6 / hz)
                .unwrap_or(1e4)
        });
        let after = Cpu::now();
        let per = |ticks: u64| ticks as f64 * tick_us / events.max(1) as f64;
        let sink = after.sink.saturating_sub(before.sink);
        let process = after.process.saturating_sub(before.process);
        let machine = after.machine.saturating_sub(before.machine);
        CpuPerEvent {
            receiver: per(sink),
            sender: per(process.saturating_sub(sink)),
            others: per(machine.saturating_sub(process)),
        }
    }
}

impl std::fmt::Display for CpuPerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} / {:.1} / {:.1} µs",
            self.sender, self.receiver, self.others
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Summary {
    p50: Duration,
    p99: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Summary {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

struct OverheadRow {
    backend: &'static str,
    case: String,
    op: &'static str,
    base: Summary,
    observed: Summary,
}

impl OverheadRow {
    fn ratio(&self) -> f64 {
        self.observed.p50.as_secs_f64() / self.base.p50.as_secs_f64()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Insert,
    Update,
    /// An update that leaves the watched column alone: no old-value read.
    UpdateName,
    InsertInTxn,
    /// A SELECT of the row by its key, then `Update`: the floor of a watched-column update,
    /// whose old value must be read before the write.
    SelectThenUpdate,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::UpdateName => "update, unwatched column",
            Op::InsertInTxn => "insert in txn",
            Op::SelectThenUpdate => "SELECT by key, then update",
        }
    }
}

/// One timed write of `op` on the entity module `$m`.
macro_rules! timed_write {
    ($m:ident, $db:expr, $op:expr, $i:expr, $id:expr) => {{
        let (db, op, i, id) = ($db, $op, $i, $id);
        let new = || $m::ActiveModel {
            id: NotSet,
            name: Set(format!("p{i}")),
            price: Set(1.5),
            stock: Set(i),
        };
        let started = Instant::now();
        match op {
            Op::Insert => {
                new().insert(db).await.unwrap();
            }
            Op::Update => {
                $m::ActiveModel {
                    id: Unchanged(id),
                    name: NotSet,
                    price: NotSet,
                    stock: Set(i),
                }
                .update(db)
                .await
                .unwrap();
            }
            Op::UpdateName => {
                $m::ActiveModel {
                    id: Unchanged(id),
                    name: Set(format!("n{i}")),
                    price: NotSet,
                    stock: NotSet,
                }
                .update(db)
                .await
                .unwrap();
            }
            Op::InsertInTxn => {
                let txn = db.begin().await.unwrap();
                new().insert(&txn).await.unwrap();
                txn.commit().await.unwrap();
            }
            Op::SelectThenUpdate => {
                <$m::Entity as sea_orm::EntityTrait>::find_by_id(id)
                    .one(db)
                    .await
                    .unwrap();
                $m::ActiveModel {
                    id: Unchanged(id),
                    name: NotSet,
                    price: NotSet,
                    stock: Set(i),
                }
                .update(db)
                .await
                .unwrap();
            }
        }
        started.elapsed()
    }};
}

async fn write_plain(db: &DatabaseConnection, op: Op, i: i32, id: i32) -> Duration {
    timed_write!(plain, db, op, i, id)
}

async fn write_observed(db: &DatabaseConnection, op: Op, i: i32, id: i32) -> Duration {
    timed_write!(observed, db, op, i, id)
}

/// The original design never wrapped its writes in transactions.
async fn write_inline(db: &DatabaseConnection, op: Op, i: i32, id: i32) -> Duration {
    let op = if op == Op::InsertInTxn {
        Op::Insert
    } else {
        op
    };
    timed_write!(inline, db, op, i, id)
}

/// Runs `a` and `b` `n` times each, interleaved (A, B, A, B, …) so that both see the same
/// machine, after a first tenth that warms up.
async fn interleaved(
    n: usize,
    mut a: impl AsyncFnMut(i32) -> Duration,
    mut b: impl AsyncFnMut(i32) -> Duration,
) -> (Summary, Summary) {
    let (mut sa, mut sb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..(n + n / 10) as i32 {
        let (ta, tb) = (a(i).await, b(i).await);
        if i as usize >= n / 10 {
            sa.push(ta);
            sb.push(tb);
        }
    }
    (summarize(sa), summarize(sb))
}

/// The old-value read alone: `n` plain updates interleaved with `n` plain updates that
/// first SELECT the row, as the derive does for a watched column.
async fn select_floor(db: &DatabaseConnection, n: usize) -> (Summary, Summary) {
    interleaved(
        n,
        async |i| write_plain(db, Op::Update, i, 1).await,
        async |i| write_plain(db, Op::SelectThenUpdate, i, 1).await,
    )
    .await
}

/// `n` plain and `n` observed writes of `op`, interleaved. Rows to update: id 1 of each
/// table exists.
async fn side_by_side(
    db: &DatabaseConnection,
    observer: Option<&Observer>,
    op: Op,
    n: usize,
    inline_baseline: bool,
) -> (Summary, Summary) {
    interleaved(
        n,
        async |i| write_plain(db, op, i, 1).await,
        async |i| {
            if inline_baseline {
                write_inline(db, op, i, 1).await
            } else {
                match observer {
                    Some(o) => o.scope(write_observed(db, op, i, 1)).await,
                    None => write_observed(db, op, i, 1).await,
                }
            }
        },
    )
    .await
}

fn config(url: &str) -> WebhookConfig {
    WebhookConfig::builder()
        .url(url)
        .secret(SECRET)
        .build()
        .unwrap()
}

async fn prepare(db: &DatabaseConnection) {
    use sea_orm::{ConnectionTrait, EntityTrait};
    for drop in [
        "bench_observed",
        "bench_plain",
        "bench_inline",
        vendora_observe::outbox::TABLE,
    ] {
        let _ = db
            .execute_unprepared(&format!("DROP TABLE IF EXISTS {drop}"))
            .await;
    }
    db::create_table(db, observed::Entity).await.unwrap();
    db::create_table(db, plain::Entity).await.unwrap();
    db::create_table(db, inline::Entity).await.unwrap();
    // Row 1 of each, for updates.
    vendora_observe::quietly(async {
        write_plain(db, Op::Insert, 0, 0).await;
        write_observed(db, Op::Insert, 0, 0).await;
    })
    .await;
    inline::ActiveModel {
        id: NotSet,
        name: Set("p".into()),
        price: Set(1.0),
        stock: Set(0),
    }
    .insert(db)
    .await
    .unwrap();
    let _ = observed::Entity::find().all(db).await;
}

async fn overhead(backend: &'static str, url: &str, n: usize, rows: &mut Vec<OverheadRow>) {
    let db = db::connect(url).await.unwrap();
    if url.starts_with("sqlite://") {
        use sea_orm::ConnectionTrait;
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .unwrap();
    }
    prepare(&db).await;
    let sink = Sink::start().await;
    let hole = Blackhole::start().await.unwrap();
    let down = closed_port_url().await;

    let mut push = |case: &str, op: Op, (base, observed): (Summary, Summary)| {
        let row = OverheadRow {
            backend,
            case: case.to_owned(),
            op: op.name(),
            base,
            observed,
        };
        println!(
            "  {backend:<15} {case:<44} {:<26} plain p50 {:>7} p99 {:>7} | observed p50 {:>7} p99 {:>7} | {:.2}x",
            row.op,
            us(base.p50),
            us(base.p99),
            us(observed.p50),
            us(observed.p99),
            row.ratio()
        );
        rows.push(row);
    };

    for (label, target) in [
        ("direct, receiver up", sink.url()),
        ("direct, receiver blackholed", hole.url()),
        ("direct, receiver down", down.clone()),
    ] {
        let observer = Observer::builder(config(&target))
            .retry(RetryPolicy::default())
            .queue_capacity(100_000)
            .build()
            .await
            .unwrap();
        let ops: &[Op] = if label == "direct, receiver up" {
            &[Op::Insert, Op::Update, Op::UpdateName]
        } else {
            &[Op::Insert, Op::Update]
        };
        for &op in ops {
            push(
                label,
                op,
                side_by_side(&db, Some(&observer), op, n, false).await,
            );
        }
        observer.shutdown(Duration::from_millis(200)).await;
    }
    // What the update rows above pay for the watched column, without the observer.
    push(
        "unobserved: the old-value read alone",
        Op::SelectThenUpdate,
        select_floor(&db, n).await,
    );
    // The original design: await the POST inside the hook.
    for op in [Op::Insert, Op::Update] {
        push(
            "inline POST in the hook (original)",
            op,
            side_by_side(&db, None, op, n, true).await,
        );
    }
    if !url.contains("memory") {
        // Receiver up first: the other two leave undelivered rows behind, which the next
        // relay then keeps failing to send while the writes are measured.
        for (receiver, target) in [
            ("up", sink.url()),
            ("blackholed", hole.url()),
            ("down", down.clone()),
        ] {
            let mut options = OutboxOptions::new(db.clone());
            options.poll_interval = Duration::from_millis(100);
            let observer = Observer::builder(config(&target))
                .outbox_options(options)
                .build()
                .await
                .unwrap();
            let ops: &[Op] = if receiver == "up" {
                &[Op::Insert, Op::Update]
            } else {
                &[Op::Insert]
            };
            for &op in ops {
                push(
                    &format!("outbox, autocommit, receiver {receiver}"),
                    op,
                    side_by_side(&db, Some(&observer), op, n, false).await,
                );
            }
            push(
                &format!("outbox, in a transaction, receiver {receiver}"),
                Op::InsertInTxn,
                side_by_side(&db, Some(&observer), Op::InsertInTxn, n, false).await,
            );
            if receiver == "up" && !observer.flush(Duration::from_secs(60)).await {
                eprintln!("  (events still pending after 60 s)");
            }
            observer.shutdown(Duration::from_millis(500)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Delivery: drain rates beside wrk, hot rows vs distinct rows, ordering modes, latency.

/// The Node.js WebSocket server of `tests/node` (`server.js`, npm `socket.io`), started with
/// its benchmark gate (`GATED=1`). `None` without node or its npm packages.
struct NodeServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeServer {
    fn start() -> Option<NodeServer> {
        use std::io::BufRead;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
        if !dir.join("node_modules/socket.io").exists() {
            let ok = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
        }
        let mut child = std::process::Command::new("node")
            .arg(dir.join("server.js"))
            .env("WEBHOOK_SECRET", SECRET)
            .env("GATED", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take()?)
            .read_line(&mut line)
            .ok()?;
        let port: u16 = line.trim().strip_prefix("PORT ")?.parse().ok()?;
        Some(NodeServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    /// One plain HTTP/1.1 exchange with the server's control endpoints.
    async fn control(&self, method: &str, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer).await;
        answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

/// The three delivery set-ups: direct on SQLite in memory, outbox on a SQLite file, and
/// outbox on PostgreSQL when `DATABASE_URL` names one.
fn all_modes(file: &std::path::Path, pg: Option<&str>) -> Vec<Mode> {
    let mut modes = vec![
        Mode {
            name: "direct",
            outbox: None,
        },
        Mode {
            name: "outbox SQLite file",
            outbox: Some(format!("sqlite://{}?mode=rwc", file.display())),
        },
    ];
    if let Some(url) = pg.filter(|u| u.starts_with("postgres")) {
        modes.push(Mode {
            name: "outbox PostgreSQL",
            outbox: Some(url.to_owned()),
        });
    }
    modes
}

/// The latency rows' set-ups: [`all_modes`], and the SQLite file in WAL mode beside it
/// (a file of its own: WAL mode stays with the file).
fn latency_modes(file: &std::path::Path, pg: Option<&str>) -> Vec<Mode> {
    let mut modes = all_modes(file, pg);
    let wal = file.with_extension("wal.sqlite");
    modes.insert(
        2,
        Mode {
            name: "outbox SQLite WAL",
            outbox: Some(format!("sqlite://{}?mode=rwc", wal.display())),
        },
    );
    modes
}

/// Where deliveries go.
enum Target {
    Rust(Sink),
    Node(NodeServer),
}

impl Target {
    /// `"rust"` or `"node"`; `None` when node or its packages are missing.
    async fn start(which: &str) -> Option<Target> {
        match which {
            "rust" => Some(Target::Rust(Sink::start().await)),
            _ => NodeServer::start().map(Target::Node),
        }
    }

    /// From now on, each row's first arrival is recorded (those before are forgotten).
    async fn record_arrivals(&self) {
        match self {
            Target::Rust(s) => {
                s.counter.arrivals.lock().unwrap().clear();
                s.counter.record.store(true, Ordering::Relaxed);
            }
            Target::Node(n) => {
                n.control("POST", "/__arrivals/reset").await;
            }
        }
    }

    /// Whether slow rows are answered after [`SLOW_ANSWER`] (or at once).
    async fn slow_rows_slow(&self, on: bool) {
        match self {
            Target::Rust(_) => SLOW_ON.store(on, Ordering::Relaxed),
            Target::Node(n) => {
                let path = if on { "/__slow/on" } else { "/__slow/off" };
                n.control("POST", path).await;
            }
        }
    }

    /// Each row's first arrival since [`Target::record_arrivals`], in ms since the epoch.
    async fn arrivals(&self) -> HashMap<i64, f64> {
        match self {
            Target::Rust(s) => s.counter.arrivals.lock().unwrap().clone(),
            Target::Node(n) => {
                serde_json::from_str::<HashMap<String, f64>>(&n.control("GET", "/__arrivals").await)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(id, at)| Some((id.parse().ok()?, at)))
                    .collect()
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Rust(_) => "Rust receiver",
            Target::Node(_) => "Node socket.io server",
        }
    }

    fn url(&self) -> String {
        match self {
            Target::Rust(s) => s.url(),
            Target::Node(n) => format!("http://{}/webhook", n.addr),
        }
    }

    async fn gate(&self, open: bool) {
        match self {
            Target::Rust(s) => {
                s.gate.send_replace(open);
            }
            Target::Node(n) => {
                let path = if open {
                    "/__gate/open"
                } else {
                    "/__gate/close"
                };
                n.control("POST", path).await;
            }
        }
    }

    async fn received(&self) -> u64 {
        match self {
            Target::Rust(s) => s.received(),
            Target::Node(n) => n.control("GET", "/__count").await.parse().unwrap_or(0),
        }
    }

    async fn wait_received(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let pause = match self {
            Target::Rust(_) => Duration::from_micros(200),
            Target::Node(_) => Duration::from_millis(2),
        };
        while self.received().await < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
        }
        true
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Every write updates its own row.
    Distinct,
    /// Every write updates one of ten rows: a best seller's backlog.
    Hot,
}

#[derive(Clone)]
struct Mode {
    name: &'static str,
    /// `None`: direct mode on SQLite in memory; else outbox mode on this database.
    outbox: Option<String>,
}

struct DrainRow {
    target: &'static str,
    mode: &'static str,
    case: String,
    rate: f64,
    cpu: CpuPerEvent,
}

/// Writes `writes` updates of a watched column (two events each) from `writers` tasks, in
/// transactions of 100 writes in outbox mode, held back from the receiver; then releases
/// them and times the drain until the last event arrived. With [`Relay::StatementsAlone`]
/// (outbox modes), no relay starts: the relay's database work runs alone (claims of
/// `max_batch` rows, written
/// delivered, nothing sent), the ceiling the database sets.
async fn drain(
    target: &Target,
    mode: &Mode,
    (order, writers, shape, relay): (Order, usize, Shape, Relay),
    writes: usize,
) -> (f64, CpuPerEvent, u64) {
    let db = match &mode.outbox {
        None => db::connect("sqlite::memory:").await.unwrap(),
        // One connection for the writers: SQLite would refuse concurrent transactions that
        // read before writing, and on PostgreSQL the hot rows serialise them anyway.
        Some(url) => {
            let mut options = sea_orm::ConnectOptions::new(url.clone());
            options
                .sqlx_logging(false)
                .max_connections(if url.starts_with("sqlite") { 1 } else { 8 });
            sea_orm::Database::connect(options).await.unwrap()
        }
    };
    if std::env::var("BENCH_WAL").is_ok()
        && mode
            .outbox
            .as_deref()
            .is_some_and(|u| u.starts_with("sqlite"))
    {
        use sea_orm::ConnectionTrait;
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .unwrap();
    }
    prepare(&db).await;
    let rows = match shape {
        Shape::Distinct => writes,
        Shape::Hot => 10,
    };
    let mut ids = Vec::with_capacity(rows);
    vendora_observe::quietly(async {
        let txn = db.begin().await.unwrap();
        for i in 0..rows as i32 {
            let m = new_row(format!("d{i}"), 1.0, 0).insert(&txn).await.unwrap();
            ids.push(m.id);
        }
        txn.commit().await.unwrap();
    })
    .await;
    let events = writes as u64 * 2;
    let builder = || {
        Observer::builder(config(&target.url()))
            .order(order)
            .queue_capacity(writes * 4)
    };
    let outbox_options = |db: &DatabaseConnection| {
        let mut o = OutboxOptions::new(db.clone());
        o.poll_interval = Duration::from_millis(100);
        if let Some(b) = std::env::var("BENCH_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            o.batch = b;
        }
        if let Some(b) = std::env::var("BENCH_MAX_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            o.max_batch = b;
        }
        o
    };
    let writer = match &mode.outbox {
        None => builder().build().await.unwrap(),
        Some(_) => {
            // Writes only: its relay is stopped before anything is written.
            let o = builder()
                .outbox_options(outbox_options(&db))
                .build()
                .await
                .unwrap();
            o.shutdown(Duration::ZERO).await;
            o
        }
    };
    target.gate(false).await;
    let before = target.received().await;
    let per_writer = writes / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (db, ids, outbox) = (db.clone(), ids.clone(), mode.outbox.is_some());
        tasks.push(tokio::spawn(writer.scope(async move {
            let mut done = 0;
            while done < per_writer {
                let chunk = if outbox {
                    100.min(per_writer - done)
                } else {
                    1
                };
                let txn = db.begin().await.unwrap();
                let mut targets: Vec<i32> = (done..done + chunk)
                    .map(|j| match shape {
                        Shape::Distinct => ids[w * per_writer + j],
                        Shape::Hot => ids[(w + j) % 10],
                    })
                    .collect();
                // One lock order for every transaction: no deadlocks on hot rows.
                targets.sort_unstable();
                for (k, id) in targets.into_iter().enumerate() {
                    let am = observed::ActiveModel {
                        id: Unchanged(id),
                        stock: Set((w * per_writer + done + k + 1) as i32),
                        ..Default::default()
                    };
                    am.update(&txn).await.unwrap();
                }
                txn.commit().await.unwrap();
                done += chunk;
            }
        })));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let cpu_before = Cpu::now();
    let started = Instant::now();
    let mut reader = None;
    let relay = match &mode.outbox {
        None => {
            target.gate(true).await;
            None
        }
        Some(url) if relay == Relay::StatementsAlone => {
            let relay_db = db::connect(url).await.unwrap();
            let want = outbox_options(&relay_db).max_batch;
            let n = vendora_observe::__private::outbox_plan::drain_without_sending(&relay_db, want)
                .await
                .unwrap();
            let rate = events as f64 / started.elapsed().as_secs_f64();
            let cpu = Cpu::per_event(cpu_before, events);
            assert_eq!(
                n, events,
                "{}: the statements went through every row",
                mode.name
            );
            target.gate(true).await;
            writer.shutdown(Duration::from_secs(5)).await;
            use sea_orm::ConnectionTrait;
            let _ = db.execute_unprepared("DELETE FROM vendora_outbox").await;
            return (rate, cpu, events);
        }
        Some(url) if relay == Relay::ReadOnce => {
            target.gate(true).await;
            let relay_db = db::connect(url).await.unwrap();
            let direct = builder().build().await.unwrap();
            let want = outbox_options(&relay_db).max_batch;
            // On a worker thread, as a relay runs.
            let sender = direct.clone();
            reader = Some(tokio::spawn(async move {
                vendora_observe::__private::outbox_plan::send_without_writing(
                    &relay_db, &sender, want,
                )
                .await
                .unwrap()
            }));
            Some(direct)
        }
        Some(url) => {
            target.gate(true).await;
            let relay_db = db::connect(url).await.unwrap();
            Some(
                builder()
                    .outbox_options(outbox_options(&relay_db))
                    .build()
                    .await
                    .unwrap(),
            )
        }
    };
    let all = target
        .wait_received(before + events, Duration::from_secs(600))
        .await;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let cpu = Cpu::per_event(cpu_before, events);
    assert!(all, "{}: not everything arrived", mode.name);
    if let Some(reader) = reader {
        let read = reader.await.unwrap();
        assert_eq!(read, events, "{}: every row read once", mode.name);
    }
    writer.shutdown(Duration::from_secs(5)).await;
    if let Some(relay) = relay {
        relay.shutdown(Duration::from_secs(5)).await;
        use sea_orm::ConnectionTrait;
        let _ = db.execute_unprepared("DELETE FROM vendora_outbox").await;
    }
    (rate, cpu, events)
}

/// A new row of the observed table.
fn new_row(name: String, price: f64, stock: i32) -> observed::ActiveModel {
    observed::ActiveModel {
        id: NotSet,
        name: Set(name),
        price: Set(price),
        stock: Set(stock),
    }
}

/// The bench case (`--delivery-only`) that measures [`latency`] instead of drains.
const LATENCY: &str = "latency";

/// Slow rows beside the measured writes in a latency row: how many, and how often each is
/// updated.
#[derive(Clone, Copy, PartialEq)]
struct Slow {
    rows: usize,
    every: Duration,
}

impl Slow {
    /// `64` (updated every second) or `64@100` (every 100 ms), as `BENCH_SLOW` lists them.
    fn parse(s: &str) -> Option<Slow> {
        let (rows, every) = s.trim().split_once('@').unwrap_or((s.trim(), "1000"));
        Some(Slow {
            rows: rows.parse().ok()?,
            every: Duration::from_millis(every.parse().ok()?),
        })
    }

    fn label(&self) -> String {
        match self.rows {
            0 => "0".into(),
            n => format!("{n} every {}", ms(self.every)),
        }
    }
}

/// A latency row's load: its slow rows, and whether the measured writes ran in
/// transactions.
fn load_label(slow: Slow, txn: bool) -> String {
    if txn {
        format!("{}, writes in transactions", slow.label())
    } else {
        slow.label()
    }
}

/// The latency rows' slow rows: none; 8 and 64 each updated every second (their slowness);
/// 64 updated every 100 ms (their slowness under 640 more commits a second).
const SLOW_ROWS: [&str; 4] = ["0", "8", "64", "64@100"];

/// Commit-to-received latency: 1,000 inserts from one task 2 ms apart, from the write's
/// return to the event's arrival at `target`; and how long the 1,000 writes took. With
/// `slow` rows, as many tasks each update a row of their own meanwhile, whose events the
/// receiver answers after [`SLOW_ANSWER`] (the request timeout is 15 s): the measured
/// events should not notice. `in_transactions`: each measured write in a transaction of its
/// own (as the outbox asks), where this process's relay is woken before the commit.
async fn latency(
    target: &Target,
    mode: &Mode,
    slow: Slow,
    in_transactions: bool,
) -> (Summary, Duration) {
    let db = match &mode.outbox {
        None => db::connect("sqlite::memory:").await.unwrap(),
        Some(url) => db::connect(url).await.unwrap(),
    };
    // The WAL row: what a server application on SQLite runs (in SQLite's default rollback
    // journal every commit, the relay's lease included, waits for the disk).
    if mode.name.ends_with("WAL") {
        use sea_orm::ConnectionTrait;
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .unwrap();
    }
    prepare(&db).await;
    let config = WebhookConfig::builder()
        .url(target.url())
        .secret(SECRET)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let builder = Observer::builder(config);
    let observer = match &mode.outbox {
        None => builder.build().await.unwrap(),
        Some(_) => builder.outbox(db.clone()).build().await.unwrap(),
    };
    // BENCH_SLOW_FAST=1: the same rows and writes, answered at once (the load of their
    // writes alone, without the slowness).
    target
        .slow_rows_slow(std::env::var("BENCH_SLOW_FAST").is_err())
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut slow_tasks = Vec::new();
    for k in 0..slow.rows {
        let (db, stop) = (db.clone(), stop.clone());
        slow_tasks.push(tokio::spawn(observer.scope(async move {
            let row = new_row(format!("slow-row {k}"), 0.0, 0)
                .insert(&db)
                .await
                .unwrap();
            // Each row on a beat of its own (the k-th of `rows` through the period), as
            // independent clients would be: not all 64 at the same instant.
            let mut beat = tokio::time::interval_at(
                tokio::time::Instant::now() + slow.every.mul_f64((k + 1) as f64 / slow.rows as f64),
                slow.every,
            );
            let mut n = 0.0;
            while !stop.load(Ordering::Relaxed) {
                beat.tick().await;
                n += 1.0;
                let mut am = sea_orm::IntoActiveModel::into_active_model(row.clone());
                am.price = Set(n);
                let _ = am.update(&db).await;
            }
        })));
    }
    if slow.rows > 0 {
        // Every slow row's first request waits at the receiver before the measure starts.
        tokio::time::sleep(SLOW_ANSWER / 2).await;
    }
    target.record_arrivals().await;
    // BENCH_GAP_MS: another pause between the measured writes (2 ms).
    let gap = Duration::from_millis(
        std::env::var("BENCH_GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    );
    let mut commits = Vec::new();
    let started = Instant::now();
    observer
        .scope(async {
            for i in 0..1000 {
                let m = if in_transactions {
                    let txn = db.begin().await.unwrap();
                    let m = new_row(format!("l{i}"), 1.0, i).insert(&txn).await.unwrap();
                    txn.commit().await.unwrap();
                    m
                } else {
                    new_row(format!("l{i}"), 1.0, i).insert(&db).await.unwrap()
                };
                commits.push((m.id as i64, unix_ms()));
                tokio::time::sleep(gap).await;
            }
        })
        .await;
    let took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    let arrivals = loop {
        let arrivals = target.arrivals().await;
        if commits.iter().all(|(id, _)| arrivals.contains_key(id)) || Instant::now() > deadline {
            break arrivals;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let missing = commits
        .iter()
        .filter(|(id, _)| !arrivals.contains_key(id))
        .count();
    if missing > 0 {
        eprintln!("  ({missing} of the measured events had not arrived after 60 s)");
    }
    stop.store(true, Ordering::Relaxed);
    for task in slow_tasks {
        let _ = task.await;
    }
    // The slow rows' backlog drains once the receiver answers them at once.
    target.slow_rows_slow(false).await;
    if !observer.flush(Duration::from_secs(60)).await {
        eprintln!("  (the slow rows' events still pending after 60 s)");
    }
    observer.shutdown(Duration::from_secs(5)).await;
    target.slow_rows_slow(true).await;
    let summary = summarize(
        commits
            .iter()
            .filter_map(|(id, at)| {
                arrivals
                    .get(id)
                    .map(|r| Duration::from_secs_f64((r - at).max(0.0) / 1e3))
            })
            .collect(),
    );
    (summary, took)
}

/// One latency row: mode, slow rows, how long the measured writes took and p50/p99, with
/// the p99's ratio to the same mode's run without slow rows.
struct LatencyRow {
    target: &'static str,
    mode: &'static str,
    slow: Slow,
    /// The measured writes ran in transactions.
    txn: bool,
    took: Duration,
    l: Summary,
    ratio: Option<f64>,
}

async fn latency_rows(targets: &[&str], modes: &[Mode], slows: &[Slow]) -> Vec<LatencyRow> {
    let mut rows: Vec<LatencyRow> = Vec::new();
    for which in targets {
        let Some(target) = Target::start(which).await else {
            println!("  Node socket.io server: skipped (needs node and npm)");
            continue;
        };
        // A first run, not counted: a receiver just started (Node's JIT above all) answers
        // its first thousand requests more slowly than the rest.
        if let Some(mode) = modes.first() {
            latency(&target, mode, Slow::parse("0").unwrap(), false).await;
        }
        for mode in modes {
            // Without slow rows, outbox modes also measure writes in transactions.
            let runs = slows.iter().flat_map(|&slow| {
                let txn = slow.rows == 0 && mode.outbox.is_some();
                std::iter::once((slow, false)).chain(txn.then_some((slow, true)))
            });
            for (slow, txn) in runs {
                if mode.name == "outbox SQLite file" && slow.every < Duration::from_secs(1) {
                    // In the default journal, 640 more commits a second (each waiting for the
                    // disk) exceed what the database does here: the measured writes then
                    // took 2 to 4 minutes instead of 7 seconds (measured 2026-12-06).
                    println!(
                        "  {:<22} {:<18} slow rows {:<16} skipped: more commits than the \
                         default journal takes here (WAL does)",
                        target.name(),
                        mode.name,
                        slow.label()
                    );
                    continue;
                }
                let (l, took) = latency(&target, mode, slow, txn).await;
                let ratio = rows
                    .iter()
                    .find(|r| {
                        r.target == target.name()
                            && r.mode == mode.name
                            && r.slow.rows == 0
                            && !r.txn
                    })
                    .filter(|_| slow.rows > 0)
                    .map(|r| l.p99.as_secs_f64() / r.l.p99.as_secs_f64());
                println!(
                    "  {:<22} {:<18} slow rows {:<16} writes took {:>6}: p50 {} p99 {}{}",
                    target.name(),
                    mode.name,
                    load_label(slow, txn),
                    ms(took),
                    us(l.p50),
                    us(l.p99),
                    ratio.map_or(String::new(), |r| format!("  (p99 {r:.2}× without)"))
                );
                rows.push(LatencyRow {
                    target: target.name(),
                    mode: mode.name,
                    slow,
                    txn,
                    took,
                    l,
                    ratio,
                });
            }
        }
    }
    rows
}

/// After an outage of `down`: when the first of one task's 200 events (its backlog, in
/// causal order) is accepted, from the moment the receiver answers again; how long the
/// backlog takes to drain; and how many were dead-lettered. The observer runs with the
/// default `RetryPolicy`; the receiver is down by refusing connections.
struct RecoveryRow {
    mode: &'static str,
    down: Duration,
    first: Option<Duration>,
    drained: Option<Duration>,
    dead: u64,
}

async fn recovery(mode: &Mode, down: Duration) -> RecoveryRow {
    let db = match &mode.outbox {
        None => db::connect("sqlite::memory:").await.unwrap(),
        Some(url) => db::connect(url).await.unwrap(),
    };
    prepare(&db).await;
    let port = vendora_pos::receiver::Reserved::new().unwrap();
    let builder = Observer::builder(config(&port.url()));
    let observer = match &mode.outbox {
        None => builder.build().await.unwrap(),
        Some(_) => builder.outbox(db.clone()).build().await.unwrap(),
    };
    let n = 200;
    observer
        .scope(async {
            for i in 0..n {
                new_row(format!("r{i}"), 1.0, i).insert(&db).await.unwrap();
            }
        })
        .await;
    tokio::time::sleep(down).await;
    let receiver = vendora_pos::receiver::Receiver::start_on(port, SECRET).unwrap();
    let back = Instant::now();
    let got = receiver
        .wait_delivered(n as usize, Duration::from_secs(120))
        .await;
    let first = got
        .first()
        .map(|r| r.received_at.saturating_duration_since(back));
    let drained = (got.len() >= n as usize)
        .then(|| {
            got.last()
                .map(|r| r.received_at.saturating_duration_since(back))
        })
        .flatten();
    let dead = observer.stats().dead;
    observer.shutdown(Duration::from_secs(5)).await;
    if mode.outbox.is_some() {
        use sea_orm::ConnectionTrait;
        let _ = db.execute_unprepared("DELETE FROM vendora_outbox").await;
    }
    RecoveryRow {
        mode: mode.name,
        down,
        first,
        drained,
        dead,
    }
}

/// A reconnect storm against vendora-observe-server (in-process): live latency (from the
/// webhook's send to its arrival at an app that stays connected) with nobody reconnecting,
/// then while `apps` apps come back at once, each to be caught up on `history` events.
struct StormRow {
    apps: usize,
    history: usize,
    quiet: Summary,
    storm: Summary,
    caught_up: Option<Duration>,
}

/// A node child whose stdout lines arrive on a channel; killed on drop.
struct NodeChild {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for NodeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeChild {
    fn spawn(script: &str, env: &[(&str, String)]) -> Option<NodeChild> {
        use std::io::BufRead;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
        let mut cmd = std::process::Command::new("node");
        cmd.arg(dir.join(script))
            .stdout(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().ok()?;
        let stdout = child.stdout.take()?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Some(NodeChild { child, lines })
    }

    /// The next JSON line of `kind`, within `within`.
    fn next(&self, kind: &str, within: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["kind"] == kind
            {
                return Some(v);
            }
        }
    }
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3
}

/// Sends `n` live events 5 ms apart and returns, for each that `app` received, the time
/// from its send to its arrival.
async fn live_latency(service: &WebhookService, app: &NodeChild, n: usize) -> Summary {
    let mut sent = HashMap::new();
    for i in 0..n {
        let webhook =
            vendora_observe::Webhook::build("bench:live", &serde_json::json!({"i": i})).unwrap();
        sent.insert(webhook.id().to_owned(), unix_ms());
        let _ = service.send(&webhook).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut samples = Vec::new();
    while samples.len() < n {
        let Some(v) = app.next("live", Duration::from_secs(10)) else {
            break;
        };
        if let (Some(id), Some(at)) = (v["id"].as_str(), v["at"].as_f64())
            && let Some(at_send) = sent.get(id)
        {
            samples.push(Duration::from_secs_f64(((at - at_send) / 1e3).max(0.0)));
        }
    }
    summarize(samples)
}

async fn reconnect_storm(apps: usize, history: usize) -> Option<StormRow> {
    use vendora_observe_server::{Scope, ServerConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let server = vendora_observe_server::start(
        listener,
        ServerConfig::new(SECRET).app_token("bench-app", Scope::All),
    )
    .await
    .ok()?;
    let base = format!("http://{}", server.addr());
    let service = WebhookService::new(config(&format!("{base}/webhook"))).unwrap();
    // Where the storm's apps left: the offset and epoch of an event before the history.
    let mark = vendora_observe::Webhook::build("bench:mark", &serde_json::json!({})).unwrap();
    let position = {
        let body = post_for_answer(&base, &mark).await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (
            v["offset"].as_str()?.to_owned(),
            v["epoch"].as_str()?.to_owned(),
        )
    };
    for i in 0..history {
        let old =
            vendora_observe::Webhook::build("bench:old", &serde_json::json!({"i": i})).unwrap();
        service.send(&old).await.ok()?;
    }
    let env = |storm: usize, live: &str| {
        vec![
            ("URL", base.clone()),
            ("TOKEN", "bench-app".to_owned()),
            ("STORM", storm.to_string()),
            ("OFFSET", position.0.clone()),
            ("EPOCH", position.1.clone()),
            ("EXPECT", history.to_string()),
            ("LIVE", live.to_owned()),
        ]
    };
    let live_app = NodeChild::spawn("storm.mjs", &env(0, "1"))?;
    live_app.next("live-ready", Duration::from_secs(20))?;
    let quiet = live_latency(&service, &live_app, 200).await;
    let stormy = NodeChild::spawn("storm.mjs", &env(apps, "0"))?;
    // The storm's apps connecting, then the live events while they are caught up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let storm = live_latency(&service, &live_app, 200).await;
    let caught_up = stormy
        .next("caught-up", Duration::from_secs(120))
        .and_then(|v| v["ms"].as_f64())
        .map(|ms| Duration::from_secs_f64(ms / 1e3));
    server.shutdown().await;
    Some(StormRow {
        apps,
        history,
        quiet,
        storm,
        caught_up,
    })
}

/// Sends `webhook` signed as the sender does: the server's answer body, whose `offset` and
/// `epoch` say where the event stands in its history.
async fn post_for_answer(base: &str, webhook: &vendora_observe::Webhook) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = webhook.body().as_bytes();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let sig =
        vendora_observe::signature::standard_signature(SECRET.as_bytes(), webhook.id(), ts, body);
    let host = base.strip_prefix("http://")?;
    let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\nwebhook-id: {}\r\n\
         webhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n\r\n",
        body.len(),
        webhook.id()
    );
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.ok()?;
    answer.split("\r\n\r\n").nth(1).map(str::to_owned)
}

/// The bench case that runs the relay's database work without sending.
const STATEMENTS_ALONE: &str = "the relay's statements alone, no HTTP";

/// The bench case that reads each row once and sends it, writing nothing.
const READ_ONCE: &str = "rows read once, sent, nothing written";

/// What delivers an outbox drain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// The product's relay.
    Real,
    /// The relay's statements, nothing sent ([`STATEMENTS_ALONE`]).
    StatementsAlone,
    /// The ceiling of any relay: each row read once, sent by a direct-mode observer,
    /// nothing written.
    ReadOnce,
}

/// The delivery section: for each receiver, wrk's rate, then each mode's drains.
async fn deliveries(
    modes: &[Mode],
    writes: usize,
    targets: &[&str],
) -> (Vec<DrainRow>, Vec<(&'static str, f64, CpuPerEvent)>) {
    let mut rows = Vec::new();
    let mut wrks = Vec::new();
    for which in targets {
        let Some(target) = Target::start(which).await else {
            println!("  Node socket.io server: skipped (needs node and npm)");
            continue;
        };
        let wrk = wrk_rate(&target.url(), 8, 5);
        match wrk {
            Some((w, cpu)) => {
                println!(
                    "  {}: wrk, 8 connections: {w:.0} req/s; CPU {cpu}",
                    target.name()
                );
                wrks.push((target.name(), w, cpu));
            }
            None => println!("  {}: wrk not found (apt-get install wrk)", target.name()),
        }
        let share = |rate: f64| {
            wrk.map(|(w, _)| format!("{:.0}% of wrk", rate / w * 100.0))
                .unwrap_or_default()
        };
        for mode in modes {
            let only = std::env::var("BENCH_CASE").ok();
            let cases = [
                (
                    "causal, 8 writer tasks",
                    (Order::Causal, 8, Shape::Distinct, Relay::Real),
                ),
                (
                    "causal, 1 writer task",
                    (Order::Causal, 1, Shape::Distinct, Relay::Real),
                ),
                (
                    "per-row, 8 writer tasks",
                    (Order::PerRow, 8, Shape::Distinct, Relay::Real),
                ),
                (
                    "per-row, 1 writer task",
                    (Order::PerRow, 1, Shape::Distinct, Relay::Real),
                ),
                (
                    "causal, 8 writer tasks, 10 hot rows",
                    (Order::Causal, 8, Shape::Hot, Relay::Real),
                ),
                (
                    "per-row, 8 writer tasks, 10 hot rows",
                    (Order::PerRow, 8, Shape::Hot, Relay::Real),
                ),
                (
                    STATEMENTS_ALONE,
                    (Order::Causal, 8, Shape::Distinct, Relay::StatementsAlone),
                ),
                (
                    READ_ONCE,
                    (Order::Causal, 8, Shape::Distinct, Relay::ReadOnce),
                ),
            ];
            for (case, how @ (_, _, _, relay)) in cases {
                if only.as_deref().is_some_and(|o| o != case) {
                    continue;
                }
                // The database's ceilings: outbox modes only; the statements alone once (no
                // receiver takes part).
                let skip = match relay {
                    Relay::Real => false,
                    Relay::StatementsAlone => {
                        mode.outbox.is_none() || !matches!(target, Target::Rust(_))
                    }
                    Relay::ReadOnce => mode.outbox.is_none(),
                };
                if skip {
                    continue;
                }
                let (rate, cpu, _) = drain(&target, mode, how, writes).await;
                println!(
                    "  {:<22} {:<18} {case:<38} {rate:>8.0} events/s  {:<12} CPU {cpu}",
                    target.name(),
                    mode.name,
                    share(rate)
                );
                rows.push(DrainRow {
                    target: target.name(),
                    mode: mode.name,
                    case: case.to_owned(),
                    rate,
                    cpu,
                });
            }
        }
    }
    (rows, wrks)
}

/// The window in which a crash loses an autocommit outbox write's event: from the
/// change's own commit to its outbox row's commit, i.e. one autocommit INSERT of the row.
async fn autocommit_window(url: &str, n: usize) -> Summary {
    use sea_orm::ConnectionTrait;
    let db = db::connect(url).await.unwrap();
    vendora_observe::outbox::create_table(&db).await.unwrap();
    let backend = db.get_database_backend();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(r#"{{"event":"product:updated","data":{{"id":{i},"stock":7}}}}"#);
        let sql = "INSERT INTO vendora_outbox (event_id, ordering_key, unit_key, event, kind, \
                   latest_wins, body, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)";
        let sql = if backend == sea_orm::DbBackend::Postgres {
            (1..=9).fold(sql.to_owned(), |s, k| s.replacen('?', &format!("${k}"), 1))
        } else {
            sql.to_owned()
        };
        let statement = sea_orm::Statement::from_sql_and_values(
            backend,
            sql,
            [
                format!("window-{}-{i}", std::process::id()).into(),
                format!("product:{i}").into(),
                "u".into(),
                "product:updated".into(),
                "updated".into(),
                0i16.into(),
                body.into(),
                0i64.into(),
                0i64.into(),
            ],
        );
        let started = Instant::now();
        db.execute_raw(statement).await.unwrap();
        samples.push(started.elapsed());
    }
    let _ = db
        .execute_unprepared("DELETE FROM vendora_outbox WHERE event_id LIKE 'window-%'")
        .await;
    summarize(samples)
}

/// `wrk`'s request rate against `url`, and the CPU per request (its own counted as
/// "others"). Its request carries the headers the sender's do (`Host`, `Content-Type`,
/// `User-Agent`, both webhook headers, `traceparent`), so that the receiver does the same
/// work for either.
fn wrk_rate(url: &str, connections: usize, seconds: u64) -> Option<(f64, CpuPerEvent)> {
    let body = r#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#;
    let sig = vendora_observe::sign(SECRET.as_bytes(), body.as_bytes());
    // The sender's `User-Agent` (this crate's version is the library's).
    let agent = concat!("vendora-observe/", env!("CARGO_PKG_VERSION"));
    let trace = vendora_observe::trace::TraceParent::start().child();
    let script = std::env::temp_dir().join(format!("vendora-wrk-{}.lua", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"User-Agent\"] = \"{agent}\"\n\
             wrk.headers[\"X-Webhook-Signature\"] = \"{sig}\"\n\
             wrk.headers[\"X-Webhook-Id\"] = \"0193a7f2-4c1e-7d3a-9b8e-5f6a7b8c9d0e\"\n\
             wrk.headers[\"traceparent\"] = \"{trace}\"\n"
        ),
    )
    .ok()?;
    let before = Cpu::now();
    let out = std::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
            script.to_str()?,
            url,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let non2xx = text.contains("Non-2xx");
    let requests: u64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())?;
    let cpu = Cpu::per_event(before, requests);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok());
    if non2xx {
        eprintln!("wrk saw non-2xx answers:\n{text}");
    }
    Some((rate?, cpu))
}

// ---------------------------------------------------------------------------------------
// Memory under a burst, in child processes so that each peak RSS is its own.

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn memory_child(mode: &str, n: usize) {
    let down = closed_port_url().await;
    let path =
        std::env::temp_dir().join(format!("vendora-bench-mem-{}.sqlite", std::process::id()));
    let db = db::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    {
        use sea_orm::ConnectionTrait;
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .unwrap();
    }
    prepare(&db).await;
    let observer = match mode {
        "direct" => Some(Observer::builder(config(&down)).build().await.unwrap()),
        "outbox" => Some(
            Observer::builder(config(&down))
                .outbox(db.clone())
                .build()
                .await
                .unwrap(),
        ),
        _ => None,
    };
    let before = peak_rss_kb();
    for i in 0..n as i32 {
        match &observer {
            Some(o) => {
                o.scope(write_observed(&db, Op::Insert, i, 1)).await;
            }
            None => {
                write_plain(&db, Op::Insert, i, 1).await;
            }
        }
    }
    let shed = observer.as_ref().map(|o| o.stats().shed).unwrap_or(0);
    println!(
        "peak_rss_kb={} before_kb={before} shed={shed}",
        peak_rss_kb()
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn memory(n: usize) -> Vec<(String, u64, u64)> {
    let exe = std::env::current_exe().unwrap();
    let mut out = Vec::new();
    for mode in ["plain", "direct", "outbox"] {
        let o = std::process::Command::new(&exe)
            .args(["memory-child", mode, &n.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (peak, shed) = (field("peak_rss_kb="), field("shed="));
        println!(
            "  {mode:<8} {n} events, receiver down: peak RSS {:.1} MiB, shed {shed}",
            peak as f64 / 1024.0
        );
        out.push((mode.to_owned(), peak, shed));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Compile time of the POS entities with and without the derive.

fn compile_time() -> Option<(Duration, Duration)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| std::fs::read_to_string(root.join("src/entities").join(name)).ok();
    let (category, order) = (read("category.rs")?, read("order.rs")?);
    let unobserved = |src: &str| {
        let kept: Vec<&str> = src
            .lines()
            .filter(|l| !l.starts_with("#[observe(") && *l != "use vendora_observe::Observed;")
            .collect();
        kept.join("\n").replace(", Observed)]", ")]")
            + "\n\nimpl ActiveModelBehavior for ActiveModel {}\n"
    };
    let mut times = Vec::new();
    for (name, observed) in [("plain", false), ("observed", true)] {
        let dir = root.join("target/bench-compile").join(name);
        std::fs::create_dir_all(dir.join("src")).ok()?;
        let body = |src: &str| {
            if observed {
                src.to_owned()
            } else {
                unobserved(src)
            }
        };
        let main = format!(
            "#![allow(dead_code)]\nmod category {{\n{}\n}}\nmod order {{\n{}\n}}\nfn main() {{}}\n",
            body(&category),
            body(&order)
        );
        std::fs::write(dir.join("src/main.rs"), &main).ok()?;
        std::fs::write(
            dir.join("Cargo.toml"),
            format!(
                "[package]\nname = \"bench-compile-{name}\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n[workspace]\n\n\
                 [dependencies]\nvendora-observe = {{ path = \"{}\" }}\n\
                 sea-orm = {{ version = \"2.0.4\", default-features = false, features = [\"macros\", \"with-json\"] }}\n\
                 serde = {{ version = \"1\", features = [\"derive\"] }}\n",
                root.join("vendora-observe").display()
            ),
        )
        .ok()?;
        let build = || {
            let started = Instant::now();
            let ok = std::process::Command::new("cargo")
                .args(["build", "--quiet", "--offline"])
                .env("CARGO_TARGET_DIR", root.join("target/bench-compile/target"))
                .current_dir(&dir)
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| started.elapsed())
        };
        build()?; // the dependencies, once
        let mut samples = Vec::new();
        for i in 0..3 {
            // A changed source (a comment) forces the crate itself to rebuild.
            std::fs::write(dir.join("src/main.rs"), format!("{main}// {i}\n")).ok()?;
            samples.push(build()?);
        }
        samples.sort();
        times.push(samples[1]);
        println!(
            "  {name:<8} POS entities (category, order): {:.2} s (median of 3 rebuilds)",
            samples[1].as_secs_f64()
        );
    }
    Some((times[0], times[1]))
}

// ---------------------------------------------------------------------------------------

fn svg(rows: &[OverheadRow], path: &std::path::Path) {
    // Horizontal bars: p50 and p99 of each observed case, in µs on a log scale.
    let bar_h = 14.0;
    let gap = 10.0;
    let left = 430.0;
    let width = 980.0;
    let max_us = rows
        .iter()
        .map(|r| r.observed.p99.max(r.base.p99).as_secs_f64() * 1e6)
        .fold(1.0, f64::max);
    let scale = |v: f64| (v.max(1.0).log10() / max_us.log10()) * (width - left - 40.0);
    let height = 40.0 + rows.len() as f64 * (2.0 * bar_h + gap) + 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Write latency, p50 (dark) and p99 (light), µs, log scale: plain write (grey) vs observed (blue)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (2.0 * bar_h + gap);
        let label = format!("{} · {} · {}", r.backend, r.case, r.op);
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{:.1}\">{label}</text>",
            y + bar_h + 3.0
        );
        for (j, (sum, dark, light)) in
            [(r.base, "#555", "#bbb"), (r.observed, "#1f5fa8", "#9cc0ea")]
                .iter()
                .enumerate()
        {
            let yy = y + j as f64 * bar_h;
            let p99 = scale(sum.p99.as_secs_f64() * 1e6);
            let p50 = scale(sum.p50.as_secs_f64() * 1e6);
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{yy:.1}\" width=\"{p99:.1}\" height=\"{:.1}\" fill=\"{light}\"/>",
                bar_h - 2.0
            );
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{yy:.1}\" width=\"{p50:.1}\" height=\"{:.1}\" fill=\"{dark}\"/>",
                bar_h - 2.0
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\">{:.0} / {:.0}</text>",
                left + p99 + 4.0,
                yy + bar_h - 4.0,
                sum.p50.as_secs_f64() * 1e6,
                sum.p99.as_secs_f64() * 1e6
            );
        }
    }
    s.push_str("</svg>\n");
    let _ = std::fs::write(path, s);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("memory-child") {
        let n = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(100_000);
        memory_child(&args[2], n).await;
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--delivery-only [direct|sqlite|postgres]… [rust|node]…`: the delivery drains alone,
    // for profiling; writes no file.
    if let Some(at) = args.iter().position(|a| a == "--delivery-only") {
        let picked: Vec<&str> = args[at + 1..]
            .iter()
            .map(String::as_str)
            .filter(|a| !a.starts_with("--"))
            .collect();
        let mut targets: Vec<&str> = picked
            .iter()
            .copied()
            .filter(|a| matches!(*a, "rust" | "node"))
            .collect();
        if targets.is_empty() {
            targets.push("rust");
        }
        let file =
            std::env::temp_dir().join(format!("vendora-bench-d-{}.sqlite", std::process::id()));
        let pg = std::env::var("DATABASE_URL").ok();
        let modes: Vec<Mode> = all_modes(&file, pg.as_deref())
            .into_iter()
            .filter(|m| {
                let key = match m.outbox.as_deref() {
                    None => "direct",
                    Some(u) if u.starts_with("sqlite") => "sqlite",
                    Some(_) => "postgres",
                };
                picked.contains(&key)
                    || !picked
                        .iter()
                        .any(|p| matches!(*p, "direct" | "sqlite" | "postgres"))
            })
            .collect();
        // BENCH_WRITES: a longer drain, for a profiler.
        let writes = std::env::var("BENCH_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 1000 } else { 10_000 });
        if std::env::var("BENCH_CASE").as_deref() == Ok("storm") {
            for (apps, history) in [(100, 1000), (400, 1000)] {
                if let Some(r) = reconnect_storm(apps, history).await {
                    println!(
                        "  {} apps × {} events: live p50/p99 {} / {} quiet, {} / {} during; all caught up in {}",
                        r.apps,
                        r.history,
                        ms(r.quiet.p50),
                        ms(r.quiet.p99),
                        ms(r.storm.p50),
                        ms(r.storm.p99),
                        r.caught_up.map_or("—".into(), ms)
                    );
                }
            }
            return;
        }
        if std::env::var("BENCH_CASE").as_deref() == Ok("recovery") {
            // BENCH_OUTAGES=300: other outages, in seconds, comma-separated.
            let outages: Vec<Duration> = std::env::var("BENCH_OUTAGES")
                .unwrap_or_else(|_| "5,30".into())
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .map(Duration::from_secs)
                .collect();
            for down in outages {
                for mode in &modes {
                    let r = recovery(mode, down).await;
                    println!(
                        "  {:<18} down {:>3} s: first accepted after {}, drained in {}, dead {}",
                        r.mode,
                        r.down.as_secs(),
                        r.first.map_or("—".into(), ms),
                        r.drained.map_or("—".into(), ms),
                        r.dead
                    );
                }
            }
            return;
        }
        if std::env::var("BENCH_CASE").as_deref() == Ok(LATENCY) {
            // BENCH_SLOW=0,8,64@100: other slow rows (`@`: updated every so many ms).
            let slows: Vec<Slow> = std::env::var("BENCH_SLOW")
                .map(|v| v.split(',').filter_map(Slow::parse).collect())
                .unwrap_or_else(|_| SLOW_ROWS.iter().filter_map(|s| Slow::parse(s)).collect());
            let modes: Vec<Mode> = latency_modes(&file, pg.as_deref())
                .into_iter()
                .filter(|m| std::env::var("BENCH_LATENCY_MODE").map_or(true, |only| m.name == only))
                .filter(|m| {
                    let key = if m.name.ends_with("WAL") {
                        "outbox SQLite file"
                    } else {
                        m.name
                    };
                    modes.iter().any(|k| k.name == key)
                })
                .collect();
            latency_rows(&targets, &modes, &slows).await;
        } else {
            deliveries(&modes, writes, &targets).await;
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            let wal = file.with_extension("wal.sqlite");
            let _ = std::fs::remove_file(format!("{}{suffix}", wal.display()));
        }
        return;
    }
    let n = if quick { 300 } else { 2000 };
    let started = Instant::now();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find_map(|l| l
                .strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())))
            .unwrap_or_else(|| "unknown CPU".into())
    );
    // The inline baseline posts to a receiver that answers at once.
    let inline_sink = Sink::start().await;
    let _ = INLINE.set(WebhookService::new(config(&inline_sink.url())).unwrap());

    let pg = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"));
    let file = std::env::temp_dir().join(format!("vendora-bench-{}.sqlite", std::process::id()));
    let file_url = format!("sqlite://{}?mode=rwc", file.display());

    println!("1. Write overhead: observed vs plain, p50/p99 ({n} writes each, interleaved)");
    let mut rows = Vec::new();
    overhead("SQLite memory", "sqlite::memory:", n, &mut rows).await;
    overhead("SQLite file WAL", &file_url, n, &mut rows).await;
    match &pg {
        Some(url) => overhead("PostgreSQL", url, n / 2, &mut rows).await,
        None => println!("  PostgreSQL: skipped (set DATABASE_URL=postgres://…)"),
    }

    println!("\n2. Delivery: drained backlogs beside wrk, ordering modes, hot rows");
    let writes = if quick { 1000 } else { 10_000 };
    let file2 = std::env::temp_dir().join(format!("vendora-bench-d-{}.sqlite", std::process::id()));
    let modes = all_modes(&file2, pg.as_deref());
    let (drains, wrks) = deliveries(&modes, writes, &["rust", "node"]).await;
    println!(
        "\n   Commit → received latency (1,000 writes 2 ms apart; beside them 0, 8 or 64 slow rows)"
    );
    let slows: Vec<Slow> = SLOW_ROWS.iter().filter_map(|s| Slow::parse(s)).collect();
    let slows = if quick { &slows[..2] } else { &slows[..] };
    let latencies = latency_rows(
        &["rust", "node"],
        &latency_modes(&file2, pg.as_deref()),
        slows,
    )
    .await;
    println!("\n   Recovery: one task's 200 events written while the receiver is down");
    let mut outages = vec![Duration::from_secs(5), Duration::from_secs(30)];
    if std::env::var("BENCH_LONG").is_ok() {
        outages.push(Duration::from_secs(300));
    }
    if quick {
        outages.truncate(1);
    }
    let mut recoveries = Vec::new();
    for down in &outages {
        for mode in &modes {
            let r = recovery(mode, *down).await;
            println!(
                "  {:<18} down {:>3} s: first accepted after {}, drained in {}, dead {}",
                r.mode,
                r.down.as_secs(),
                r.first.map_or("—".into(), ms),
                r.drained.map_or("—".into(), ms),
                r.dead
            );
            recoveries.push(r);
        }
    }
    println!("\n   Reconnect storm: live latency while apps come back at once and are caught up");
    let mut storms = Vec::new();
    for (apps, history) in [(100, 1000), (400, 1000)] {
        let (apps, history) = if quick {
            (apps / 4, history / 4)
        } else {
            (apps, history)
        };
        match reconnect_storm(apps, history).await {
            Some(r) => {
                println!(
                    "  {} apps × {} events: live p50/p99 {} / {} quiet, {} / {} during; all caught up in {}",
                    r.apps,
                    r.history,
                    ms(r.quiet.p50),
                    ms(r.quiet.p99),
                    ms(r.storm.p50),
                    ms(r.storm.p99),
                    r.caught_up.map_or("—".into(), ms)
                );
                storms.push(r);
            }
            None => println!("  skipped: node and tests/node's packages are needed"),
        }
    }
    println!("\n   Autocommit outbox: the window between the change's commit and its event's");
    let mut windows = Vec::new();
    for (name, url) in [
        ("SQLite file", Some(file_url.clone())),
        ("PostgreSQL", pg.clone()),
    ] {
        if let Some(url) = url {
            let w = autocommit_window(&url, n).await;
            println!("  {name:<18} p50 {} p99 {}", us(w.p50), us(w.p99));
            windows.push((name, w));
        }
    }

    println!("\n3. Memory under a burst (receiver down)");
    let burst = if quick { 20_000 } else { 100_000 };
    let mem = memory(burst);

    println!("\n4. Compile time");
    let compile = compile_time();
    if compile.is_none() {
        println!("  skipped: the compile benchmark could not build offline");
    }

    // BENCHMARKS.md
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks\n\nMeasured {date} on {machine}, with `cargo run --release --example bench`{} ({:.0} s). Every ratio compares two things measured side by side in the same run. Nothing here is asserted by the tests.\n",
        if pg.is_some() {
            " and `DATABASE_URL` pointing at a local PostgreSQL"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        md,
        "## 1. Write overhead\n\nLatency of a SeaORM write of an observed entity vs the same entity unobserved (interleaved, {n} each; PostgreSQL {}), p50 and p99. Ratio = observed p50 / plain p50. The original design's baseline awaits the POST inside the hook. The row *unobserved: the old-value read alone* compares two unobserved writes: a plain update vs a SELECT of the row then the same update (its \"observed\" column), which is what the derive must do before an update that sets a watched column.\n",
        n / 2
    );
    let _ = writeln!(
        md,
        "| database | case | write | plain p50 / p99 | observed p50 / p99 | ratio |\n| --- | --- | --- | --- | --- | --- |"
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} / {} | {} / {} | {:.2}× |",
            r.backend,
            r.case,
            r.op,
            us(r.base.p50),
            us(r.base.p99),
            us(r.observed.p50),
            us(r.observed.p99),
            r.ratio()
        );
    }
    let _ = writeln!(md, "\n![write latency](benchmarks-latency.svg)\n");
    let _ = writeln!(
        md,
        "## 2. Delivery\n\n{writes} updates of a watched column (two events each) written by 1 or 8 tasks (in outbox mode in transactions of 100 writes), held back, then released: events per second until the last arrived. Beside it, `wrk` posting a signed body of the same kind, with the sender's headers, to the same receiver with 8 connections. *Causal* is the default order (each row's history and each task's writes in order); *per-row* keeps only each row's. *10 hot rows*: every write updates one of ten rows. *The relay's statements alone*: the same backlog (causal, 8 tasks) claimed and written delivered by the relay's own statements, 2,048 rows at a time, one after the other, with nothing sent: the rate the database allows before any HTTP. *Rows read once, sent, nothing written*: the same backlog read 2,048 rows at a time by an id cursor, with the columns a claim returns, and sent by a direct-mode observer, with no lease and no mark: the ceiling of any relay that reads each row from the table, not a mode of the product (no crash safety, one reader).\n"
    );
    for (name, w, cpu) in &wrks {
        let _ = writeln!(
            md,
            "- wrk against the {name}: {w:.0} req/s (CPU per request, wrk + others / receiver: {:.1} / {:.1} µs)",
            cpu.others + cpu.sender,
            cpu.receiver
        );
    }
    let _ = writeln!(
        md,
        "\n| receiver | mode | case | events/s | share of wrk | CPU per event: sender / receiver / others |\n| --- | --- | --- | --- | --- | --- |"
    );
    for d in &drains {
        let wrk = wrks
            .iter()
            .find(|(n, _, _)| *n == d.target)
            .map(|(_, w, _)| *w);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {:.1} / {:.1} / {:.1} µs |",
            d.target,
            d.mode,
            d.case,
            d.rate,
            wrk.map(|w| format!("{:.0}%", d.rate / w * 100.0))
                .unwrap_or_else(|| "n/a".into()),
            d.cpu.sender,
            d.cpu.receiver,
            d.cpu.others
        );
    }
    let _ = writeln!(
        md,
        "\nHot rows vs the same volume over distinct rows (8 writer tasks; target ≥ 90%):\n\n| receiver | mode | order | distinct rows/s | 10 hot rows/s | hot / distinct |\n| --- | --- | --- | --- | --- | --- |"
    );
    for hot in drains.iter().filter(|d| d.case.contains("hot rows")) {
        let order = if hot.case.starts_with("causal") {
            "causal"
        } else {
            "per-row"
        };
        // The same order over distinct rows.
        let same = format!("{order}, 8 writer tasks");
        let distinct = drains
            .iter()
            .find(|d| d.target == hot.target && d.mode == hot.mode && d.case == same);
        if let Some(distinct) = distinct {
            let _ = writeln!(
                md,
                "| {} | {} | {order} | {:.0} | {:.0} | {:.0}% |",
                hot.target,
                hot.mode,
                distinct.rate,
                hot.rate,
                hot.rate / distinct.rate * 100.0
            );
        }
    }
    let _ = writeln!(
        md,
        "\nCommit → received: 1,000 inserts from one task 2 ms apart (outside a transaction; \"writes in transactions\": each in a transaction of its own, committed at once), from the write's return (the commit's) to the request's arrival at the receiver, and how long the 1,000 writes took. With slow rows, as many other tasks each update a row of their own (every second, or every 100 ms) meanwhile, and the receiver answers those rows' events after 2 s (request timeout 15 s); the last column compares the p99 with the same receiver and mode without slow rows:\n\n| receiver | mode | slow rows, updated | writes took | p50 | p99 | p99 vs none |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in &latencies {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.mode,
            load_label(r.slow, r.txn),
            ms(r.took),
            us(r.l.p50),
            us(r.l.p99),
            r.ratio.map_or("—".into(), |x| format!("{x:.2}×"))
        );
    }
    let _ = writeln!(
        md,
        "\nRecovery after an outage: one task's 200 events written while the receiver refuses connections (the default `RetryPolicy`: a probe every 0.5 s at most), then the receiver back; from its first moment up, when the first event is accepted and when the last one is (`BENCH_LONG=1` adds a 5-minute outage):\n\n| mode | outage | first accepted after | backlog drained after | dead |\n| --- | --- | --- | --- | --- |"
    );
    for r in &recoveries {
        let _ = writeln!(
            md,
            "| {} | {} s | {} | {} | {} |",
            r.mode,
            r.down.as_secs(),
            r.first.map_or("—".into(), ms),
            r.drained.map_or("—".into(), ms),
            r.dead
        );
    }
    let _ = writeln!(
        md,
        "\nA reconnect storm against vendora-observe-server: an app that stays connected gets 200 live events sent 5 ms apart, alone, then while N apps (one node process, the apps' module, WebSocket) come back at once with an old position and are each caught up on the history since (4 catch-ups at a time, pages of 256). From each live event's send to its arrival at the staying app:\n\n| apps reconnecting | events each | live p50 / p99 alone | live p50 / p99 during the storm | every app caught up after |\n| --- | --- | --- | --- | --- |"
    );
    for r in &storms {
        let _ = writeln!(
            md,
            "| {} | {} | {} / {} | {} / {} | {} |",
            r.apps,
            r.history,
            ms(r.quiet.p50),
            ms(r.quiet.p99),
            ms(r.storm.p50),
            ms(r.storm.p99),
            r.caught_up.map_or("—".into(), ms)
        );
    }
    let _ = writeln!(
        md,
        "\nOutbox writes outside a transaction commit the change first and the event's row second. A crash between the two loses the event: the window is one autocommit `INSERT` of the row ({n} measured):\n\n| database | p50 | p99 |\n| --- | --- | --- |"
    );
    for (name, w) in &windows {
        let _ = writeln!(md, "| {name} | {} | {} |", us(w.p50), us(w.p99));
    }
    let _ = writeln!(
        md,
        "\n## 3. Memory under a burst\n\n{burst} inserts with the receiver down, each in its own process; peak RSS (VmHWM).\n\n| writer | peak RSS | shed |\n| --- | --- | --- |"
    );
    for (mode, peak, shed) in &mem {
        let _ = writeln!(md, "| {mode} | {:.1} MiB | {shed} |", *peak as f64 / 1024.0);
    }
    let _ = writeln!(md, "\n## 4. Compile time\n");
    match compile {
        Some((plain, observed)) => {
            let _ = writeln!(
                md,
                "Rebuilding a crate holding the POS Category and Order entities (dev profile, dependencies built, median of 3):\n\n| entities | time |\n| --- | --- |\n| without `#[derive(Observed)]` | {:.2} s |\n| with it | {:.2} s ({:.2}×) |",
                plain.as_secs_f64(),
                observed.as_secs_f64(),
                observed.as_secs_f64() / plain.as_secs_f64()
            );
        }
        None => {
            let _ = writeln!(
                md,
                "Not measured in this run (the temporary crates could not build offline)."
            );
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::write(root.join("BENCHMARKS.md"), &md);
    svg(&rows, &root.join("benchmarks-latency.svg"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        let _ = std::fs::remove_file(format!("{}{suffix}", file2.display()));
        let wal = file2.with_extension("wal.sqlite");
        let _ = std::fs::remove_file(format!("{}{suffix}", wal.display()));
    }
    println!("\nwrote BENCHMARKS.md and benchmarks-latency.svg");
}
