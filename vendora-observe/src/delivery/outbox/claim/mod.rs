//! The claim: which pending rows a relay may take now without breaking any chain's order,
//! at a cost that follows what it returns, not the size of the table.
//!
//! A row may be sent once every earlier pending row of each of its chains (its row's
//! `ordering_key`, its unit of work's `unit_key`) is delivered, dead, or held by the same
//! relay (which sends its rows in chain order). The steps:
//!
//! 1. **Frontier.** The oldest pending rows that this relay does not hold, by id: a prefix
//!    of the table's pending rows, so any earlier pending row of a row's chain is in it. The
//!    claimable ones are found in memory, in id order: a row is taken when it is free (no
//!    live lease of another relay) and due, and no earlier row of its chains was passed
//!    over. A hot row's backlog is taken as a run of consecutive rows ("several consecutive
//!    events per chain"), up to a per-chain cap, so it streams. The index is read around
//!    the runs of consecutive ids the relay holds (in a drain, thousands of the oldest
//!    rows), not through them.
//! 2. **Unit runs.** When the frontier gives little (several tasks wrote long transactions,
//!    and most of them lie beyond it), the units of work with pending rows are found by a
//!    loose index scan over their keys, and each unit's next rows are read after the newest
//!    one held, each with its predecessor on its row and on its unit: a row is taken when
//!    both are this relay's, or taken now.
//! 3. **Skip scan.** When the frontier is all blocked (a chain retrying or leased by another
//!    relay, with a backlog longer than the frontier), the heads of other rows' chains are
//!    found by a loose index scan over the pending rows' keys, a bounded number of keys per
//!    claim, resuming where the last one stopped, at most once a second: one index probe
//!    per chain, never a walk over a blocked backlog.
//! 4. **Lease.** The chosen rows are leased in one `UPDATE … WHERE` that takes only rows
//!    still free (a compare-and-set, so two relays never hold one row). Should another
//!    relay have won a row meanwhile, the rows of its chains behind it are handed back.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult};

mod held;
mod session;
mod statements;

pub(crate) use held::Held;
#[cfg(feature = "internals")]
pub use held::runs_of;
pub(crate) use session::ClaimConnection;
use session::Plan;
#[cfg(feature = "internals")]
pub use statements::IN_INDEX_ORDER;
#[cfg(feature = "internals")]
pub use statements::by_id_statements;
#[cfg(any(test, feature = "internals"))]
pub use statements::frontier_statement;
#[cfg(feature = "internals")]
pub(crate) use statements::read_pending_statement;
use statements::{
    Run, SORT_AGAIN, frontier_text, lease_statement, unit_runs_statement, unit_scan_statement,
};
pub use statements::{frontier_settings, skip_scan_statement};
pub(crate) use statements::{
    leased_elsewhere_statement, release_all_statement, release_statement, renew_statement,
};

use crate::body::WebhookBody;
use crate::delivery::{ChainKey, EventKind, Job, Webhook};
use crate::trace::TraceParent;

/// A pending row as the claim sees it before leasing it.
#[derive(Debug, Clone)]
struct Candidate {
    id: i64,
    row: ChainKey,
    unit: Option<ChainKey>,
    claimed_until: Option<i64>,
    next_attempt_at: i64,
    /// Unit runs only: the pending rows just before it on its row and on its unit.
    prev_key: Option<i64>,
    prev_unit: Option<i64>,
}

impl Candidate {
    fn from_row(r: &QueryResult) -> Result<Candidate, DbErr> {
        let key: String = r.try_get("", "ordering_key")?;
        let unit: Option<String> = r.try_get("", "unit_key")?;
        Ok(Candidate {
            id: r.try_get("", "id")?,
            row: ChainKey::row(&key),
            unit: unit.as_deref().map(ChainKey::unit),
            claimed_until: r.try_get("", "claimed_until")?,
            next_attempt_at: r.try_get("", "next_attempt_at")?,
            prev_key: r.try_get("", "prev_key").unwrap_or(None),
            prev_unit: r.try_get("", "prev_unit").unwrap_or(None),
        })
    }

    fn all(rows: &[QueryResult]) -> Result<Vec<Candidate>, DbErr> {
        rows.iter().map(Candidate::from_row).collect()
    }

    fn chains(&self) -> impl Iterator<Item = ChainKey> + use<> {
        std::iter::once(self.row).chain(self.unit)
    }

    fn free(&self, now: i64) -> bool {
        self.claimed_until.is_none_or(|until| until < now)
    }
}

/// What a claim found.
#[derive(Debug, Default)]
pub(crate) struct Claimed {
    /// Leased rows, in id order, as scheduler jobs (`token` is the row id).
    pub(crate) jobs: Vec<Job>,
    /// The earliest `next_attempt_at` of a free row that was not due yet.
    pub(crate) next_due: Option<i64>,
    /// When the first lease of the frontier's rows leased to another relay ends, if there
    /// are such rows.
    pub(crate) leased_elsewhere: Option<i64>,
    /// How many pending rows this relay does not hold, when the frontier read them all (it
    /// came back short of its window).
    pub(crate) pending_seen: Option<u64>,
}

/// The claim's memory between runs: where the scans over keys and units resume.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    after_key: String,
    after_unit: String,
    /// When the skip scan over keys last ran (it is the slow path, for stuck frontiers).
    last_skip_scan: Option<i64>,
    /// Unit runs that found nothing in a row, and when to read them again.
    unit_misses: u32,
    units_again_at: i64,
    /// The last frontier came back full: a backlog (see [`frontier_settings`]).
    backlog: bool,
}

/// The most pending rows one frontier reads.
const MAX_WINDOW: usize = 4096;

/// Units of work whose runs one claim reads at most.
const UNITS_PER_CLAIM: usize = 16;

/// The parameters of one claim.
pub(crate) struct Request<'a> {
    pub(crate) relay: &'a str,
    pub(crate) now: i64,
    pub(crate) lease: Duration,
    pub(crate) want: usize,
    /// Rows of one chain the relay holds at most: half of what it may hold, so that a hot
    /// row streams, yet cannot take every slot from the other rows. (With a quarter, 64 of
    /// 256 in earlier measurements, the transactions of several tasks on ten shared rows
    /// could not overlap: each row's cap was filled by the first two or three of them, and
    /// PostgreSQL drained that backlog at 55-75% of the distinct-rows rate; with half,
    /// 89-103%.)
    pub(crate) per_chain: usize,
}

/// A claim that failed.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: DbErr,
    /// Whether the lease statement was sent: rows may be leased without our knowing.
    pub(crate) leased: bool,
}

/// Chooses up to `req.want` rows and leases them to `req.relay`.
pub(crate) async fn claim(
    db: &DatabaseConnection,
    conn: &mut ClaimConnection,
    held: &Held,
    cursor: &mut Cursor,
    req: Request<'_>,
) -> Result<Claimed, Failure> {
    let read = |error| Failure {
        error,
        leased: false,
    };
    let leased = |error| Failure {
        error,
        leased: true,
    };
    let backend = db.get_database_backend();
    let window = (4 * req.want).clamp(64, MAX_WINDOW);
    let mut session = conn.session(db);
    // The settings matter only when far more rows are pending than the frontier reads: only
    // behind a full frontier.
    let runs = held.runs();
    let frontier = session
        .frontier(
            |b| frontier_text(b, req.relay, window, &runs),
            frontier_settings(backend, cursor.backlog).map(|set| (set, SORT_AGAIN)),
        )
        .await
        .and_then(|rows| Candidate::all(&rows))
        .map_err(read)?;
    cursor.backlog = frontier.len() == window;
    let pending_seen = (frontier.len() < window).then_some(frontier.len() as u64);
    let leased_elsewhere = frontier
        .iter()
        .filter_map(|c| c.claimed_until.filter(|until| *until >= req.now))
        .min();
    let mut choice = Choice::new(held, req.now, req.want, req.per_chain);
    for c in &frontier {
        choice.consider(c);
    }
    // Units of work whose oldest rows lie beyond the frontier (several tasks writing long
    // transactions): each unit's next rows, with their predecessors on both chains. Only
    // when the frontier gave little: the frontier is the cheaper read.
    if choice.chosen.len() < req.want / 2
        && frontier.len() == window
        && req.now >= cursor.units_again_at
    {
        let units = session
            .read(
                unit_scan_statement(backend, &cursor.after_unit, UNITS_PER_CLAIM),
                Plan::EachTime,
            )
            .await
            .map_err(read)?
            .iter()
            .map(|r| r.try_get::<String>("", "u"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read)?;
        cursor.after_unit = match units.last() {
            Some(u) if units.len() >= UNITS_PER_CLAIM => u.clone(),
            _ => String::new(),
        };
        // Units already holding their share send first; read only what the others can take.
        // A unit's next rows lie after its newest row held (an index range, not a walk).
        let units: Vec<Run> = units
            .into_iter()
            .map(|u| {
                let key = ChainKey::unit(&u);
                Run {
                    rows: req.per_chain.saturating_sub(held.chain_count(key)),
                    after: held.newest(key).unwrap_or(0),
                    unit: u,
                }
            })
            .filter(|run| run.rows > 0)
            .collect();
        if !units.is_empty() {
            let mut runs = session
                .read(
                    unit_runs_statement(backend, req.relay, &units),
                    Plan::Cached,
                )
                .await
                .and_then(|rows| Candidate::all(&rows))
                .map_err(read)?;
            runs.sort_by_key(|c| c.id);
            let before = choice.chosen.len();
            for c in &runs {
                choice.consider_run(c);
            }
            // Runs that all wait behind rows in flight (hot rows several units share)
            // yield nothing until those are delivered: look again later, 10 ms after the
            // first miss, up to 160 ms after repeated ones, at once after a hit.
            if choice.chosen.len() == before {
                cursor.unit_misses = (cursor.unit_misses + 1).min(5);
                cursor.units_again_at = req.now + (5 << cursor.unit_misses);
            } else {
                cursor.unit_misses = 0;
            }
        }
    }
    // The frontier is full and yields too little: its rows belong to blocked chains with
    // long backlogs. Look past them, key by key; this is the slow path, for chains without
    // a unit (per-row order), run at most once per second.
    let skip_due = cursor.last_skip_scan.is_none_or(|at| req.now - at >= 1_000);
    if choice.chosen.len() < req.want && frontier.len() == window && skip_due {
        cursor.last_skip_scan = Some(req.now);
        let beyond = frontier.last().map_or(0, |c| c.id);
        let probes = (4 * req.want).clamp(16, 1024);
        let rows = session
            .read(
                skip_scan_statement(backend, &cursor.after_key, probes, beyond),
                Plan::EachTime,
            )
            .await
            .map_err(read)?;
        let mut last_key = None;
        for r in &rows {
            last_key = Some(r.try_get::<String>("", "k").map_err(read)?);
            if r.try_get::<Option<i64>>("", "id").map_err(read)?.is_none() {
                continue;
            }
            let c = Candidate::from_row(r).map_err(read)?;
            if !held.contains(c.id) {
                choice.consider(&c);
            }
        }
        // Fewer keys than probes: the scan reached the last key; start over next time.
        cursor.after_key = match last_key {
            Some(k) if rows.len() >= probes => k,
            _ => String::new(),
        };
    }
    let next_due = choice.next_due;
    let mut chosen = choice.chosen;
    chosen.sort_by_key(|c| c.id);
    if chosen.is_empty() {
        session.end().await;
        return Ok(Claimed {
            jobs: Vec::new(),
            next_due,
            leased_elsewhere,
            pending_seen,
        });
    }
    let statement = lease_statement(backend, &req, chosen.iter().map(|c| c.id));
    let rows = session.lease(statement).await.map_err(leased)?;
    let mut jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(leased)?;
    jobs.sort_by_key(|j| j.token);
    // Rows another relay leased between our read and our update: whatever we got behind
    // them in their chains must go back.
    let won: HashSet<i64> = jobs.iter().map(|j| j.token).collect();
    let mut lost_chains = HashSet::new();
    let mut give_back = Vec::new();
    for c in &chosen {
        if !won.contains(&c.id) {
            lost_chains.extend(c.chains());
        } else if c.chains().any(|k| lost_chains.contains(&k)) {
            give_back.push(c.id);
            lost_chains.extend(c.chains());
        }
    }
    if !give_back.is_empty() {
        jobs.retain(|j| !give_back.contains(&j.token));
        db.execute_raw(release_statement(backend, req.relay, &give_back))
            .await
            .map_err(leased)?;
    }
    Ok(Claimed {
        jobs,
        next_due,
        leased_elsewhere,
        pending_seen,
    })
}

/// The in-memory half of the claim: walks candidates in id order.
struct Choice<'a> {
    held: &'a Held,
    now: i64,
    want: usize,
    per_chain: usize,
    blocked: HashSet<ChainKey>,
    taken: HashMap<ChainKey, usize>,
    chosen: Vec<Candidate>,
    /// Rows already considered (taken or not).
    seen: HashSet<i64>,
    /// Rows taken.
    accepted: HashSet<i64>,
    next_due: Option<i64>,
}

impl<'a> Choice<'a> {
    fn new(held: &'a Held, now: i64, want: usize, per_chain: usize) -> Self {
        Choice {
            held,
            now,
            want,
            per_chain,
            blocked: HashSet::new(),
            taken: HashMap::new(),
            chosen: Vec::new(),
            seen: HashSet::new(),
            accepted: HashSet::new(),
            next_due: None,
        }
    }

    fn room(&self, k: ChainKey) -> bool {
        self.held.chain_count(k) + self.taken.get(&k).copied().unwrap_or(0) < self.per_chain
    }

    fn take(&mut self, c: &Candidate) {
        for k in c.chains() {
            *self.taken.entry(k).or_default() += 1;
        }
        self.accepted.insert(c.id);
        self.chosen.push(c.clone());
    }

    /// A row read with its predecessors: taken when each is this relay's or taken now (so
    /// everything before it in its chains is), and it is free and due.
    fn consider_run(&mut self, c: &Candidate) {
        if !self.seen.insert(c.id) || self.held.contains(c.id) {
            return;
        }
        let ours =
            |p: Option<i64>| p.is_none_or(|p| self.held.contains(p) || self.accepted.contains(&p));
        let ok = c.free(self.now)
            && c.next_attempt_at <= self.now
            && self.chosen.len() < self.want
            && ours(c.prev_key)
            && ours(c.prev_unit)
            && c.chains().all(|k| self.room(k));
        if ok {
            self.take(c);
        }
    }

    /// A row of the frontier (a prefix of the pending rows, in id order) or a head found by
    /// the skip scan.
    fn consider(&mut self, c: &Candidate) {
        // A row held under an identity the relay left behind (after a failed claim) is
        // still in the scheduler: the rows behind it may be taken and queue behind it.
        if !self.seen.insert(c.id) || self.held.contains(c.id) {
            return;
        }
        let free = c.free(self.now);
        let due = c.next_attempt_at <= self.now;
        if free && !due {
            self.next_due = Some(
                self.next_due
                    .map_or(c.next_attempt_at, |d| d.min(c.next_attempt_at)),
            );
        }
        let ok = free
            && due
            && self.chosen.len() < self.want
            && c.chains()
                .all(|k| !self.blocked.contains(&k) && self.room(k));
        if ok {
            self.take(c);
        } else {
            // Nothing behind it in its chains may go before it.
            self.blocked.extend(c.chains());
        }
    }
}

/// The columns [`job_from_row`] reads.
pub(crate) const JOB_COLUMNS: &str = "id, event_id, ordering_key, unit_key, event, kind, latest_wins, body, \
                           attempts, created_at, traceparent";

pub(crate) fn job_from_row(r: &QueryResult) -> Result<Job, DbErr> {
    let event: String = r.try_get("", "event")?;
    let body: String = r.try_get("", "body")?;
    let key: String = r.try_get("", "ordering_key")?;
    let unit: Option<String> = r.try_get("", "unit_key")?;
    let kind: String = r.try_get("", "kind")?;
    let latest_wins: i16 = r.try_get("", "latest_wins")?;
    let attempts: i32 = r.try_get("", "attempts")?;
    let created_at: i64 = r.try_get("", "created_at")?;
    // Rows written before the column existed start a trace of their own.
    let trace: Option<String> = r.try_get("", "traceparent")?;
    let trace = trace
        .as_deref()
        .and_then(TraceParent::parse)
        .unwrap_or_else(TraceParent::start);
    Ok(Job {
        webhook: std::sync::Arc::new(Webhook::stored(
            r.try_get("", "event_id")?,
            WebhookBody::from_stored(&event, body.into_bytes()),
            trace,
        )),
        row: ChainKey::row(&key),
        unit: unit.as_deref().map(ChainKey::unit),
        kind: EventKind::parse(&kind),
        coalesce: latest_wins != 0,
        attempts: attempts.max(0) as u32,
        token: r.try_get("", "id")?,
        born: UNIX_EPOCH + Duration::from_millis(created_at.max(0) as u64),
        span: tracing::Span::none(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::lease::{RequeueLock, under_requeue_lock};
    use super::held::{MAX_SKIPPED_RUNS, runs_of};
    use super::statements::padded;
    use super::*;

    fn cand(id: i64, row: &str, unit: Option<&str>) -> Candidate {
        Candidate {
            id,
            row: ChainKey::row(row),
            unit: unit.map(ChainKey::unit),
            claimed_until: None,
            next_attempt_at: 0,
            prev_key: None,
            prev_unit: None,
        }
    }

    const PER_CHAIN: usize = 64;

    fn choose(held: &Held, cands: &[Candidate], want: usize) -> Vec<i64> {
        let mut choice = Choice::new(held, 10, want, PER_CHAIN);
        for c in cands {
            choice.consider(c);
        }
        choice.chosen.iter().map(|c| c.id).collect()
    }

    #[test]
    fn a_blocked_row_blocks_what_follows_it_in_either_chain() {
        let mut leased = cand(1, "p:1", Some("t:a"));
        leased.claimed_until = Some(100); // another relay's live lease
        let cands = [
            leased,
            cand(2, "p:1", Some("t:b")), // behind 1 on its row
            cand(3, "p:2", Some("t:a")), // behind 1 on its unit
            cand(4, "p:3", Some("t:b")), // behind 2 on its unit
            cand(5, "p:4", Some("t:c")), // unrelated
            cand(6, "p:4", Some("t:c")), // behind 5, which is taken: a run
        ];
        assert_eq!(choose(&Held::default(), &cands, 10), [5, 6]);
    }

    #[test]
    fn rows_behind_held_rows_are_taken_and_a_chain_is_capped() {
        let mut held = Held::default();
        held.insert(1, ChainKey::row("p:1"), None);
        let cands: Vec<Candidate> = (2..100).map(|id| cand(id, "p:1", None)).collect();
        let got = choose(&held, &cands, 1000);
        assert_eq!(got, (2..2 + PER_CHAIN as i64 - 1).collect::<Vec<_>>());
    }

    #[test]
    fn rows_not_due_block_their_chains_and_say_when_they_are() {
        let mut later = cand(1, "p:1", None);
        later.next_attempt_at = 50;
        let held = Held::default();
        let mut choice = Choice::new(&held, 10, 10, PER_CHAIN);
        for c in [later, cand(2, "p:1", None), cand(3, "p:2", None)] {
            choice.consider(&c);
        }
        assert_eq!(choice.chosen.iter().map(|c| c.id).collect::<Vec<_>>(), [3]);
        assert_eq!(choice.next_due, Some(50));
    }

    #[test]
    fn a_run_row_is_taken_only_behind_rows_that_are_ours() {
        let mut held = Held::default();
        held.insert(10, ChainKey::row("p:1"), Some(ChainKey::unit("t")));
        let run = |id, prev_key, prev_unit| Candidate {
            prev_key,
            prev_unit,
            ..cand(id, &format!("p:{id}"), Some("t"))
        };
        let mut choice = Choice::new(&held, 10, 10, PER_CHAIN);
        choice.consider_run(&run(11, None, Some(10))); // behind a held row: taken
        choice.consider_run(&run(12, None, Some(11))); // behind a row taken now: taken
        choice.consider_run(&run(13, Some(5), Some(12))); // its row has an older row: not
        choice.consider_run(&run(14, None, Some(13))); // behind one not taken: not
        assert_eq!(
            choice.chosen.iter().map(|c| c.id).collect::<Vec<_>>(),
            [11, 12]
        );
    }

    #[test]
    fn runs_are_the_longest_stretches_of_consecutive_held_ids_in_id_order() {
        let mut held = Held::default();
        let key = ChainKey::row("p:1");
        // 1..=20 (20 ids), 30..=33 (too short), 40..=47 (8), 100..=139 (40).
        for id in (1..=20).chain(30..=33).chain(40..=47).chain(100..=139) {
            held.insert(id, key, None);
        }
        assert_eq!(held.runs(), [(1, 20), (40, 47), (100, 139)]);
        held.remove(10);
        assert_eq!(held.runs(), [(1, 9), (11, 20), (40, 47), (100, 139)]);
        // More runs than a frontier skips: the longest ones, still in id order.
        let mut many = Held::default();
        for run in 0..(MAX_SKIPPED_RUNS as i64 + 5) {
            for id in 0..(8 + run) {
                many.insert(run * 1_000 + id, key, None);
            }
        }
        let runs = many.runs();
        assert_eq!(runs.len(), MAX_SKIPPED_RUNS);
        assert_eq!(runs[0], (5_000, 5_012));
        assert!(runs.windows(2).all(|w| w[0].1 < w[1].0), "{runs:?}");
    }

    /// The frontier that skips the held runs returns exactly what the frontier that walks
    /// past them does, over random tables (statuses, leases of this relay and another,
    /// held sets with and without runs), for several windows.
    /// A requeue that committed after the frontier was read put an older row of the same
    /// row in front: the lease does not take the newer one over it, unless the relay holds
    /// the older one.
    #[tokio::test]
    async fn a_row_is_not_leased_over_an_older_requeued_row_of_another_relay_or_none() {
        use sea_orm::Database;
        let db = Database::connect("sqlite::memory:").await.unwrap();
        super::super::create_table(&db).await.unwrap();
        db.execute_unprepared(
            "INSERT INTO vendora_outbox (id, event_id, ordering_key, event, body, status, \
             next_attempt_at, created_at, requeued) VALUES \
             (1, 'old', 'p:1', 'product:updated', '{}', 'pending', 0, 0, 1), \
             (2, 'new', 'p:1', 'product:updated', '{}', 'pending', 0, 0, 0), \
             (3, 'other', 'p:2', 'product:updated', '{}', 'pending', 0, 0, 0)",
        )
        .await
        .unwrap();
        let req = Request {
            relay: "me",
            now: 1_000,
            lease: Duration::from_secs(60),
            want: 8,
            per_chain: 8,
        };
        let leased = |ids: &'static [i64]| {
            let db = db.clone();
            let statement = lease_statement(db.get_database_backend(), &req, ids.iter().copied());
            async move {
                let mut got: Vec<i64> = under_requeue_lock(&db, RequeueLock::Shared, statement)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.try_get::<i64>("", "id").unwrap())
                    .collect();
                got.sort_unstable();
                got
            }
        };
        // The frontier missed the requeued row: the newer one stays, the other row goes.
        assert_eq!(leased(&[2, 3]).await, [3]);
        // Both chosen: both leased, in one claim.
        assert_eq!(leased(&[1, 2]).await, [1, 2]);
        // Once the relay holds the requeued row, the newer one follows it too.
        db.execute_unprepared(
            "UPDATE vendora_outbox SET claimed_by = NULL, claimed_until = NULL WHERE id = 2",
        )
        .await
        .unwrap();
        assert_eq!(leased(&[2]).await, [2]);
    }

    #[tokio::test]
    async fn skipping_held_runs_returns_the_same_frontier() {
        use sea_orm::Database;
        let db = Database::connect("sqlite::memory:").await.unwrap();
        super::super::create_table(&db).await.unwrap();
        let backend = db.get_database_backend();
        let mut rng = fastrand::Rng::with_seed(28);
        // Cases whose runs span rows the relay finished (delivered among rows it holds).
        let mut spanning = 0;
        for case in 0..60 {
            db.execute_unprepared("DELETE FROM vendora_outbox")
                .await
                .unwrap();
            let mut held = Held::default();
            let mut finished = Vec::new();
            let mut id = 0;
            let mut values = Vec::new();
            while id < 400 {
                // Stretches of one kind of row, as drains leave them.
                let kind = rng.u8(0..5);
                for _ in 0..rng.i64(1..40) {
                    id += 1;
                    let (status, by) = match kind {
                        0 => ("'delivered'", "NULL"),
                        1 | 2 => ("'pending'", "'me'"),
                        3 => ("'pending'", "'other'"),
                        _ => ("'pending'", "NULL"),
                    };
                    if by == "'me'" {
                        held.insert(id, ChainKey::row(&format!("p:{}", id % 7)), None);
                    }
                    // Rows this relay delivered itself: runs span them.
                    if kind == 0 && rng.bool() {
                        held.insert(id, ChainKey::row(&format!("p:{}", id % 7)), None);
                        finished.push(id);
                    }
                    values.push(format!(
                        "({id}, 'e{case}-{id}', 'p:{}', 'product:updated', '{{}}', {status}, \
                         0, 0, {by}, {})",
                        id % 7,
                        if by == "NULL" { "NULL" } else { "99" }
                    ));
                }
            }
            db.execute_unprepared(&format!(
                "INSERT INTO vendora_outbox (id, event_id, ordering_key, event, body, status, \
                 next_attempt_at, created_at, claimed_by, claimed_until) VALUES {}",
                values.join(", ")
            ))
            .await
            .unwrap();
            for id in finished {
                held.finish(id);
            }
            let runs = held.runs();
            if runs != runs_of(held.rows.keys().copied()) {
                spanning += 1;
            }
            for window in [1, 7, 64, 500] {
                let ids = |skip: &[(i64, i64)]| {
                    let statement = frontier_statement(backend, "me", window, skip);
                    let db = &db;
                    async move {
                        db.query_all_raw(statement)
                            .await
                            .unwrap()
                            .iter()
                            .map(|r| r.try_get::<i64>("", "id").unwrap())
                            .collect::<Vec<_>>()
                    }
                };
                assert_eq!(
                    ids(&runs).await,
                    ids(&[]).await,
                    "case {case}, window {window}, runs {runs:?}"
                );
            }
        }
        assert!(
            spanning > 10,
            "only {spanning} cases had runs across finished rows"
        );
    }

    #[test]
    fn id_lists_are_padded_to_few_lengths() {
        assert_eq!(padded([1, 2, 3].into_iter()), [1, 2, 3, 3, 3, 3, 3, 3]);
        assert_eq!(padded((0..9).map(i64::from)).len(), 16);
    }
}
