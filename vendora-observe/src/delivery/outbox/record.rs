//! The recorder: writes what became of the rows the relay handed the scheduler, then
//! tells the relay which rows are done.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, TransactionTrait};
use tokio::sync::mpsc;

use super::lease::now_ms;
use super::sql::{Binds, by_index, statement};
use super::{Outbox, TABLE, admin};
use crate::delivery::scheduler::Report;

/// What the recorder tells the relay.
pub(super) enum Done {
    /// Outcomes written: these rows are no longer the relay's.
    Recorded(Vec<i64>),
    /// Left unsent at shutdown: their leases should end now.
    Released(Vec<i64>),
}

/// Writes outcomes as they come, all that arrived meanwhile in one round, then tells the
/// relay which rows are done. A write that fails is retried until it succeeds: until then
/// the rows stay the relay's. A failed attempt is written only on a row still pending: a
/// relay that lost the database past its lease may find its row taken over and delivered
/// by another, and a dead mark then would make `requeue` resend stale state.
pub(super) async fn record(
    outbox: Outbox,
    mut reports: mpsc::UnboundedReceiver<(i64, Report)>,
    done: mpsc::UnboundedSender<Done>,
) {
    let backend = outbox.inner.backend;
    let mut round = Vec::new();
    while reports.recv_many(&mut round, usize::MAX).await > 0 {
        let mut delivered = Vec::new();
        let mut released = Vec::new();
        let mut finished = Vec::new();
        let mut writes: Vec<Statement> = Vec::new();
        // Where each dead mark is in `writes`, and its row.
        let mut dead_writes: Vec<(usize, i64)> = Vec::new();
        let now = now_ms();
        for (id, report) in round.drain(..) {
            match report {
                Report::Delivered => delivered.push(id),
                Report::Released | Report::Unknown => released.push(id),
                Report::Failed {
                    attempts,
                    delay,
                    error,
                } => writes.push(statement(backend, |b| {
                    format!(
                        "UPDATE {TABLE} SET attempts = {}, next_attempt_at = {}, last_error = {} \
                         WHERE id = {} AND status = 'pending'",
                        b.bind(attempts as i32),
                        b.bind(now + delay.as_millis() as i64),
                        b.bind(error),
                        b.bind(id)
                    )
                })),
                Report::Dead { attempts, error } => {
                    finished.push(id);
                    dead_writes.push((writes.len(), id));
                    writes.push(statement(backend, |b| {
                        format!(
                            "UPDATE {TABLE} SET status = 'dead', attempts = {}, last_error = {}, \
                             claimed_by = NULL, claimed_until = NULL \
                             WHERE id = {} AND status = 'pending'",
                            b.bind(attempts as i32),
                            b.bind(error),
                            b.bind(id)
                        )
                    }));
                }
                Report::Superseded => {
                    finished.push(id);
                    writes.push(statement(backend, |b| {
                        format!(
                            "UPDATE {TABLE} SET status = 'superseded', delivered_at = {}, \
                             claimed_by = NULL, claimed_until = NULL \
                             WHERE id = {} AND status = 'pending'",
                            b.bind(now),
                            b.bind(id)
                        )
                    }));
                }
            }
        }
        // Dead first: a delivery in the same round may make them stale.
        let mut attempt = 0;
        let changed = loop {
            match write_all(&outbox, &writes).await {
                Ok(changed) => break changed,
                Err(e) => retry_later("failed attempts", &mut attempt, e).await,
            }
        };
        for (at, id) in dead_writes {
            if changed[at] == 0 {
                tell_taken_over(&outbox, id).await;
            }
        }
        if !delivered.is_empty() {
            while let Err(e) = mark_delivered(&outbox.inner.options.db, &delivered).await {
                retry_later("delivered rows", &mut attempt, e).await;
            }
            finished.extend(delivered);
        }
        if attempt >= 5 {
            tracing::info!("outbox: writing the outcome of deliveries works again");
        }
        if !finished.is_empty() {
            let _ = done.send(Done::Recorded(finished));
        }
        if !released.is_empty() {
            let _ = done.send(Done::Released(released));
        }
        outbox.inner.progress.notify_waiters();
    }
}

/// A dead letter this relay logged for a row another relay had taken over (its lease had
/// lapsed) is not recorded: says so, with the event's id and the row's status now.
async fn tell_taken_over(outbox: &Outbox, id: i64) {
    let inner = &outbox.inner;
    let now = inner
        .options
        .db
        .query_one_raw(statement(inner.backend, |b| {
            format!(
                "SELECT event_id, status FROM {TABLE} WHERE id = {}",
                b.bind(id)
            )
        }))
        .await;
    let (event_id, status) = match now {
        Ok(Some(r)) => (
            r.try_get::<String>("", "event_id").unwrap_or_default(),
            r.try_get::<String>("", "status").unwrap_or_default(),
        ),
        _ => (String::new(), "gone".to_owned()),
    };
    tracing::warn!(
        "outbox: the dead letter of X-Webhook-Id {event_id} (row {id}) is not recorded: another \
         relay took the row over when this relay's lease lapsed, and the row is now {status}"
    );
}

/// After a failed write of outcomes: logs (once loudly) and waits before the next try.
/// Outcomes are retried until written: until then the rows stay the relay's.
async fn retry_later(what: &str, attempt: &mut u32, e: DbErr) {
    *attempt += 1;
    if *attempt == 5 {
        tracing::error!(
            "outbox: the outcome of deliveries ({what}) cannot be written ({e}); retrying; if \
             this process stops first, the rows are sent again after their lease, with the \
             same X-Webhook-Id"
        );
    } else {
        tracing::debug!("outbox: writing {what} failed, retrying: {e}");
    }
    tokio::time::sleep(Duration::from_millis(20u64 << (*attempt).min(8))).await;
}

/// Writes `writes` in one transaction; returns the rows each changed.
async fn write_all(outbox: &Outbox, writes: &[Statement]) -> Result<Vec<u64>, DbErr> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let txn = outbox.inner.options.db.begin().await?;
    let mut changed = Vec::with_capacity(writes.len());
    for write in writes {
        let done = txn.execute_raw(write.clone()).await?;
        changed.push(done.rows_affected());
    }
    txn.commit().await?;
    Ok(changed)
}

/// Marks rows delivered, 500 per statement (per-row commits would cap the relay at the
/// database's commit rate), after marking `superseded` the rows of the same rows that these
/// deliveries made stale, so that apps never get old state after new:
///
/// - dead rows, so that a later requeue cannot resend them. Always, whoever left the dead
///   rows: a relay that asked only while it knew of dead rows (its own, or counted when
///   idle) missed those another relay left while it was busy. With no dead row the look is a
///   probe of the dead rows' partial index;
/// - requeued rows still pending and not leased (a requeue committed while a newer event of
///   their row was on its way): a probe of the requeued rows' partial index.
///
/// The stale rows are marked first. On PostgreSQL each step commits on its own: a requeue
/// between the steps finds them already superseded (the deliveries happened), a crash
/// between them leaves the deliveries pending, sent again with the same ids, and no
/// transaction holds the stale rows' locks while it waits for others (a requeue locking
/// them in another order would deadlock with it). On SQLite, which runs one writer at a
/// time, the steps are one transaction: nothing runs between them anyway, and it is one
/// commit instead of three (each waits for the disk, and for the write lock behind the
/// application's own commits).
pub(super) async fn mark_delivered(
    db: &sea_orm::DatabaseConnection,
    ids: &[i64],
) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    let now = now_ms();
    let mut steps = Vec::new();
    for chunk in ids.chunks(500) {
        let made_stale = |status: &str, index: &str, extra: &dyn Fn(&mut Binds) -> String| {
            statement(backend, |b| {
                format!(
                    "UPDATE {TABLE}{} SET status = 'superseded', delivered_at = {}, \
                     last_error = COALESCE(last_error, '') || ' (superseded by a newer delivered event of its row)', \
                     claimed_by = NULL, claimed_until = NULL \
                     WHERE {status} AND EXISTS (SELECT 1 FROM {TABLE} d \
                       WHERE d.id IN ({}) AND d.ordering_key = {TABLE}.ordering_key \
                       AND d.id > {TABLE}.id AND {}){}",
                    by_index(backend, index),
                    b.bind(now),
                    b.list(chunk.iter().copied()),
                    admin::stale_after(TABLE, "d"),
                    extra(b)
                )
            })
        };
        steps.push(made_stale("status = 'dead'", "dead", &|_| String::new()));
        steps.push(made_stale(
            "status = 'pending' AND requeued = 1",
            "requeued",
            &|b| {
                format!(
                    " AND (claimed_until IS NULL OR claimed_until < {})",
                    b.bind(now)
                )
            },
        ));
        steps.push(statement(backend, |b| {
            format!(
                "UPDATE {TABLE} SET status = 'delivered', delivered_at = {}, \
                 attempts = attempts + 1, last_error = NULL, claimed_by = NULL, \
                 claimed_until = NULL WHERE id IN ({})",
                b.bind(now),
                b.list(chunk.iter().copied())
            )
        }));
    }
    if backend == DbBackend::Sqlite {
        let txn = db.begin().await?;
        for step in steps {
            txn.execute_raw(step).await?;
        }
        txn.commit().await
    } else {
        for step in steps {
            db.execute_raw(step).await?;
        }
        Ok(())
    }
}
