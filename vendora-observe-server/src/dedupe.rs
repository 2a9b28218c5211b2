//! [`Dedupe`]: remembers the ids of events already handled, to drop redeliveries.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::MAX_ID;

/// Remembers the ids of events already handled (a retry carries the same id), bounded in
/// entries and in bytes: the oldest are forgotten first. An id is recorded only once its
/// event was handled ([`Ticket::done`]): a failed broadcast leaves it unrecorded, so the
/// sender's retry is handled, not dropped as a duplicate.
#[derive(Debug)]
pub struct Dedupe {
    max_entries: usize,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    done: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
    bytes: usize,
    in_progress: HashSet<Box<str>>,
}

/// What [`Dedupe::claim`] found.
#[derive(Debug)]
#[must_use = "a first claim must be completed with `done()` once the event was handled"]
pub enum Claim<'a> {
    /// Not seen: handle the event, then call [`Ticket::done`].
    First(Ticket<'a>),
    /// Already handled: acknowledge without handling it again.
    Seen,
    /// Being handled right now by another request (a retry racing its original): answer
    /// 503 with `Retry-After` (senders retry 5xx, not 409) so that the sender comes back.
    InProgress,
}

/// The right to handle an event; dropped without [`done`](Self::done), the id is released
/// unrecorded.
#[derive(Debug)]
pub struct Ticket<'a> {
    dedupe: &'a Dedupe,
    id: Box<str>,
    finished: bool,
}

impl Default for Dedupe {
    /// 100,000 ids or 8 MiB of them, whichever comes first.
    fn default() -> Self {
        Dedupe::new(100_000, 8 << 20)
    }
}

impl Dedupe {
    /// Remembers at most `max_entries` ids and `max_bytes` of them.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Dedupe {
            max_entries: max_entries.max(1),
            max_bytes: max_bytes.max(MAX_ID),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `id` for handling. Ids longer than [`MAX_ID`] are never stored (the
    /// [`Verifier`](super::Verifier) refuses them before).
    pub fn claim(&self, id: &str) -> Claim<'_> {
        let mut state = self.lock();
        if state.done.contains(id) {
            return Claim::Seen;
        }
        if id.len() > MAX_ID || !state.in_progress.insert(id.into()) {
            return Claim::InProgress;
        }
        Claim::First(Ticket {
            dedupe: self,
            id: id.into(),
            finished: false,
        })
    }

    /// How many ids are remembered, and their bytes.
    pub fn len(&self) -> (usize, usize) {
        let state = self.lock();
        (state.done.len(), state.bytes)
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.lock().done.is_empty()
    }

    fn record(&self, id: &str) {
        let mut state = self.lock();
        state.in_progress.remove(id);
        if !state.done.insert(id.into()) {
            return;
        }
        state.order.push_back(id.into());
        state.bytes += id.len();
        while state.done.len() > self.max_entries || state.bytes > self.max_bytes {
            let Some(old) = state.order.pop_front() else {
                break;
            };
            state.bytes -= old.len();
            state.done.remove(&old);
        }
    }

    fn release(&self, id: &str) {
        self.lock().in_progress.remove(id);
    }
}

impl Ticket<'_> {
    /// The event was handled: remember its id.
    pub fn done(mut self) {
        self.finished = true;
        self.dedupe.record(&self.id);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.dedupe.release(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(d: &Dedupe, id: &str) -> bool {
        match d.claim(id) {
            Claim::First(t) => {
                t.done();
                true
            }
            _ => false,
        }
    }

    #[test]
    fn an_id_is_recorded_only_once_handled() {
        let d = Dedupe::default();
        let Claim::First(ticket) = d.claim("a") else {
            panic!("fresh")
        };
        assert!(matches!(d.claim("a"), Claim::InProgress), "a racing retry");
        drop(ticket); // the broadcast failed
        assert!(first(&d, "a"), "the retry is handled");
        assert!(matches!(d.claim("a"), Claim::Seen));
    }

    #[test]
    fn memory_is_bounded_by_entries_and_by_bytes() {
        let d = Dedupe::new(2, 1_000);
        assert!(first(&d, "a") && first(&d, "b") && first(&d, "c"));
        assert_eq!(d.len().0, 2);
        assert!(first(&d, "a"), "the oldest was forgotten");
        let d = Dedupe::new(1_000, 300);
        for i in 0..10 {
            assert!(first(&d, &format!("{i:0>100}")));
        }
        let (n, bytes) = d.len();
        assert!(bytes <= 300 && n == 3, "{n} ids, {bytes} bytes");
        assert!(matches!(
            d.claim(&"x".repeat(MAX_ID + 1)),
            Claim::InProgress
        ));
        assert_eq!(d.len().0, 3);
    }
}
