//! The relay's parts alone, for the bench's ceilings (the `internals` feature).

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::TABLE;
use super::claim::{self, Claimed, Cursor, Held, Request};
use super::lease::now_ms;
use super::record::mark_delivered;
use super::relay::max_held;

/// The relay's database work alone, for the bench's ceiling: claims `want` rows at a time
/// (the statements a relay runs, bodies included) and writes them delivered, without
/// sending anything, until nothing is left. Returns the rows it went through. On
/// PostgreSQL it first takes the table's statistics, as a relay does at a backlog's first
/// full claim.
#[cfg(feature = "internals")]
pub async fn drain_without_sending(
    db: &sea_orm::DatabaseConnection,
    want: usize,
) -> Result<u64, DbErr> {
    if db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(&format!("ANALYZE {TABLE}")).await?;
    }
    let relay = uuid::Uuid::now_v7().to_string();
    let mut cursor = Cursor::default();
    let mut total = 0u64;
    loop {
        let req = Request {
            relay: &relay,
            now: now_ms(),
            lease: Duration::from_secs(60),
            want,
            per_chain: max_held(want) / 2,
        };
        let Claimed { jobs, .. } = claim::claim(db, &Held::default(), &mut cursor, req)
            .await
            .map_err(|f| f.error)?;
        if jobs.is_empty() {
            return Ok(total);
        }
        let ids: Vec<i64> = jobs.iter().map(|j| j.token).collect();
        mark_delivered(db, &ids).await?;
        total += ids.len() as u64;
    }
}

/// The ceiling of any relay, for the bench: reads the pending rows once, by an id cursor,
/// `want` at a time with their bodies, and hands them to `observer` (direct mode) to send,
/// writing nothing, neither lease nor mark. Returns the rows read; `observer` then sends
/// them (wait at the receiver, or [`Observer::flush`](crate::Observer::flush)).
#[cfg(feature = "internals")]
pub async fn send_without_writing(
    db: &sea_orm::DatabaseConnection,
    observer: &crate::Observer,
    want: usize,
) -> Result<u64, DbErr> {
    let crate::observer::Sink::Direct(queue) = &observer.inner.sink else {
        return Err(DbErr::Custom(
            "send_without_writing needs a direct-mode observer".into(),
        ));
    };
    let backend = db.get_database_backend();
    let (mut after, mut total) = (0i64, 0u64);
    loop {
        let rows = db
            .query_all_raw(claim::read_pending_statement(backend, after, want))
            .await?;
        let jobs = rows
            .iter()
            .map(claim::job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(last) = jobs.last() else {
            return Ok(total);
        };
        after = last.token;
        total += jobs.len() as u64;
        queue.enqueue(jobs).await;
    }
}
