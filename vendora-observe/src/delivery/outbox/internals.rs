//! The relay's parts alone, for the bench's ceilings (the `internals` feature).

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::TABLE;
use super::claim::{self, ClaimConnection, Claimed, Cursor, Held, Request};
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
    let mut conn = ClaimConnection::default();
    let mut total = 0u64;
    loop {
        let req = Request {
            relay: &relay,
            now: now_ms(),
            lease: Duration::from_secs(60),
            want,
            per_chain: max_held(want) / 2,
        };
        let Claimed { jobs, .. } = claim::claim(db, &mut conn, &Held::default(), &mut cursor, req)
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

/// The pending rows after id `after`, `want` of them at most, with their bodies, as jobs,
/// read without a lease: the ceiling of any relay, for the bench
/// ([`crate::Observer`]'s `send_without_writing` hands them to a direct-mode observer).
pub(crate) async fn read_pending(
    db: &sea_orm::DatabaseConnection,
    after: i64,
    want: usize,
) -> Result<Vec<crate::delivery::Job>, DbErr> {
    let backend = db.get_database_backend();
    db.query_all_raw(claim::read_pending_statement(backend, after, want))
        .await?
        .iter()
        .map(claim::job_from_row)
        .collect()
}
