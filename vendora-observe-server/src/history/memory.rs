//! The history of one server, in its memory: lost when it stops, so each start is a new
//! epoch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::{Appended, Entry, Head, NewEntry, Offset, Page, Retention};
use crate::{Claim, Dedupe};

pub(crate) struct Memory {
    state: Mutex<State>,
    appended: Notify,
    epoch: Arc<str>,
    retention: Retention,
    seen: Dedupe,
}

#[derive(Default)]
struct State {
    entries: VecDeque<Arc<Entry>>,
    bytes: usize,
    /// The last offset given out.
    last: Offset,
    /// The newest offset dropped: events after it are all kept.
    trimmed: Offset,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Memory {
    pub(crate) fn new(retention: Retention) -> Memory {
        Memory {
            state: Mutex::default(),
            appended: Notify::new(),
            epoch: super::new_epoch().into(),
            retention,
            seen: Dedupe::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn append(&self, new: NewEntry<'_>) -> Appended {
        let mut state = self.lock();
        let ticket = match new.id.map(|id| self.seen.claim(id)) {
            Some(Claim::First(ticket)) => Some(ticket),
            // In progress cannot happen under this lock but for an over-long id, which the
            // verifier refuses first.
            Some(Claim::Seen | Claim::InProgress) => return Appended::Duplicate,
            None => None,
        };
        let now = now_ms();
        let offset = if now > state.last.ms {
            Offset { ms: now, seq: 0 }
        } else {
            Offset {
                ms: state.last.ms,
                seq: state.last.seq + 1,
            }
        };
        let entry = Arc::new(Entry {
            offset,
            epoch: self.epoch.clone(),
            id: new.id.map_or_else(|| offset.to_string().into(), Into::into),
            event: new.event.into(),
            data: new.data.to_owned(),
            rooms: new.rooms.map(Into::into),
        });
        state.last = offset;
        state.bytes += entry.size();
        state.entries.push_back(entry);
        self.trim(&mut state, now);
        if let Some(ticket) = ticket {
            ticket.done();
        }
        drop(state);
        self.appended.notify_waiters();
        Appended::New(offset, self.epoch.clone())
    }

    /// Drops what is too old or over the byte bound, oldest first; the newest stays.
    fn trim(&self, state: &mut State, now: u64) {
        let oldest_kept = now.saturating_sub(self.retention.max_age.as_millis() as u64);
        while state.entries.len() > 1 {
            let front = &state.entries[0];
            if front.offset.ms >= oldest_kept && state.bytes <= self.retention.max_bytes {
                break;
            }
            let dropped = state.entries.pop_front().expect("not empty");
            state.bytes -= dropped.size();
            state.trimmed = dropped.offset;
        }
    }

    pub(crate) fn after(&self, after: Offset, limit: usize) -> Page {
        let mut state = self.lock();
        self.trim(&mut state, now_ms());
        Page {
            entries: Self::read(&state, after, limit),
            covered: state.trimmed <= after,
            epoch: self.epoch.clone(),
        }
    }

    fn read(state: &State, after: Offset, limit: usize) -> Vec<Arc<Entry>> {
        let start = state.entries.partition_point(|e| e.offset <= after);
        state.entries.range(start..).take(limit).cloned().collect()
    }

    pub(crate) async fn wait_after(&self, after: Offset, limit: usize) -> Vec<Arc<Entry>> {
        let appended = self.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let found = Self::read(&self.lock(), after, limit);
        if !found.is_empty() {
            return found;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), appended).await;
        Self::read(&self.lock(), after, limit)
    }

    pub(crate) fn head(&self) -> Head {
        Head {
            epoch: self.epoch.clone(),
            last: self.lock().last,
        }
    }

    /// The bytes the events kept weigh.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn new<'a>(id: &'a str, data: &'a RawValue) -> NewEntry<'a> {
        NewEntry {
            id: Some(id),
            event: "stock:updated",
            data,
            rooms: None,
        }
    }

    #[test]
    fn offsets_grow_redeliveries_are_dropped_and_reads_page_in_order() {
        let m = Memory::new(Retention::default());
        let data = RawValue::from_string(r#"{"productId":1}"#.into()).unwrap();
        let offsets: Vec<Offset> = (0..5)
            .map(|i| match m.append(new(&format!("id-{i}"), &data)) {
                Appended::New(o, _) => o,
                Appended::Duplicate => panic!("fresh"),
            })
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m.append(new("id-2", &data)), Appended::Duplicate);
        let page = m.after(offsets[1], 2);
        assert!(page.covered);
        let ids: Vec<&str> = page.entries.iter().map(|e| &*e.id).collect();
        assert_eq!(ids, ["id-2", "id-3"]);
        assert_eq!(m.after(offsets[4], 10).entries.len(), 0);
        assert_eq!(m.head().last, offsets[4]);
    }

    #[test]
    fn history_is_bounded_by_bytes_and_a_gap_is_reported() {
        let m = Memory::new(Retention {
            max_age: Duration::from_secs(600),
            max_bytes: 10_000,
        });
        let big = RawValue::from_string(format!("\"{}\"", "x".repeat(1_000))).unwrap();
        let first = match m.append(new("first", &big)) {
            Appended::New(o, _) => o,
            Appended::Duplicate => panic!(),
        };
        for i in 0..50 {
            m.append(new(&format!("id-{i}"), &big));
        }
        assert!(m.bytes() <= 10_000, "{} bytes", m.bytes());
        let page = m.after(first, 100);
        assert!(!page.covered, "the events right after `first` were dropped");
        assert!(m.after(Offset::ZERO, 100).entries.len() < 10);
        let newest = m.head().last;
        assert!(m.after(newest, 1).covered);
    }

    #[test]
    fn history_is_bounded_by_age() {
        let m = Memory::new(Retention {
            max_age: Duration::ZERO,
            max_bytes: usize::MAX,
        });
        let data = RawValue::from_string("1".into()).unwrap();
        m.append(new("a", &data));
        std::thread::sleep(Duration::from_millis(5));
        m.append(new("b", &data));
        // The newest is always kept; older ones past the age are gone.
        let page = m.after(Offset::ZERO, 10);
        assert_eq!(page.entries.len(), 1);
        assert!(!page.covered);
    }
}
