//! One ordered history of the events a deployment accepted, which apps catch up from: in
//! memory for one server, in Redis Streams (`REDIS_URL`) for several, which then all
//! deliver from it, in its order.
//!
//! Each event gets an [`Offset`] in the stream, and the stream has an *epoch*, which
//! changes whenever history is lost (a server restarted without Redis, Redis emptied): an
//! app that comes back with an offset of another epoch cannot be caught up, and is told to
//! refetch (`vendora:resync`) instead of being left stale. History is kept for a bounded
//! time and a bounded number of bytes ([`Retention`]); an app whose offset is older than
//! what is kept is told to refetch too.
//!
//! Appending also drops redeliveries: an id already in the history (within a day, in
//! Redis; within the bounded [`Dedupe`](crate::Dedupe), in memory) is not appended twice,
//! and the check and the append are one step, so a retry racing its original cannot
//! slip in between.

mod memory;
pub(crate) mod redis;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

pub(crate) use memory::Memory;
pub(crate) use redis::{RedisHistory, RedisLink};

/// How long and how much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Events older than this are dropped (default 10 minutes).
    pub max_age: Duration,
    /// The events kept weigh at most this many bytes (default 64 MiB): the oldest go first.
    pub max_bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(600),
            max_bytes: 64 << 20,
        }
    }
}

/// An event's place in the history: `<milliseconds>-<sequence>`, as Redis Streams number
/// their entries (the memory history numbers its own the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Offset {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
}

impl Offset {
    /// Before every event.
    pub(crate) const ZERO: Offset = Offset { ms: 0, seq: 0 };
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Offset {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        Ok(Offset {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// One event in the history.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) offset: Offset,
    /// The epoch it was appended in.
    pub(crate) epoch: Arc<str>,
    /// Its `X-Webhook-Id` (the offset, for a sender that sent none).
    pub(crate) id: Box<str>,
    pub(crate) event: Box<str>,
    /// `data`, as JSON text: sent to each app as it is.
    pub(crate) data: Box<RawValue>,
    /// `None`: for every app.
    pub(crate) rooms: Option<Box<[String]>>,
}

impl Entry {
    /// What it weighs, for the history's byte bound.
    pub(crate) fn size(&self) -> usize {
        64 + self.id.len()
            + self.event.len()
            + self.data.get().len()
            + self
                .rooms
                .as_deref()
                .map_or(0, |r| r.iter().map(|r| r.len() + 8).sum())
    }

    /// What travels with the event to the app, as its last argument.
    pub(crate) fn meta(&self) -> Meta<'_> {
        Meta {
            id: &self.id,
            offset: self.offset.to_string(),
            epoch: &self.epoch,
        }
    }
}

/// `{"id", "offset", "epoch"}`: the last argument of every event an app receives.
#[derive(Debug, Serialize)]
pub(crate) struct Meta<'a> {
    pub(crate) id: &'a str,
    pub(crate) offset: String,
    pub(crate) epoch: &'a str,
}

/// An event to append.
pub(crate) struct NewEntry<'a> {
    pub(crate) id: Option<&'a str>,
    pub(crate) event: &'a str,
    pub(crate) data: &'a RawValue,
    pub(crate) rooms: Option<&'a [String]>,
}

/// What [`History::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Appended at this offset, in this epoch.
    New(Offset, Arc<str>),
    /// Its id is in the history already: a redelivery.
    Duplicate,
}

/// The history cannot be reached (Redis is down): try again.
#[derive(Debug, Clone)]
pub(crate) struct Unavailable;

/// What follows an offset.
pub(crate) struct Page {
    pub(crate) entries: Vec<Arc<Entry>>,
    /// Whether every event after the offset is still kept (else some were dropped).
    pub(crate) covered: bool,
    /// The epoch now.
    pub(crate) epoch: Arc<str>,
}

/// Where the history stands: its epoch and its last offset.
pub(crate) struct Head {
    pub(crate) epoch: Arc<str>,
    pub(crate) last: Offset,
}

/// The history of one server, or of every server sharing a Redis.
pub(crate) enum History {
    Memory(Memory),
    Redis(RedisHistory),
}

impl History {
    pub(crate) async fn append(&self, entry: NewEntry<'_>) -> Result<Appended, Unavailable> {
        match self {
            History::Memory(m) => Ok(m.append(entry)),
            History::Redis(r) => r.append(entry).await,
        }
    }

    /// Up to `limit` events after `after`, in order.
    pub(crate) async fn after(&self, after: Offset, limit: usize) -> Result<Page, Unavailable> {
        match self {
            History::Memory(m) => Ok(m.after(after, limit)),
            History::Redis(r) => r.after(after, limit).await,
        }
    }

    /// The events after `after` (up to `limit`), waiting up to a second for some: what
    /// the server's tail reads to deliver live.
    pub(crate) async fn wait_after(
        &self,
        after: Offset,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, Unavailable> {
        match self {
            History::Memory(m) => Ok(m.wait_after(after, limit).await),
            History::Redis(r) => r.wait_after(after, limit).await,
        }
    }

    pub(crate) async fn head(&self) -> Result<Head, Unavailable> {
        match self {
            History::Memory(m) => Ok(m.head()),
            History::Redis(r) => r.head().await,
        }
    }
}

/// 16 random hex digits: a new epoch.
pub(crate) fn new_epoch() -> String {
    use std::hash::{BuildHasher, RandomState};
    let n = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("{n:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_print_and_parse_as_stream_ids_and_order_by_time_then_sequence() {
        let a: Offset = "1765000000000-0".parse().unwrap();
        let b: Offset = "1765000000000-1".parse().unwrap();
        let c: Offset = "1765000000001-0".parse().unwrap();
        assert!(Offset::ZERO < a && a < b && b < c);
        assert_eq!(b.to_string(), "1765000000000-1");
        assert!("12".parse::<Offset>().is_err());
        assert!("a-1".parse::<Offset>().is_err());
    }
}
