//! Where a claim's statements run.
//!
//! On PostgreSQL (with the `postgres` feature) a claim is one transaction on a connection
//! of the relay's own, kept from one claim to the next: `BEGIN`, the requeue lock and the
//! frontier in one round trip, the lease, `COMMIT`. A claim is on the way from each commit
//! to the receiver: through the application's pool the same claim took seven round trips
//! (a pooled connection is pinged before each use; the lock took a transaction of its own;
//! an unnamed statement is parsed and described before it runs), and events reached the
//! receiver 1.8 ms after their commit at p50 instead of 1.0 ms (BENCHMARKS.md).
//!
//! The reads are planned for the table as it is at each run: the frontier is sent with its
//! values in its text, the other reads as unnamed statements. A prepared statement (what
//! SeaORM runs) gets a generic plan after five executions and keeps it: planned while the
//! outbox was nearly empty, a claim's plan scanned every pending row's key for each
//! candidate (5 s per claim once 20,000 rows were pending). The lease, whose plan does not
//! depend on its values, is prepared once on the connection.
//!
//! On SQLite a claim is one transaction through SeaORM, begun `IMMEDIATE`: it takes the
//! write lock before the frontier is read and holds one pooled connection from the frontier
//! to the lease. SeaORM gives a SQLite pool one connection unless told otherwise, and each of
//! the application's transactions holds it from `BEGIN` to `COMMIT`: a claim whose
//! statements each took it from the pool could wait behind one transaction for its frontier
//! and another for its lease. With writes in transactions on a SQLite file in the default
//! journal, events reached the receiver at p99 10.1-17.1 ms after their commit, 5.9-7.2 ms
//! with the claim in one transaction (p50 3.7-4.5 and 2.7-3.8 ms; the recorder's mark of
//! the event before, one more commit that waits for the disk, still goes first). Begun
//! `DEFERRED`, the read lock of the frontier would have to become a write lock for the
//! lease, which SQLite refuses at once (`SQLITE_BUSY`) while another connection writes.
//!
//! Elsewhere (PostgreSQL without the feature) each step is a statement of its own through
//! SeaORM.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, QueryResult,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};

use super::super::lease::{RequeueLock, under_requeue_lock};
use super::super::sql::Binds;

/// How a read is planned on PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub(super) enum Plan {
    /// For the table as it is now, at each run.
    EachTime,
    /// Once, then cached (its best plan does not depend on its values).
    Cached,
}

/// The relay's own connection for its claims (PostgreSQL, with the `postgres` feature):
/// taken from the application's pool at the first claim and detached from it (the pool
/// opens another in its place; the connection keeps the pool's `after_connect` settings,
/// such as a `search_path`), named `vendora-observe relay` in `pg_stat_activity`, dropped
/// after a failure and taken again by the next claim, closed with the relay.
#[derive(Default)]
pub(crate) struct ClaimConnection {
    #[cfg(feature = "postgres")]
    pg: Option<sqlx::PgConnection>,
}

impl ClaimConnection {
    /// The statements of one claim on `db`.
    pub(super) fn session<'a>(&'a mut self, db: &'a DatabaseConnection) -> Session<'a> {
        Session {
            db,
            conn: self,
            open: false,
            sqlite: None,
        }
    }

    /// Closes the connection, telling the server.
    pub(crate) async fn close(self) {
        #[cfg(feature = "postgres")]
        if let Some(conn) = self.pg {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// One claim's statements. A session dropped with its transaction open (a statement failed,
/// or the claim was cut short) drops its connection: PostgreSQL rolls the transaction back,
/// and nothing it took outlives the claim.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(super) struct Session<'a> {
    db: &'a DatabaseConnection,
    conn: &'a mut ClaimConnection,
    /// A transaction is open on the relay's connection.
    open: bool,
    /// SQLite: the claim's transaction (rolled back when dropped).
    sqlite: Option<DatabaseTransaction>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "postgres")]
        if self.open {
            self.conn.pg = None;
        }
    }
}

impl Session<'_> {
    /// Reads the frontier, whose text `frontier` writes with the binder it is given, with
    /// the planner `settings` (PostgreSQL only: `SET LOCAL …` before it, and the statement
    /// that ends it after). On PostgreSQL this opens the claim's transaction, holding the
    /// requeue lock shared (see [`REQUEUE_LOCK`](super::super::lease::REQUEUE_LOCK)), in one
    /// round trip; on SQLite a transaction holding the write lock.
    pub(super) async fn frontier(
        &mut self,
        frontier: impl Fn(&mut Binds) -> String,
        settings: Option<(&str, &str)>,
    ) -> Result<Vec<QueryResult>, DbErr> {
        #[cfg(feature = "postgres")]
        if self.db.get_database_backend() == sea_orm::DbBackend::Postgres {
            let mut b = Binds::literal();
            let text = frontier(&mut b);
            let (set, unset) = settings
                .map(|(set, unset)| (format!("{set}; "), format!("; {unset}")))
                .unwrap_or_default();
            let sql = format!(
                "BEGIN; {set}SELECT pg_advisory_xact_lock_shared({}); {text}{unset}",
                super::super::lease::REQUEUE_LOCK
            );
            return self.begin_with(&sql).await;
        }
        let _ = settings;
        let backend = self.db.get_database_backend();
        let mut b = Binds::new(backend);
        let text = frontier(&mut b);
        if backend == DbBackend::Sqlite {
            let txn = self
                .db
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?;
            let txn = self.sqlite.insert(txn);
            return txn.query_all_raw(b.statement(text)).await;
        }
        self.db.query_all_raw(b.statement(text)).await
    }

    /// Runs `query`, a read; on PostgreSQL in the claim's transaction.
    pub(super) async fn read(
        &mut self,
        query: Statement,
        plan: Plan,
    ) -> Result<Vec<QueryResult>, DbErr> {
        #[cfg(feature = "postgres")]
        if let Some(conn) = self.pg() {
            return pg::query(conn, query, matches!(plan, Plan::Cached)).await;
        }
        let _ = plan;
        match &self.sqlite {
            Some(txn) => txn.query_all_raw(query).await,
            None => self.db.query_all_raw(query).await,
        }
    }

    /// Runs the lease `statement` holding the requeue lock shared, and commits it: the
    /// claim's transaction on PostgreSQL and SQLite (which runs one writer at a time: that
    /// orders leases and requeues already), elsewhere a statement of its own.
    #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
    pub(super) async fn lease(mut self, statement: Statement) -> Result<Vec<QueryResult>, DbErr> {
        #[cfg(feature = "postgres")]
        if let Some(conn) = self.pg() {
            let rows = pg::query(conn, statement, true).await?;
            pg::simple(conn, "COMMIT").await?;
            self.open = false;
            return Ok(rows);
        }
        if let Some(txn) = self.sqlite.take() {
            let rows = txn.query_all_raw(statement).await?;
            txn.commit().await?;
            return Ok(rows);
        }
        under_requeue_lock(self.db, RequeueLock::Shared, statement).await
    }

    /// Ends a claim that leases nothing. Should its `ROLLBACK` fail (the server ended the
    /// connection meanwhile), nothing was taken: the connection is dropped, and the next
    /// claim takes another.
    #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
    pub(super) async fn end(mut self) {
        if let Some(txn) = self.sqlite.take()
            && let Err(e) = txn.rollback().await
        {
            tracing::debug!("outbox: ending a claim that took nothing failed: {e}");
        }
        #[cfg(feature = "postgres")]
        if let Some(conn) = self.pg() {
            match pg::simple(conn, "ROLLBACK").await {
                Ok(()) => self.open = false,
                Err(e) => tracing::debug!("outbox: ending a claim that took nothing failed: {e}"),
            }
        }
    }

    /// The relay's connection, when a claim's transaction is open on it.
    #[cfg(feature = "postgres")]
    fn pg(&mut self) -> Option<&mut sqlx::PgConnection> {
        self.conn.pg.as_mut().filter(|_| self.open)
    }

    /// Runs `sql` (statements, the first `BEGIN`) on the relay's connection, taken now if
    /// need be; returns the rows that have an `id`, the frontier's. A kept connection
    /// the server closed meanwhile (a restart, an administrator) is replaced once, as the
    /// pool's check before each use would have replaced it.
    #[cfg(feature = "postgres")]
    async fn begin_with(&mut self, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
        let kept = self.conn.pg.is_some();
        match self.try_begin_with(sql).await {
            Err(e) if kept && pg::connection_lost(&e) => {
                tracing::debug!("outbox: the relay's connection was closed ({e}); reconnecting");
                self.conn.pg = None;
                self.try_begin_with(sql).await
            }
            done => done,
        }
        .map_err(pg::error)
    }

    #[cfg(feature = "postgres")]
    async fn try_begin_with(&mut self, sql: &str) -> Result<Vec<QueryResult>, sqlx::Error> {
        use sqlx::Row;
        // From here on, whatever fails drops the connection (see `Drop`).
        self.open = true;
        let conn = match &mut self.conn.pg {
            Some(conn) => conn,
            None => {
                let pool = self.db.get_postgres_connection_pool();
                let conn = self.conn.pg.insert(pool.acquire().await?.detach());
                // A statement of its own: a claim that leases nothing rolls back.
                sqlx::raw_sql(pg::NAME_CONNECTION)
                    .execute(&mut *conn)
                    .await?;
                conn
            }
        };
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_all(&mut *conn)
            .await?;
        Ok(rows
            .into_iter()
            .filter(|row| row.try_column("id").is_ok())
            .map(Into::into)
            .collect())
    }
}

#[cfg(feature = "postgres")]
mod pg {
    use sea_orm::{DbErr, QueryResult, Statement, Value};
    use sqlx::{Arguments, PgConnection};

    /// Names the relay's connection in `pg_stat_activity`, after the application's own name
    /// for its connections, if it has one.
    pub(super) const NAME_CONNECTION: &str = "SELECT set_config('application_name', \
        concat_ws(' ', nullif(current_setting('application_name'), ''), \
        'vendora-observe relay'), false)";

    pub(super) fn error(e: sqlx::Error) -> DbErr {
        DbErr::Query(sea_orm::RuntimeErr::SqlxError(e.into()))
    }

    /// The connection itself is gone (closed by the server, reset), not a statement failed.
    pub(super) fn connection_lost(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
            // Connection exceptions (08…) and operator intervention (57P…: an administrator
            // ended the connection, the server is shutting down).
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }

    /// Runs `query` with its values bound, as a prepared statement kept on the connection
    /// when `persistent`, else an unnamed one, planned for these values.
    pub(super) async fn query(
        conn: &mut PgConnection,
        query: Statement,
        persistent: bool,
    ) -> Result<Vec<QueryResult>, DbErr> {
        let mut args = sqlx::postgres::PgArguments::default();
        for value in query.values.iter().flat_map(|v| v.0.iter()) {
            let bound = match value {
                Value::BigInt(v) => args.add(*v),
                Value::String(v) => args.add(v.as_deref()),
                other => {
                    return Err(DbErr::Custom(format!(
                        "unexpected outbox statement parameter {other:?}"
                    )));
                }
            };
            bound.map_err(|e| DbErr::Custom(e.to_string()))?;
        }
        let rows = sqlx::query_with(sqlx::AssertSqlSafe(query.sql), args)
            .persistent(persistent)
            .fetch_all(conn)
            .await
            .map_err(error)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub(super) async fn simple(conn: &mut PgConnection, sql: &'static str) -> Result<(), DbErr> {
        sqlx::raw_sql(sql)
            .execute(conn)
            .await
            .map(drop)
            .map_err(error)
    }
}
