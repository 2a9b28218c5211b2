//! The outbox table, its indexes and (PostgreSQL) its NOTIFY trigger: created when missing,
//! brought up to date when an older version of the table is found, safely under
//! concurrent starts.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, TransactionSession, TransactionTrait};

use super::sql::statement;
use super::{CHANNEL, TABLE};

/// Serialises schema changes between instances starting at once on one PostgreSQL
/// database (`pg_advisory_xact_lock` key: "vendora_outbox" in ASCII, truncated).
const SCHEMA_LOCK: i64 = 0x0076_656e_646f_7261;

/// Columns added since the first version of the table, with their definitions.
const ADDED_COLUMNS: [(&str, &str); 5] = [
    ("unit_key", "TEXT"),
    ("kind", "VARCHAR(8) NOT NULL DEFAULT 'updated'"),
    ("latest_wins", "SMALLINT NOT NULL DEFAULT 0"),
    ("traceparent", "VARCHAR(64)"),
    // A dead row put back in the queue: sent only while no newer event of its row has
    // gone out (see `admin::requeue`).
    ("requeued", "SMALLINT NOT NULL DEFAULT 0"),
];

/// Creates the outbox table, its indexes and (PostgreSQL) its NOTIFY trigger when missing,
/// and adds the columns of newer versions to an older table. Idempotent; on PostgreSQL
/// several instances may run it at once (an advisory lock orders them).
///
/// When everything is already there it changes nothing, so it needs no right to change the
/// schema: a role that may create tables runs it once (a migration, a deploy step), and the
/// application's own role then needs only `SELECT, INSERT, UPDATE, DELETE` on
/// `vendora_outbox` (and, on PostgreSQL, `USAGE` on `vendora_outbox_id_seq`).
pub async fn create_table<C: ConnectionTrait + TransactionTrait>(db: &C) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    if !matches!(backend, DbBackend::Postgres | DbBackend::Sqlite) {
        return Err(DbErr::Custom(
            "the vendora-observe outbox supports SQLite and PostgreSQL".into(),
        ));
    }
    if is_current(db).await? {
        return Ok(());
    }
    let txn = db.begin().await?;
    if backend == DbBackend::Postgres {
        // DDL is transactional in PostgreSQL: with the lock, the second instance finds
        // everything the first created. Without it, two `CREATE ... IF NOT EXISTS` can
        // both see nothing and one fails on a unique index of the catalog.
        txn.execute_raw(statement(backend, |b| {
            format!("SELECT pg_advisory_xact_lock({})", b.bind(SCHEMA_LOCK))
        }))
        .await?;
        // `… IF NOT EXISTS` / `IF EXISTS` answer with a NOTICE when there is nothing to do
        // ("index … does not exist, skipping"), which sqlx logs at `info` in the
        // application's log: not news to anyone.
        txn.execute_unprepared("SET LOCAL client_min_messages = warning")
            .await?;
    }
    for statement in ddl(backend) {
        txn.execute_unprepared(&statement).await?;
    }
    for (column, definition) in ADDED_COLUMNS {
        if !has_column(&txn, column).await? {
            txn.execute_unprepared(&format!(
                "ALTER TABLE {TABLE} ADD COLUMN {column} {definition}"
            ))
            .await?;
        }
    }
    for statement in indexes() {
        txn.execute_unprepared(&statement).await?;
    }
    if backend == DbBackend::Postgres {
        if !notify_function_is_current(&txn).await? {
            txn.execute_unprepared(&format!(
                "CREATE OR REPLACE FUNCTION {TABLE}_notify() RETURNS trigger AS $$\
                 {}$$ LANGUAGE plpgsql",
                notify_body()
            ))
            .await?;
        }
        if !trigger_exists(&txn).await? {
            txn.execute_unprepared(&format!(
                "CREATE TRIGGER {TABLE}_notify AFTER INSERT ON {TABLE} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_notify()"
            ))
            .await?;
        }
    }
    txn.commit().await
}

fn ddl(backend: DbBackend) -> Vec<String> {
    // PostgreSQL: room on each page for the claim's new row versions. The claim changes
    // no indexed column, so with room it is a HOT update (no index entries); on full pages
    // a claim of 512 rows took 17 ms instead of 3 ms.
    let (id, with) = match backend {
        DbBackend::Postgres => ("id BIGSERIAL PRIMARY KEY", " WITH (fillfactor = 50)"),
        _ => ("id INTEGER PRIMARY KEY AUTOINCREMENT", ""),
    };
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} ({id}, event_id VARCHAR(64) NOT NULL UNIQUE, \
         ordering_key TEXT NOT NULL, unit_key TEXT, event TEXT NOT NULL, \
         kind VARCHAR(8) NOT NULL DEFAULT 'updated', latest_wins SMALLINT NOT NULL DEFAULT 0, \
         body TEXT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'pending', \
         attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at BIGINT NOT NULL, last_error TEXT, \
         created_at BIGINT NOT NULL, delivered_at BIGINT, claimed_by VARCHAR(64), \
         claimed_until BIGINT, traceparent VARCHAR(64), \
         requeued SMALLINT NOT NULL DEFAULT 0){with}"
    )]
}

/// The indexes the outbox needs: name (after `{TABLE}_`) and definition.
///
/// Partial indexes over pending rows only: the claim reads the oldest pending rows by id,
/// and visits chains by their key. Delivered rows are kept for `retention` (a day by
/// default, so often millions of them) and must cost the claim nothing. Pruning walks
/// finished rows by age; the dead-letter list and requeue read dead rows, and a delivery
/// looks up the dead rows of its row that it made stale.
const INDEXES: [(&str, &str); 7] = [
    ("pending", "(id) WHERE status = 'pending'"),
    ("pending_key", "(ordering_key, id) WHERE status = 'pending'"),
    ("pending_unit", "(unit_key, id) WHERE status = 'pending'"),
    (
        "done",
        "(delivered_at) WHERE status IN ('delivered', 'superseded')",
    ),
    ("dead", "(id) WHERE status = 'dead'"),
    ("dead_key", "(ordering_key, id) WHERE status = 'dead'"),
    // Requeued rows still pending: a delivery looks up those of its row it made stale.
    // Usually empty, so the look costs an index probe.
    (
        "requeued",
        "(ordering_key, id) WHERE status = 'pending' AND requeued = 1",
    ),
];

/// Indexes of older versions of the table, dropped when found. A full (status, …) index
/// offers the planners a worse path for the claim (SQLite took it and sorted every pending
/// row).
const OLD_INDEXES: [&str; 3] = ["by_key", "by_time", "delivered"];

fn indexes() -> Vec<String> {
    INDEXES
        .iter()
        .map(|(name, definition)| {
            format!("CREATE INDEX IF NOT EXISTS {TABLE}_{name} ON {TABLE} {definition}")
        })
        .chain(
            OLD_INDEXES
                .iter()
                .map(|name| format!("DROP INDEX IF EXISTS {TABLE}_{name}")),
        )
        .collect()
}

/// Whether the table is as this version makes it: every column, every index and no old
/// one, and (PostgreSQL) its trigger. Reads the catalogs only.
async fn is_current<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    if !table_exists(db).await? {
        return Ok(false);
    }
    for (column, _) in ADDED_COLUMNS {
        if !has_column(db, column).await? {
            return Ok(false);
        }
    }
    let q = statement(backend, |b| match backend {
        DbBackend::Postgres => format!(
            "SELECT indexname AS name FROM pg_indexes \
             WHERE schemaname = current_schema() AND tablename = {}",
            b.bind(TABLE)
        ),
        _ => format!(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = {}",
            b.bind(TABLE)
        ),
    });
    let names = db
        .query_all_raw(q)
        .await?
        .iter()
        .map(|r| r.try_get::<String>("", "name"))
        .collect::<Result<HashSet<_>, _>>()?;
    let has = |name: &str| names.contains(&format!("{TABLE}_{name}"));
    if !INDEXES.iter().all(|(name, _)| has(name)) || OLD_INDEXES.iter().any(|name| has(name)) {
        return Ok(false);
    }
    Ok(backend != DbBackend::Postgres
        || (trigger_exists(db).await? && notify_function_is_current(db).await?))
}

/// The body of the trigger function that wakes the relays (PostgreSQL). Compared with the
/// catalog's at start-up: a body from an older version is replaced.
fn notify_body() -> String {
    format!(" BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END; ")
}

/// Whether the trigger function exists, in the table's schema, with this version's body.
async fn notify_function_is_current<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    let source = db
        .query_one_raw(statement(db.get_database_backend(), |b| {
            format!(
                "SELECT prosrc FROM pg_proc \
                 WHERE proname = {} AND pronamespace = current_schema()::regnamespace",
                b.bind(format!("{TABLE}_notify"))
            )
        }))
        .await?
        .map(|r| r.try_get::<String>("", "prosrc"))
        .transpose()?;
    Ok(source.as_deref() == Some(notify_body().as_str()))
}

async fn has_column<C: ConnectionTrait>(db: &C, column: &str) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let q = statement(backend, |b| match backend {
        DbBackend::Postgres => format!(
            "SELECT 1 AS one FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = {} AND column_name = {}",
            b.bind(TABLE),
            b.bind(column)
        ),
        _ => format!(
            "SELECT 1 AS one FROM pragma_table_info({}) WHERE name = {}",
            b.bind(TABLE),
            b.bind(column)
        ),
    });
    Ok(db.query_one_raw(q).await?.is_some())
}

async fn trigger_exists<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    Ok(db
        .query_one_raw(statement(db.get_database_backend(), |b| {
            format!(
                "SELECT 1 AS one FROM pg_trigger WHERE tgname = {} AND tgrelid = to_regclass({})",
                b.bind(format!("{TABLE}_notify")),
                b.bind(TABLE)
            )
        }))
        .await?
        .is_some())
}

/// Whether `db` has the outbox table.
pub async fn table_exists<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let q = statement(backend, |b| match backend {
        DbBackend::Postgres => format!(
            "SELECT 1 AS one FROM pg_tables WHERE schemaname = current_schema() AND tablename = {}",
            b.bind(TABLE)
        ),
        _ => format!(
            "SELECT 1 AS one FROM sqlite_master WHERE type = 'table' AND name = {}",
            b.bind(TABLE)
        ),
    });
    Ok(db.query_one_raw(q).await?.is_some())
}
