//! The history in Redis Streams, shared by every server of a deployment (`REDIS_URL`):
//! each accepted event is appended by one Lua script that also drops redeliveries and trims
//! by age and bytes; every server reads the stream in order and delivers it to its own
//! apps.
//!
//! A lost Redis is an outage to ride out: [`RedisLink`] reconnects with backoff (an attempt
//! at most every 250 ms, so a webhook finds Redis back within a second of its return), says
//! once that Redis is unreachable and once that it is back, and never exits for it.
//! Meanwhile webhooks are answered 503 with `Retry-After`, and senders retry them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};
use serde_json::value::RawValue;

use super::{Appended, Entry, Head, NewEntry, Offset, Page, Retention, Unavailable};

/// How long a command may take before Redis counts as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The least time between two connection attempts while Redis is down.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// How long the tail's `XREAD` blocks.
const BLOCK_MS: u64 = 1_000;
/// How long an id is remembered against redeliveries.
const DEDUPE_MS: u64 = 86_400_000;

const STREAM: &str = "{vendora}:events";
const EPOCH: &str = "{vendora}:epoch";
const TRIMMED: &str = "{vendora}:trimmed";
const BYTES: &str = "{vendora}:bytes";

fn seen_key(id: &str) -> String {
    format!("{{vendora}}:seen:{id}")
}

/// Appends one event: drops it if its id was seen, else appends it under the epoch (made
/// if Redis has none: it was emptied), trims by age and bytes (never the newest), and
/// remembers the id.
const APPEND: &str = r"
local stream, epoch_key, trimmed_key, bytes_key, seen_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local has_id = ARGV[10] == '1'
if has_id and redis.call('EXISTS', seen_key) == 1 then
  return {'dup'}
end
local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', epoch_key, epoch)
end
local offset = redis.call('XADD', stream, '*', 'i', ARGV[2], 'e', ARGV[3], 'd', ARGV[4], 'r', ARGV[5], 'h', epoch, 'n', ARGV[6])
local bytes = redis.call('INCRBY', bytes_key, tonumber(ARGV[6]))
local max_bytes, oldest_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
while true do
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not first or first[1] == offset then break end
  local ms = tonumber(string.match(first[1], '^(%d+)'))
  if ms >= oldest_ms and bytes <= max_bytes then break end
  local n = 0
  for i = 1, #first[2], 2 do
    if first[2][i] == 'n' then n = tonumber(first[2][i + 1]) end
  end
  redis.call('XDEL', stream, first[1])
  bytes = redis.call('DECRBY', bytes_key, n)
  redis.call('SET', trimmed_key, first[1])
end
if has_id then
  redis.call('SET', seen_key, offset, 'PX', ARGV[9])
end
return {'ok', epoch, offset}
";

/// A connection to Redis that comes back: see the module's docs.
pub(crate) struct RedisLink {
    client: Client,
    /// The URL with its password masked, for messages.
    shown: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    down_since: Option<Instant>,
    last_attempt: Option<Instant>,
}

/// `url` with the password (and a user name, which may be a token) masked.
pub(crate) fn mask(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => "<REDIS_URL>".to_owned(),
    }
}

impl RedisLink {
    /// A link to `url` (`redis://` or `rediss://`); `ca_pem`: the root certificate to trust
    /// for `rediss://` instead of the system's. Connects lazily.
    pub(crate) fn new(url: &str, ca_pem: Option<Vec<u8>>) -> Result<RedisLink, String> {
        let shown = mask(url);
        let client = match ca_pem {
            Some(root) => Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                },
            ),
            None => Client::open(url),
        }
        .map_err(|e| format!("REDIS_URL {shown} is not usable: {e}; e.g. REDIS_URL=redis://127.0.0.1:6379 or rediss://… for TLS"))?;
        Ok(RedisLink {
            client,
            shown,
            conn: tokio::sync::Mutex::new(None),
            state: Mutex::default(),
        })
    }

    /// The URL as it may be printed.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection of its own (the tail's, whose blocking reads must not hold up the
    /// others' commands).
    async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, Unavailable> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => Ok(c),
            Err(e) => {
                self.failed(&e);
                Err(Unavailable)
            }
        }
    }

    /// The shared connection, made anew if it was lost (at most one attempt every 250 ms
    /// while Redis is down: a webhook meanwhile is answered 503 at once).
    async fn shared(&self) -> Result<MultiplexedConnection, Unavailable> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = &*conn {
            return Ok(c.clone());
        }
        {
            let mut state = self.state();
            if state.down_since.is_some()
                && state
                    .last_attempt
                    .is_some_and(|at| at.elapsed() < RETRY_EVERY)
            {
                return Err(Unavailable);
            }
            state.last_attempt = Some(Instant::now());
        }
        let c = self.connect(RESPONSE_TIMEOUT).await?;
        *conn = Some(c.clone());
        Ok(c)
    }

    /// Runs `cmd` on the shared connection.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Unavailable> {
        let mut c = self.shared().await?;
        match cmd.query_async(&mut c).await {
            Ok(v) => {
                self.succeeded();
                Ok(v)
            }
            Err(e) => {
                self.lost(&e).await;
                Err(Unavailable)
            }
        }
    }

    /// Runs `pipe` on the shared connection.
    async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, Unavailable> {
        let mut c = self.shared().await?;
        match pipe.query_async(&mut c).await {
            Ok(v) => {
                self.succeeded();
                Ok(v)
            }
            Err(e) => {
                self.lost(&e).await;
                Err(Unavailable)
            }
        }
    }

    /// A command failed: drop the shared connection if the failure was the connection's.
    async fn lost(&self, e: &redis::RedisError) {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_unrecoverable_error()
        {
            *self.conn.lock().await = None;
        }
        self.failed(e);
    }

    /// Redis answered: if it was down, say that it is back, once.
    fn succeeded(&self) {
        let was_down = self.state().down_since.take();
        if let Some(since) = was_down {
            crate::log::info(format_args!(
                "Redis at {} is reachable again after {:.1} s; serving webhooks",
                self.shown,
                since.elapsed().as_secs_f64()
            ));
        }
    }

    /// Redis did not answer: if it was up, say so, once.
    fn failed(&self, e: &redis::RedisError) {
        let mut state = self.state();
        if state.down_since.is_none() {
            state.down_since = Some(Instant::now());
            drop(state);
            crate::log::warn(format_args!(
                "Redis at {} is unreachable ({}); webhooks are answered 503 with Retry-After \
                 until it is back (senders retry them), apps wait; retrying every {} ms",
                self.shown,
                describe(e),
                RETRY_EVERY.as_millis()
            ));
        }
    }
}

/// A Redis error without the URL (which may carry a password).
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_io_error() || e.is_connection_refusal() {
        "connection refused or lost".into()
    } else {
        format!("{:?}", e.kind())
    }
}

/// The history in Redis.
pub(crate) struct RedisHistory {
    link: Arc<RedisLink>,
    retention: Retention,
    /// The tail's own connection.
    tail: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl RedisHistory {
    pub(crate) fn new(link: Arc<RedisLink>, retention: Retention) -> RedisHistory {
        RedisHistory {
            link,
            retention,
            tail: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) async fn append(&self, new: NewEntry<'_>) -> Result<Appended, Unavailable> {
        let rooms = match new.rooms {
            Some(r) => serde_json::to_string(r).unwrap_or_default(),
            None => String::new(),
        };
        let size =
            64 + new.id.map_or(0, str::len) + new.event.len() + new.data.get().len() + rooms.len();
        let oldest_ms = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(self.retention.max_age))
        .as_millis() as u64;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPEND)
            .arg(5)
            .arg(STREAM)
            .arg(EPOCH)
            .arg(TRIMMED)
            .arg(BYTES)
            .arg(seen_key(new.id.unwrap_or("")))
            // The epoch, if Redis has none (it was emptied): a new one, never one seen before.
            .arg(super::new_epoch())
            .arg(new.id.unwrap_or(""))
            .arg(new.event)
            .arg(new.data.get())
            .arg(rooms)
            .arg(size)
            .arg(self.retention.max_bytes)
            .arg(oldest_ms)
            .arg(DEDUPE_MS)
            .arg(if new.id.is_some() { "1" } else { "0" });
        let reply: Vec<String> = self.link.run(&cmd).await?;
        match reply.as_slice() {
            [dup] if dup == "dup" => Ok(Appended::Duplicate),
            [ok, epoch, offset] if ok == "ok" => offset
                .parse()
                .map(|o| Appended::New(o, epoch.as_str().into()))
                .map_err(|()| Unavailable),
            _ => Err(Unavailable),
        }
    }

    pub(crate) async fn after(&self, after: Offset, limit: usize) -> Result<Page, Unavailable> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(EPOCH)
            .arg(super::new_epoch())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(EPOCH)
            .cmd("GET")
            .arg(TRIMMED)
            .cmd("XRANGE")
            .arg(STREAM)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let (epoch, trimmed, range): (String, Option<String>, Value) =
            self.link.run_pipe(&pipe).await?;
        let trimmed: Offset = trimmed.and_then(|t| t.parse().ok()).unwrap_or(Offset::ZERO);
        Ok(Page {
            entries: entries(&range),
            covered: trimmed <= after,
            epoch: epoch.into(),
        })
    }

    pub(crate) async fn head(&self) -> Result<Head, Unavailable> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(EPOCH)
            .arg(super::new_epoch())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(EPOCH)
            .cmd("XREVRANGE")
            .arg(STREAM)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let (epoch, last): (String, Value) = self.link.run_pipe(&pipe).await?;
        Ok(Head {
            epoch: epoch.into(),
            last: entries(&last).first().map_or(Offset::ZERO, |e| e.offset),
        })
    }

    /// Blocks on its own connection (up to a second) for events after `after`.
    pub(crate) async fn wait_after(
        &self,
        after: Offset,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, Unavailable> {
        let mut tail = self.tail.lock().await;
        let mut conn = match tail.take() {
            Some(c) => c,
            None => match self
                .link
                .connect(Duration::from_millis(BLOCK_MS) + RESPONSE_TIMEOUT)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tokio::time::sleep(RETRY_EVERY).await;
                    return Err(e);
                }
            },
        };
        let read: Result<Value, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(limit)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(after.to_string())
            .query_async(&mut conn)
            .await;
        match read {
            Ok(value) => {
                *tail = Some(conn);
                self.link.succeeded();
                // `[[stream, [entries…]]]`, or nil when nothing came.
                let entries = match value {
                    Value::Array(streams) | Value::Set(streams) => streams
                        .first()
                        .and_then(|s| match s {
                            Value::Array(kv) if kv.len() == 2 => Some(entries(&kv[1])),
                            _ => None,
                        })
                        .unwrap_or_default(),
                    Value::Map(streams) => {
                        streams.first().map(|(_, v)| entries(v)).unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                Ok(entries)
            }
            Err(e) => {
                self.link.failed(&e);
                tokio::time::sleep(RETRY_EVERY).await;
                Err(Unavailable)
            }
        }
    }
}

/// The entries of an `XRANGE` / `XREAD` reply; malformed ones are skipped.
fn entries(value: &Value) -> Vec<Arc<Entry>> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items.iter().filter_map(entry).map(Arc::new).collect()
}

fn entry(item: &Value) -> Option<Entry> {
    let Value::Array(pair) = item else {
        return None;
    };
    let [id, fields] = pair.as_slice() else {
        return None;
    };
    let offset: Offset = text(id)?.parse().ok()?;
    let fields: Vec<&Value> = match fields {
        Value::Array(f) => f.iter().collect(),
        Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return None,
    };
    let get = |name: &str| -> Option<String> {
        fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && text(kv[0]).as_deref() == Some(name))
            .and_then(|kv| text(kv[1]))
    };
    let id = get("i")
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| offset.to_string());
    let event = get("e")?;
    let data = RawValue::from_string(get("d")?).ok()?;
    let rooms = match get("r") {
        Some(r) if !r.is_empty() => Some(serde_json::from_str::<Vec<String>>(&r).ok()?.into()),
        _ => None,
    };
    let epoch = get("h")?;
    Some(Entry {
        offset,
        epoch: epoch.into(),
        id: id.into(),
        event: event.into(),
        data,
        rooms,
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        assert_eq!(
            mask("redis://:hunter2@redis.internal:6379/0"),
            "redis://***@redis.internal:6379/0"
        );
        assert_eq!(
            mask("rediss://user:hunter2@10.0.0.1"),
            "rediss://***@10.0.0.1"
        );
        assert_eq!(mask("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask("hunter2"), "<REDIS_URL>");
    }
}
