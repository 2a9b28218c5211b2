//! What a relay holds, and the runs of consecutive ids among it that a frontier skips.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::delivery::ChainKey;

/// The runs of held rows one frontier skips at most (each is one more index probe), and
/// the shortest run worth skipping.
pub(super) const MAX_SKIPPED_RUNS: usize = 15;
pub(super) const MIN_SKIPPED_RUN: i64 = 8;

/// What a relay holds: rows it claimed and has not yet recorded an outcome for.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// By id: the frontier skips runs of consecutive ids (see `Held::runs`).
    pub(super) rows: BTreeMap<i64, (ChainKey, Option<ChainKey>)>,
    per_chain: HashMap<ChainKey, usize>,
    /// The newest row held of each chain: the next rows of the chain lie after it.
    newest: HashMap<ChainKey, i64>,
    /// Rows this relay held and recorded finished (delivered, dead, superseded), from its
    /// oldest row held on: no longer pending, so a run of rows held may span them (rows
    /// delivered at once interleave with those a slow chain keeps in hand).
    gone: BTreeSet<i64>,
}

/// Finished rows [`Held`] keeps at most; past it, the older half is forgotten (runs
/// across them are broken, which only costs reads).
const MAX_GONE: usize = 1 << 16;

impl Held {
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub(crate) fn ids(&self) -> Vec<i64> {
        self.rows.keys().copied().collect()
    }

    pub(crate) fn contains(&self, id: i64) -> bool {
        self.rows.contains_key(&id)
    }

    pub(super) fn chain_count(&self, key: ChainKey) -> usize {
        self.per_chain.get(&key).copied().unwrap_or(0)
    }

    /// The newest row held of `key`, if any.
    pub(super) fn newest(&self, key: ChainKey) -> Option<i64> {
        self.newest.get(&key).copied()
    }

    /// The longest runs of consecutive ids held (`first..=last`, at most
    /// [`MAX_SKIPPED_RUNS`], each of [`MIN_SKIPPED_RUN`] ids or more), in id order. No other
    /// row can lie within one (ids are unique), so the frontier may skip them instead of
    /// walking past them in the index: during a drain a relay holds thousands of the oldest
    /// pending rows, and the frontier is the first pending rows it does not hold.
    pub(crate) fn runs(&self) -> Vec<(i64, i64)> {
        let Some(&last) = self.rows.keys().next_back() else {
            return Vec::new();
        };
        // Held and finished ids merged in order, the finished ones up to the newest held
        // (beyond it they would only make runs of rows the index no longer lists).
        let mut held = self.rows.keys().copied().peekable();
        let mut gone = self.gone.range(..last).copied().peekable();
        runs_of(std::iter::from_fn(move || {
            match (held.peek(), gone.peek()) {
                (Some(h), Some(g)) if g < h => gone.next(),
                (Some(_), _) => held.next(),
                (None, _) => gone.next(),
            }
        }))
    }

    /// `id`'s outcome is recorded and it is no longer pending.
    pub(crate) fn finish(&mut self, id: i64) {
        self.remove(id);
        let Some(&oldest) = self.rows.keys().next() else {
            self.gone.clear();
            return;
        };
        if id > oldest {
            self.gone.insert(id);
        }
        if self.gone.first().is_some_and(|g| *g < oldest) {
            self.gone = self.gone.split_off(&oldest);
        }
        if self.gone.len() > MAX_GONE {
            let middle = *self.gone.iter().nth(MAX_GONE / 2).expect("more than half");
            self.gone = self.gone.split_off(&middle);
        }
    }

    pub(crate) fn insert(&mut self, id: i64, row: ChainKey, unit: Option<ChainKey>) {
        if self.rows.insert(id, (row, unit)).is_none() {
            for key in std::iter::once(row).chain(unit) {
                *self.per_chain.entry(key).or_default() += 1;
                let newest = self.newest.entry(key).or_insert(id);
                *newest = (*newest).max(id);
            }
        }
    }

    pub(crate) fn remove(&mut self, id: i64) {
        if let Some((row, unit)) = self.rows.remove(&id) {
            for key in std::iter::once(row).chain(unit) {
                if let Some(n) = self.per_chain.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_chain.remove(&key);
                        self.newest.remove(&key);
                    }
                }
            }
        }
    }
}

/// `Held::runs` of the ids held, in increasing order.
pub fn runs_of(ids: impl Iterator<Item = i64>) -> Vec<(i64, i64)> {
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in ids {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs.retain(|(first, last)| last - first + 1 >= MIN_SKIPPED_RUN);
    if runs.len() > MAX_SKIPPED_RUNS {
        runs.sort_by_key(|(first, last)| std::cmp::Reverse(last - first));
        runs.truncate(MAX_SKIPPED_RUNS);
        runs.sort_unstable();
    }
    runs
}
