//! `vendora-observe outbox …`: the outbox's counts, dead rows, requeue, purge, watch and
//! tail, on `DATABASE_URL`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use vendora_observe::outbox;
use vendora_observe_server::escaped;

use crate::Error;

#[derive(Subcommand)]
pub(crate) enum OutboxCommand {
    /// Count rows by status
    Status,
    /// List dead rows with their last error
    Dead {
        /// Rows to show at most
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// Put a dead row (or all of them with --all) back in the queue
    Retry {
        /// The row id, as `outbox dead` shows it
        id: Option<i64>,
        /// Requeue every dead row
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete delivered rows older than --older-than seconds
    Purge {
        #[arg(long, default_value_t = 0)]
        older_than: u64,
    },
    /// Pending rows, the oldest one's age, the delivery rate and dead rows, refreshed every
    /// second, with a progress bar while a backlog drains
    Watch {
        /// Milliseconds between refreshes
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
        interval: u64,
        /// Stop after this many refreshes (default: until Ctrl-C)
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print rows as they are delivered, superseded or given up on (dead)
    Tail {
        /// Stop after this many rows (default: until Ctrl-C)
        #[arg(long)]
        count: Option<u64>,
    },
}

pub(crate) async fn run_outbox(command: OutboxCommand) -> Result<ExitCode, Error> {
    let dotenv: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
        .map(|vars| vars.flatten().collect())
        .unwrap_or_default();
    let url = std::env::var("DATABASE_URL")
        .ok()
        .or_else(|| dotenv.get("DATABASE_URL").cloned())
        .ok_or(())
        .map_err(|_| "DATABASE_URL is not set: set it to the database that holds vendora_outbox")?;
    let db = sea_orm::Database::connect(&url)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {e}"))?;
    if !outbox::table_exists(&db).await? {
        return Err(format!(
            "DATABASE_URL has no {} table: point it at the application's database, where an \
             outbox-mode observer has started",
            outbox::TABLE
        )
        .into());
    }
    match command {
        OutboxCommand::Status => {
            let c = outbox::counts(&db).await?;
            println!(
                "pending    {}\ndelivered  {}\ndead       {}",
                c.pending, c.delivered, c.dead
            );
        }
        OutboxCommand::Dead { limit } => {
            let rows = outbox::dead(&db, limit).await?;
            if rows.is_empty() {
                println!("no dead rows");
            }
            for r in rows {
                println!(
                    "{:>6}  {}  {}  attempts={}  {}\n        {}",
                    r.id,
                    r.event,
                    r.event_id,
                    r.attempts,
                    r.last_error.unwrap_or_default(),
                    r.body
                );
            }
        }
        OutboxCommand::Retry { id, all } => {
            if id.is_none() && !all {
                return Err("name a row id (see `outbox dead`) or pass --all".into());
            }
            let done = outbox::requeue(&db, id).await?;
            if done.requeued == 0 && done.superseded == 0 {
                return Err(match id {
                    Some(id) => format!("no dead row with id {id}").into(),
                    None => "no dead rows".into(),
                });
            }
            println!("requeued {} row(s)", done.requeued);
            if done.superseded > 0 {
                println!(
                    "not requeued: {} row(s) whose row has a newer event on its way (marked \
                     superseded; resending them would leave the apps on stale data)",
                    done.superseded
                );
            }
        }
        OutboxCommand::Purge { older_than } => {
            let n = outbox::purge_delivered(&db, Duration::from_secs(older_than)).await?;
            println!("deleted {n} delivered row(s)");
        }
        OutboxCommand::Watch { interval, count } => {
            watch(&db, Duration::from_millis(interval), count).await?;
        }
        OutboxCommand::Tail { count } => tail(&db, count).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The rate is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// `outbox watch`: one line per refresh; on a terminal, one line redrawn in place.
async fn watch(
    db: &sea_orm::DatabaseConnection,
    interval: Duration,
    count: Option<u64>,
) -> Result<(), Error> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    // The backlog being drained: the most pending rows seen since it began.
    let mut backlog = 0u64;
    let mut refreshes = 0u64;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let pending = outbox::pending(db).await?;
        let dead = outbox::dead_count(db).await?;
        let oldest = outbox::oldest_pending(db).await?;
        let now = now_ms();
        let window = RATE_WINDOW.as_millis() as i64;
        let rate = outbox::finished_count_since(db, now - window).await? as f64
            / RATE_WINDOW.as_secs_f64();
        backlog = if pending == 0 {
            0
        } else {
            backlog.max(pending)
        };
        let age = oldest
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let mut line =
            format!("pending {pending}  oldest {age}  delivering {rate:.1}/s  dead {dead}");
        if backlog > pending || (pending > 0 && rate > 0.0) {
            line.push_str("  ");
            line.push_str(&progress(backlog, pending, rate));
        }
        if tty {
            print!("\r\x1b[2K{line}");
            std::io::Write::flush(&mut std::io::stdout())?;
        } else {
            println!("{line}");
        }
        refreshes += 1;
        if count.is_some_and(|c| refreshes >= c) {
            break;
        }
    }
    if tty {
        println!();
    }
    Ok(())
}

/// `[########............]  40%  ETA 12 s`: how much of the backlog has drained.
fn progress(backlog: u64, pending: u64, rate: f64) -> String {
    const WIDTH: usize = 24;
    let done = backlog.saturating_sub(pending) as f64 / backlog.max(1) as f64;
    let filled = (done * WIDTH as f64).round() as usize;
    let eta = if rate > 0.0 {
        format!("ETA {:.0} s", pending as f64 / rate)
    } else {
        "ETA -".into()
    };
    format!(
        "[{}{}] {:>3.0}%  {eta}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        done * 100.0
    )
}

/// `outbox tail`: rows as they finish, from now on.
async fn tail(db: &sea_orm::DatabaseConnection, count: Option<u64>) -> Result<(), Error> {
    use std::collections::HashSet;
    let mut since = now_ms();
    // Rows already printed at `since` (several finish in the same millisecond).
    let mut at_since: HashSet<i64> = HashSet::new();
    let mut dead_seen: HashSet<i64> = outbox::dead(db, 100_000)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    println!(
        "following {} from now: rows as they are delivered, superseded or dead (Ctrl-C to stop)",
        outbox::TABLE
    );
    let mut printed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let mut rows = Vec::new();
        for r in outbox::finished_since(db, since, 1_000).await? {
            if r.delivered_at == Some(since) && at_since.contains(&r.id) {
                continue;
            }
            let at = r.delivered_at.unwrap_or(since);
            if at > since {
                since = at;
                at_since.clear();
            }
            at_since.insert(r.id);
            rows.push(r);
        }
        // The dead rows are read again only when their count changed (one index count);
        // `dead_seen` holds the rows dead now, so a requeue does not make every poll read.
        if outbox::dead_count(db).await? != dead_seen.len() as u64 {
            let dead = outbox::dead(db, 100_000).await?;
            let now: HashSet<i64> = dead.iter().map(|r| r.id).collect();
            rows.extend(dead.into_iter().filter(|r| !dead_seen.contains(&r.id)));
            dead_seen = now;
        }
        for r in rows {
            let latency = r
                .delivered_at
                .map(|d| format!("  after {} ms", d - r.created_at))
                .unwrap_or_default();
            let error = r
                .last_error
                .as_deref()
                .filter(|_| r.status == outbox::OutboxStatus::Dead)
                .map(|e| format!("  {}", escaped(e)))
                .unwrap_or_default();
            println!(
                "{:<10}  {:>6}  {:<20}  {:<16}  {}  attempts={}{latency}{error}",
                r.status,
                r.id,
                escaped(&r.event),
                escaped(&r.ordering_key),
                escaped(&r.event_id),
                r.attempts,
            );
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}
