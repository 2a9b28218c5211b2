//! The POS demo (`cargo run --example pos`): the scenario's writes on embedded SQLite, each
//! event shown as an app receives it. Lives here so that the tests run the very same code
//! in-process.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use vendora_observe::{Observer, WebhookConfig};

use crate::db;
use crate::receiver::{Receiver, Request};
use crate::scenario::{self, EXPECTED, Step};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Where the demo sends, and how it stores events.
pub struct Demo {
    /// A configured WebSocket server; `None`: the demo starts its own receiver.
    pub server: Option<WebhookConfig>,
    /// Outbox mode on this SQLite file; `None`: direct mode on SQLite in memory.
    pub outbox: Option<PathBuf>,
}

impl Demo {
    /// Runs the scenario, writing what happens to `out`. With its own receiver, checks that
    /// exactly the scenario's events arrived, in order, correctly signed.
    pub async fn run(self, out: &mut (dyn Write + Send)) -> Result<(), Error> {
        let (config, receiver) = match self.server {
            Some(config) => (config, None),
            None => {
                let secret = format!("demo-{:016x}", random());
                let receiver = Receiver::start(&secret).await?;
                writeln!(
                    out,
                    "receiver: listening on {} (verifies X-Webhook-Signature)",
                    receiver.url()
                )?;
                let config = WebhookConfig::builder()
                    .url(receiver.url())
                    .secret(secret)
                    .build()?;
                (config, Some(receiver))
            }
        };
        writeln!(out, "sending to {}", config.url())?;
        let db = match &self.outbox {
            Some(path) => {
                // A fresh file each run, so the scenario's ids and events are the same.
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                db::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?
            }
            None => db::connect("sqlite::memory:").await?,
        };
        db::create_pos_tables(&db).await?;
        let observer = match &self.outbox {
            Some(path) => {
                writeln!(out, "mode: outbox in {}", path.display())?;
                Observer::builder(config).outbox(db.clone()).build().await?
            }
            None => {
                writeln!(out, "mode: direct (in-memory queue)")?;
                Observer::builder(config).build().await?
            }
        };
        observer.install();
        let mut shown = 0;
        let mut n = 0;
        let mut failed: Option<Error> = None;
        scenario::run(&db, self.outbox.is_some(), async |step: Step| {
            n += 1;
            let shown_now = async {
                writeln!(out, "\n{n:>2}. {}", step.label)?;
                show(&receiver, &mut shown, step.events, out).await
            };
            if let Err(e) = shown_now.await {
                failed.get_or_insert(e);
            }
        })
        .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        let expected = EXPECTED.len() as u64;
        wait_for_delivery(&observer, expected, out).await?;
        let report = observer.shutdown(Duration::from_secs(5)).await;
        let stats = report.stats;
        let left = report.left + report.outcome_unknown + report.pending_in_outbox;
        writeln!(
            out,
            "\nobserver: delivered {} of {expected}, dead {}, left undelivered {left} \
             (retried {}, shed {})",
            stats.sent, stats.dead, stats.retried, stats.shed
        )?;
        if stats.sent != expected || stats.dead > 0 || left > 0 {
            return Err(format!(
                "{} of the {expected} webhooks were delivered ({} dead, {left} left \
                 undelivered): the lines above say why",
                stats.sent, stats.dead
            )
            .into());
        }
        if let Some(receiver) = &receiver {
            let got = receiver.requests();
            let names: Vec<String> = got.iter().map(Request::event).collect();
            if names != EXPECTED || !got.iter().all(|r| r.signature_ok) {
                return Err(format!("the receiver saw {names:?}").into());
            }
            writeln!(
                out,
                "receiver: exactly the {} expected events, in order, every signature valid",
                got.len()
            )?;
        }
        Ok(())
    }
}

/// Waits while delivery makes progress, saying what it waits for every few seconds; gives
/// up after 30 s without any (the receiver is down for good, or refuses everything).
async fn wait_for_delivery(
    observer: &Observer,
    expected: u64,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    const PATIENCE: Duration = Duration::from_secs(30);
    let mut done = 0;
    let mut progress_at = std::time::Instant::now();
    loop {
        if observer.flush(Duration::from_secs(3)).await {
            return Ok(());
        }
        let stats = observer.stats();
        let now_done = stats.sent + stats.dead + stats.superseded;
        if now_done > done {
            done = now_done;
            progress_at = std::time::Instant::now();
        }
        let quiet = progress_at.elapsed();
        writeln!(
            out,
            "waiting: {} of {expected} webhook(s) delivered, {} still to go{}",
            stats.sent,
            stats.pending,
            if quiet >= Duration::from_secs(3) {
                format!(
                    " (none delivered for {} s: is the receiver up?)",
                    quiet.as_secs()
                )
            } else {
                String::new()
            }
        )?;
        if quiet >= PATIENCE {
            writeln!(out, "no progress for {} s: stopping", PATIENCE.as_secs())?;
            return Ok(());
        }
    }
}

/// Prints the next `n` events the receiver got, as an app would see them.
async fn show(
    receiver: &Option<Receiver>,
    shown: &mut usize,
    n: usize,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let Some(receiver) = receiver else {
        return Ok(());
    };
    if n == 0 {
        return Ok(());
    }
    let got = receiver
        .wait_delivered(*shown + n, Duration::from_secs(10))
        .await;
    for r in &got[*shown..] {
        let sig = if r.signature_ok {
            "signature ok"
        } else {
            "BAD SIGNATURE"
        };
        writeln!(out, "    app <- {:<17} {}  ({sig})", r.event(), r.data())?;
    }
    *shown = got.len();
    Ok(())
}

fn random() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
