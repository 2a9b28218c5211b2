//! The claim's statements, built for their backend.

use sea_orm::DbBackend;

use super::super::TABLE;
use super::super::sql::{Binds, by_index, statement};
use super::{JOB_COLUMNS, Request};

/// The pending rows leased to relays other than `relay` whose lease has not ended and ends
/// before `below`, by relay: how many (`n`) and when the last lease ends (`until`). Read
/// only to say so, rarely.
pub(crate) fn leased_elsewhere_statement(
    backend: DbBackend,
    relay: &str,
    now: i64,
    below: i64,
) -> sea_orm::Statement {
    statement(backend, |b| {
        format!(
            "SELECT claimed_by AS relay, COUNT(*) AS n, MAX(claimed_until) AS until \
             FROM {TABLE}{} WHERE status = 'pending' AND claimed_until >= {} \
             AND claimed_until < {} AND claimed_by <> {} GROUP BY claimed_by",
            by_index(backend, "pending"),
            b.bind(now),
            b.bind(below),
            b.bind(relay)
        )
    })
}

/// PostgreSQL planner settings for the frontier on a backlog (`SET LOCAL`, this query
/// alone): its rows come in the order of their own index, never from a sort. Without
/// statistics (a table not analyzed yet; a role that does not own the table cannot
/// `ANALYZE` it, so only autovacuum does) PostgreSQL takes `status = 'pending'` to match
/// 0.5% of the rows, plans a bitmap scan of every pending row and a top-N sort, and reads
/// 20,000 rows to return 512.
pub const IN_INDEX_ORDER: &str = "SET LOCAL enable_sort = off";

/// Ends [`IN_INDEX_ORDER`] after the frontier, within the claim's transaction: the claim's
/// other statements are planned as usual.
pub(super) const SORT_AGAIN: &str = "SET LOCAL enable_sort TO DEFAULT";

/// The planner settings the frontier runs with: [`IN_INDEX_ORDER`] on PostgreSQL once a
/// frontier came back full (`backlog`).
pub fn frontier_settings(backend: DbBackend, backlog: bool) -> Option<&'static str> {
    (backend == DbBackend::Postgres && backlog).then_some(IN_INDEX_ORDER)
}

/// Step 1: the oldest `window` pending rows not held by `relay`, run with
/// [`frontier_settings`]. The runs of rows the relay holds (`skip`, `first..=last` in id
/// order, from `Held::runs`) are skipped rather than walked past: the index is read in
/// the segments between them, merged in id order, each segment read only as far as the
/// merge needs (PostgreSQL plans a Merge Append of limited index scans, SQLite a merge of
/// co-routines), so a relay holding the 8,000 oldest rows reads what it returns.
#[cfg(any(test, feature = "internals"))]
pub fn frontier_statement(
    backend: DbBackend,
    relay: &str,
    window: usize,
    skip: &[(i64, i64)],
) -> sea_orm::Statement {
    let mut b = Binds::new(backend);
    let text = frontier_text(&mut b, relay, window, skip);
    b.statement(text)
}

/// [`frontier_statement`]'s text, its values bound by `b` (or written into it, see
/// [`Binds::literal`]).
pub(super) fn frontier_text(
    b: &mut Binds,
    relay: &str,
    window: usize,
    skip: &[(i64, i64)],
) -> String {
    let backend = b.backend();
    let index = by_index(backend, "pending");
    let select = |b: &mut Binds, after: Option<i64>, before: Option<i64>| {
        let mut text = format!(
            "SELECT id, ordering_key, unit_key, claimed_until, next_attempt_at \
             FROM {TABLE}{index} WHERE status = 'pending' AND (claimed_by IS NULL OR claimed_by <> {})",
            b.bind(relay)
        );
        if let Some(after) = after {
            text.push_str(&format!(" AND id > {}", b.bind(after)));
        }
        if let Some(before) = before {
            text.push_str(&format!(" AND id < {}", b.bind(before)));
        }
        text
    };
    let window = window as i64;
    if skip.is_empty() {
        return format!(
            "{} ORDER BY id LIMIT {}",
            select(b, None, None),
            b.bind(window)
        );
    }
    // The segments: before the first run, between runs, after the last. SQLite merges the
    // arms of a compound `ORDER BY` straight from the index; PostgreSQL merges them
    // (Merge Append) when each is a limited, ordered subquery, and otherwise sorts them all.
    let mut segments = Vec::with_capacity(skip.len() + 1);
    let mut after = None;
    for first in skip.iter().map(|&(first, _)| Some(first)).chain([None]) {
        let segment = select(b, after, first);
        segments.push(match backend {
            DbBackend::Sqlite => segment,
            _ => format!("({segment} ORDER BY id LIMIT {})", b.bind(window)),
        });
        after = skip.get(segments.len() - 1).map(|&(_, last)| last);
    }
    format!(
        "{} ORDER BY id LIMIT {}",
        segments.join(" UNION ALL "),
        b.bind(window)
    )
}

/// Step 2: a loose index scan over the pending rows' keys after `after_key`, `probes` keys
/// at most; for each key, its oldest pending row when that row lies beyond the frontier
/// (`id > beyond`) and heads its unit of work too. Rows come with `k`, the key visited
/// (`id` is NULL where the key's head did not qualify).
pub fn skip_scan_statement(
    backend: DbBackend,
    after_key: &str,
    probes: usize,
    beyond: i64,
) -> sea_orm::Statement {
    let key_index = by_index(backend, "pending_key");
    let unit_index = by_index(backend, "pending_unit");
    statement(backend, |b| {
        format!(
            "WITH RECURSIVE keys(k, n) AS ( \
               SELECT (SELECT MIN(ordering_key) FROM {TABLE}{key_index} \
                       WHERE status = 'pending' AND ordering_key > {}), 1 \
               UNION ALL \
               SELECT (SELECT MIN(ordering_key) FROM {TABLE}{key_index} \
                       WHERE status = 'pending' AND ordering_key > keys.k), keys.n + 1 \
               FROM keys WHERE keys.k IS NOT NULL AND keys.n < {} \
             ) \
             SELECT keys.k AS k, o.id AS id, o.ordering_key AS ordering_key, \
                    o.unit_key AS unit_key, o.claimed_until AS claimed_until, \
                    o.next_attempt_at AS next_attempt_at \
             FROM keys LEFT JOIN {TABLE} o ON o.id = ( \
                 SELECT MIN(h.id) FROM {TABLE} h{key_index} \
                 WHERE h.status = 'pending' AND h.ordering_key = keys.k) \
               AND o.id > {} \
               AND (o.unit_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM {TABLE} u{unit_index} \
                 WHERE u.unit_key = o.unit_key AND u.status = 'pending' AND u.id < o.id)) \
             WHERE keys.k IS NOT NULL \
             ORDER BY keys.n",
            b.bind(after_key),
            b.bind(probes as i64),
            b.bind(beyond)
        )
    })
}

/// Step 2: a loose index scan over the pending rows' unit keys after `after_unit`, `units`
/// of them at most.
pub(crate) fn unit_scan_statement(
    backend: DbBackend,
    after_unit: &str,
    units: usize,
) -> sea_orm::Statement {
    let unit_index = by_index(backend, "pending_unit");
    statement(backend, |b| {
        format!(
            "WITH RECURSIVE units(u, n) AS ( \
               SELECT (SELECT MIN(unit_key) FROM {TABLE}{unit_index} \
                       WHERE status = 'pending' AND unit_key > {}), 1 \
               UNION ALL \
               SELECT (SELECT MIN(unit_key) FROM {TABLE}{unit_index} \
                       WHERE status = 'pending' AND unit_key > units.u), units.n + 1 \
               FROM units WHERE units.u IS NOT NULL AND units.n < {} \
             ) \
             SELECT u FROM units WHERE u IS NOT NULL ORDER BY n",
            b.bind(after_unit),
            b.bind(units as i64)
        )
    })
}

/// One unit's next rows to read: `rows` of them after row `after`.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    /// The unit key.
    pub(crate) unit: String,
    /// Rows to read at most.
    pub(crate) rows: usize,
    /// Read rows after this id.
    pub(crate) after: i64,
}

/// Step 2: the next pending rows of each unit not held by `relay`, each with the pending
/// rows just before it on its row (`prev_key`) and on its unit (`prev_unit`).
pub(crate) fn unit_runs_statement(
    backend: DbBackend,
    relay: &str,
    units: &[Run],
) -> sea_orm::Statement {
    let key_index = by_index(backend, "pending_key");
    let unit_index = by_index(backend, "pending_unit");
    let mut b = Binds::new(backend);
    let parts: Vec<String> = units
        .iter()
        .enumerate()
        .map(|(i, run)| {
            format!(
                "SELECT * FROM (SELECT o.id AS id, o.ordering_key AS ordering_key, \
                   o.unit_key AS unit_key, o.claimed_until AS claimed_until, \
                   o.next_attempt_at AS next_attempt_at, \
                   (SELECT p.id FROM {TABLE} p{key_index} WHERE p.status = 'pending' \
                      AND p.ordering_key = o.ordering_key AND p.id < o.id \
                      ORDER BY p.ordering_key DESC, p.id DESC LIMIT 1) AS prev_key, \
                   (SELECT q.id FROM {TABLE} q{unit_index} WHERE q.status = 'pending' \
                      AND q.unit_key = o.unit_key AND q.id < o.id \
                      ORDER BY q.unit_key DESC, q.id DESC LIMIT 1) AS prev_unit \
                 FROM {TABLE} o{unit_index} WHERE o.status = 'pending' AND o.unit_key = {} \
                   AND o.id > {} AND (o.claimed_by IS NULL OR o.claimed_by <> {}) \
                   ORDER BY o.unit_key, o.id LIMIT {}) AS r{i}",
                b.bind(run.unit.as_str()),
                b.bind(run.after),
                b.bind(relay),
                b.bind(run.rows as i64)
            )
        })
        .collect();
    b.statement(parts.join(" UNION ALL "))
}

/// Pads an id list to a few fixed lengths (repeating the last id), so that the database's
/// statement cache sees a handful of statements, not one per length.
pub(super) fn padded(ids: impl Iterator<Item = i64>) -> Vec<i64> {
    let mut ids: Vec<i64> = ids.collect();
    let len = ids.len().next_power_of_two().max(8);
    if let Some(&last) = ids.last() {
        ids.resize(len, last);
    }
    ids
}

/// `status = 'pending'` in a statement that picks its rows by id (`id IN (…)`): on
/// PostgreSQL compared under the "C" collation, which gives the same answer for this ASCII
/// value but no longer implies the predicate of the pending rows' partial indexes, so the
/// planner looks the rows up by primary key whatever its statistics say. Statistics taken
/// while nothing was pending (autovacuum's, at a quiet moment) estimate those indexes empty,
/// and the plan cached for the prepared statement then read every pending row's index entry
/// and heap row to find the few it updates: 0.16 ms per lease with 260 rows pending, against
/// 0.03 ms by primary key, and in proportion to a backlog. SQLite looks `id IN (…)` up by
/// rowid.
fn pending_by_id(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "status = 'pending' COLLATE \"C\"",
        _ => "status = 'pending'",
    }
}

/// Step 3: lease the chosen rows that are still free.
pub(super) fn lease_statement(
    backend: DbBackend,
    req: &Request<'_>,
    chosen: impl Iterator<Item = i64>,
) -> sea_orm::Statement {
    let ids = padded(chosen);
    // A requeued row is not taken while a newer event of its row is on its way (leased, by
    // any relay, this one included): sent after it, it would leave the apps on old state.
    // Left pending, it is marked superseded when that event is delivered. Nor is a row taken
    // while an older requeued row of its row is pending and neither this relay's nor taken
    // by this statement: a requeue that committed after the frontier was read put it in
    // front (see `REQUEUE_LOCK`), or it lies within a run of rows this relay finished, which
    // the frontier skips (a dead row requeued). (Should that older row be refused here, the
    // claim hands back what it took behind it.)
    statement(backend, |b| {
        format!(
            "UPDATE {TABLE} SET claimed_by = {}, claimed_until = {} \
             WHERE id IN ({}) AND {} \
               AND (claimed_until IS NULL OR claimed_until < {}) \
               AND NOT (requeued = 1 AND EXISTS (SELECT 1 FROM {TABLE} d \
                 WHERE d.status = 'pending' AND d.ordering_key = {TABLE}.ordering_key \
                 AND d.id > {TABLE}.id AND d.claimed_until >= {})) \
               AND NOT EXISTS (SELECT 1 FROM {TABLE} r{} \
                 WHERE r.status = 'pending' AND r.requeued = 1 \
                 AND r.ordering_key = {TABLE}.ordering_key AND r.id < {TABLE}.id \
                 AND r.id NOT IN ({}) \
                 AND (r.claimed_by IS NULL OR r.claimed_by <> {} OR r.claimed_until < {})) \
             RETURNING {JOB_COLUMNS}",
            b.bind(req.relay),
            b.bind(req.now + req.lease.as_millis() as i64),
            b.list(ids.iter().copied()),
            pending_by_id(backend),
            b.bind(req.now),
            b.bind(req.now),
            by_index(backend, "requeued"),
            b.list(ids.iter().copied()),
            b.bind(req.relay),
            b.bind(req.now)
        )
    })
}

/// The statements that pick rows by id (the lease, the renewal, the hand-back) for `relay`
/// at `now`, named, for the plan tests.
#[cfg(feature = "internals")]
pub fn by_id_statements(
    backend: DbBackend,
    relay: &str,
    now: i64,
    ids: &[i64],
) -> Vec<(&'static str, sea_orm::Statement)> {
    let req = Request {
        relay,
        now,
        lease: std::time::Duration::from_secs(60),
        want: ids.len(),
        per_chain: ids.len(),
    };
    vec![
        ("lease", lease_statement(backend, &req, ids.iter().copied())),
        (
            "renewal",
            renew_statement(backend, relay, now + 60_000, ids),
        ),
        ("hand_back", release_statement(backend, relay, ids)),
    ]
}

/// The bench's ceiling of any relay: the next `want` pending rows after id `after`, with the
/// columns a lease returns, read without a lease.
#[cfg(feature = "internals")]
pub(crate) fn read_pending_statement(
    backend: DbBackend,
    after: i64,
    want: usize,
) -> sea_orm::Statement {
    statement(backend, |b| {
        format!(
            "SELECT {JOB_COLUMNS} FROM {TABLE} \
             WHERE status = 'pending' AND id > {} ORDER BY id LIMIT {want}",
            b.bind(after)
        )
    })
}

/// Hands rows back: their lease ends now.
pub(crate) fn release_statement(
    backend: DbBackend,
    relay: &str,
    ids: &[i64],
) -> sea_orm::Statement {
    let ids = padded(ids.iter().copied());
    statement(backend, |b| {
        format!(
            "UPDATE {TABLE} SET claimed_by = NULL, claimed_until = NULL \
             WHERE id IN ({}) AND claimed_by = {} AND {}",
            b.list(ids),
            b.bind(relay),
            pending_by_id(backend)
        )
    })
}

/// Hands back every pending row leased to `relay` (a relay whose process is gone).
pub(crate) fn release_all_statement(backend: DbBackend, relay: &str) -> sea_orm::Statement {
    statement(backend, |b| {
        format!(
            "UPDATE {TABLE} SET claimed_by = NULL, claimed_until = NULL \
             WHERE claimed_by = {} AND status = 'pending'",
            b.bind(relay)
        )
    })
}

/// Extends the lease of rows `relay` holds.
pub(crate) fn renew_statement(
    backend: DbBackend,
    relay: &str,
    until: i64,
    ids: &[i64],
) -> sea_orm::Statement {
    let ids = padded(ids.iter().copied());
    statement(backend, |b| {
        format!(
            "UPDATE {TABLE} SET claimed_until = {} WHERE id IN ({}) AND claimed_by = {} \
             AND {}",
            b.bind(until),
            b.list(ids),
            b.bind(relay),
            pending_by_id(backend)
        )
    })
}
