//! What the generated `ActiveModelBehavior` impls call: the emit path, muting, the user's
//! own hooks, and carrying old values of watched columns from `before_save` to
//! `after_save`.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, EntityTrait};
use serde::Serialize;
use serde_json::Value;

use crate::body::WebhookBody;
use crate::delivery::{ChainKey, EventKind, Job, Order, Webhook};
use crate::observer::{Observer, warn_not_installed};
use crate::testing;
use crate::trace::TraceParent;

/// Your own lifecycle hooks on an observed entity.
///
/// A type has one `ActiveModelBehavior` impl, and `#[derive(Observed)]` writes it. To keep
/// hooks of your own (timestamps, validation), add `hooks` to the attribute and implement
/// this trait instead: the generated impl calls your `before_*` hooks first and your
/// `after_*` hooks before it emits, and emits only when they succeed. The methods mirror
/// `ActiveModelBehavior`'s, and like it the impl needs `#[async_trait]`.
///
/// ```
/// use sea_orm::{Set, entity::prelude::*};
/// use vendora_observe::{ActiveModelHooks, Observed, async_trait};
///
/// #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
/// #[sea_orm(table_name = "products")]
/// #[observe(event = "product", hooks)]
/// pub struct Model {
///     #[sea_orm(primary_key)]
///     pub id: i32,
///     pub name: String,
///     pub updated_at: i64,
/// }
///
/// #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
/// pub enum Relation {}
///
/// #[async_trait]
/// impl ActiveModelHooks for ActiveModel {
///     async fn before_save<C>(mut self, _db: &C, _insert: bool) -> Result<Self, DbErr>
///     where
///         C: ConnectionTrait,
///     {
///         self.updated_at = Set(std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64);
///         Ok(self)
///     }
/// }
/// # fn main() {}
/// ```
#[allow(unused_variables)]
#[async_trait::async_trait]
pub trait ActiveModelHooks: ActiveModelTrait + Send {
    /// As `ActiveModelBehavior::new`.
    fn new() -> Self {
        <Self as ActiveModelTrait>::default()
    }

    /// Runs before `insert`, `update` and `save`, before the observer reads old values.
    async fn before_save<C>(self, db: &C, insert: bool) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        Ok(self)
    }

    /// Runs after `insert`, `update` and `save`; the event carries the model it returns.
    async fn after_save<C>(
        model: <Self::Entity as EntityTrait>::Model,
        db: &C,
        insert: bool,
    ) -> Result<<Self::Entity as EntityTrait>::Model, DbErr>
    where
        C: ConnectionTrait,
    {
        Ok(model)
    }

    /// Runs before `delete`.
    async fn before_delete<C>(self, db: &C) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        Ok(self)
    }

    /// Runs after `delete`, before the deleted event is emitted.
    async fn after_delete<C>(self, db: &C) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        Ok(self)
    }
}

tokio::task_local! {
    static QUIET: ();
}

/// Runs `f` with observers muted: writes inside it send nothing, as Laravel's
/// `Model::withoutEvents` / `saveQuietly`. Only this task is muted; tasks it spawns are not.
/// The generated hooks do no work inside it: an update of a watched column does not read
/// the old value, no model is serialised.
///
/// ```no_run
/// # async fn f(db: &sea_orm::DatabaseConnection) {
/// vendora_observe::quietly(async {
///     // bulk import: no webhook per row
/// }).await;
/// # }
/// ```
pub fn quietly<F: Future>(f: F) -> impl Future<Output = F::Output> {
    QUIET.scope((), f)
}

/// Whether the current task is inside [`quietly`].
pub fn is_quiet() -> bool {
    QUIET.try_with(|_| ()).is_ok()
}

/// Whether the events of a write would go anywhere: not inside [`quietly`], and a test
/// recorder or an installed observer is there to take them (without either, the one
/// warning that no observer is installed). The generated hooks ask first, so that a quiet
/// or unobserved write neither reads the old values of watched columns nor serialises its
/// model.
pub fn listening(entity: &'static EntityInfo) -> bool {
    if is_quiet() {
        return false;
    }
    if testing::is_recording() || Observer::is_current() {
        return true;
    }
    warn_not_installed(entity.event);
    false
}

/// What the generated code knows of an observed entity.
#[derive(Debug)]
pub struct EntityInfo {
    /// `#[observe(event = "…")]`: the prefix of its events, and of its rows' ordering keys.
    pub event: &'static str,
    /// `#[observe(latest_wins)]`: a full-state event superseded by a newer one of the same
    /// row, still waiting, is not sent.
    pub latest_wins: bool,
}

/// One event as the generated code hands it over: its name, its kind, and its data, which
/// may have failed to serialise.
pub type Emission = (&'static str, EventKind, Result<Value, serde_json::Error>);

/// Hands the events of one write, in order, to the current observer (or the test
/// recorder). Never waits on the network; in direct mode never fails. In outbox mode the
/// rows are written through `db`, and a failure to write them is the write's failure (the
/// event would otherwise be lost). `rooms`: those of a targeted entity's row (its bodies
/// then name them), `None` for an entity whose events go to every app.
pub async fn emit<C: ConnectionTrait>(
    db: &C,
    entity: &'static EntityInfo,
    key: &str,
    events: Vec<Emission>,
    rooms: Option<Vec<String>>,
) -> Result<(), DbErr> {
    if events.is_empty() || is_quiet() {
        return Ok(());
    }
    let recorder = testing::current();
    let observer = if recorder.is_some() {
        None
    } else {
        match Observer::current() {
            Some(o) => Some(o),
            None => {
                warn_not_installed(events[0].0);
                return Ok(());
            }
        }
    };
    let ordering_key = format!("{}:{key}", entity.event);
    let unit_key = match &observer {
        Some(o) if o.order() == Order::Causal => Some(unit_key()),
        _ => None,
    };
    let row = ChainKey::row(&ordering_key);
    let unit = unit_key.as_deref().map(ChainKey::unit);
    let mut jobs = Vec::with_capacity(events.len());
    // The write's place in its trace (the application's, with OpenTelemetry); its events
    // are children of the write's span.
    let span = tracing::Span::current();
    let trace = TraceParent::of_span(&span).unwrap_or_else(TraceParent::start);
    for (event, kind, data) in events {
        if kind == EventKind::Watch {
            check_watch_name(event, entity.event);
        }
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                // The write succeeded; the caller must not see an error for its webhook.
                crate::diagnostics::error(
                    crate::diagnostics::Kind::Delivery,
                    format_args!(
                        "webhook {event} for {ordering_key} not sent: its data cannot be \
                         serialised to JSON: {e}"
                    ),
                );
                continue;
            }
        };
        let body = match &rooms {
            Some(rooms) => WebhookBody::targeted(event, &data, &unique_rooms(rooms)),
            None => WebhookBody::from_value(event, &data),
        };
        if let Some(recorder) = &recorder {
            recorder.push(entity.event, key, body);
            continue;
        }
        jobs.push(Job {
            webhook: std::sync::Arc::new(Webhook::new(body).in_trace(trace)),
            row,
            unit,
            kind,
            coalesce: entity.latest_wins,
            attempts: 0,
            token: 0,
            born: std::time::SystemTime::now(),
            span: span.clone(),
        });
    }
    match observer {
        Some(observer) if !jobs.is_empty() => {
            observer
                .submit(
                    db,
                    is_autocommit::<C>().then_some(entity.event),
                    &ordering_key,
                    unit_key.as_deref(),
                    jobs,
                )
                .await
        }
        _ => Ok(()),
    }
}

/// A part of a `room = "…"` template: its text, or a field's value.
pub enum RoomPiece<'a> {
    /// Text as written in the template.
    Text(&'a str),
    /// A field's value: a string as it is, a number or a boolean as JSON prints it.
    Value(Result<Value, serde_json::Error>),
}

/// Fills a room template and adds the room to `rooms`. A field that is `null` (an `Option`
/// that is `None`) names no room: the row is in none of that template's rooms.
pub fn push_room(rooms: &mut Vec<String>, pieces: &[RoomPiece<'_>]) {
    let mut room = String::new();
    for piece in pieces {
        match piece {
            RoomPiece::Text(text) => room.push_str(text),
            RoomPiece::Value(Ok(Value::String(s))) => room.push_str(s),
            RoomPiece::Value(Ok(Value::Null)) => return,
            RoomPiece::Value(Ok(other)) => room.push_str(&other.to_string()),
            RoomPiece::Value(Err(e)) => {
                tracing::warn!(
                    "a room of the event could not be made: its field does not serialise: {e}"
                );
                return;
            }
        }
    }
    rooms.push(room);
}

/// The rooms in the order first given, each once.
fn unique_rooms(rooms: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::with_capacity(rooms.len());
    for room in rooms {
        if !out.contains(&room.as_str()) {
            out.push(room);
        }
    }
    out
}

/// What `before_delete` found of a targeted row's rooms, for its `after_delete`: `None`
/// when the row was not there (nothing is deleted, and no app is told).
#[derive(Debug)]
pub struct DeleteRooms(pub Option<Vec<String>>);

/// A targeted delete of a row that was not there: nothing was deleted, so no event.
pub fn note_delete_without_row(entity: &'static str, key: &str) {
    tracing::debug!(
        entity,
        key,
        "deleted event not sent: the row was not there, so nothing was deleted"
    );
}

/// Reports, once per name, a watch event name that two entities emit (`watch = "status"`
/// on orders and on categories both send `status:updated`): apps cannot tell them apart.
fn check_watch_name(name: &'static str, entity: &'static str) {
    static OWNERS: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    static REPORTED: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let owner = *OWNERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name)
        .or_insert(entity);
    if owner == entity {
        return;
    }
    let mut reported = REPORTED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if reported.contains(&name) {
        return;
    }
    reported.push(name);
    crate::diagnostics::warn(
        crate::diagnostics::Kind::Setup,
        format_args!(
            "`{name}` is sent by two entities, `{owner}` and `{entity}`, so apps cannot tell \
             them apart; give one its own name, e.g. #[observe(event = \"{entity}\", \
             watch({field} = \"{entity}_{field}:updated\"))]",
            field = name.split(':').next().unwrap_or(name)
        ),
    );
}

/// The unit of work the current code runs in: the Tokio task (so a request handler, and
/// every transaction it runs), or the thread outside a task. Unique across processes, so
/// that outbox rows of two instances never share a unit.
fn unit_key() -> String {
    static PROCESS: OnceLock<String> = OnceLock::new();
    let process = PROCESS.get_or_init(|| format!("{:016x}", fastrand::u64(..)));
    match tokio::task::try_id() {
        Some(id) => format!("{process}-{id}"),
        None => format!("{process}-{:?}", std::thread::current().id()),
    }
}

/// Whether `C` is a plain connection, whose every statement commits on its own
/// (autocommit). `false` for a transaction, and for connection types this cannot tell.
pub fn is_autocommit<C: ConnectionTrait>() -> bool {
    std::any::type_name::<C>() == std::any::type_name::<sea_orm::DatabaseConnection>()
}

/// The data of an event: the value's `Serialize` form.
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, serde_json::Error> {
    serde_json::to_value(value)
}

/// An object of named parts, in order.
pub fn object<const N: usize>(
    entries: [(&str, Result<Value, serde_json::Error>); N],
) -> Result<Value, serde_json::Error> {
    let mut map = serde_json::Map::with_capacity(N);
    for (k, v) in entries {
        map.insert(k.to_owned(), v?);
    }
    Ok(Value::Object(map))
}

/// The ordering key of a row: its primary key as compact JSON (`7`, `"sku-1"`, `[1,2]`).
pub fn key_string<T: Serialize + ?Sized>(pk: &T) -> String {
    serde_json::to_string(pk).unwrap_or_else(|_| String::from("?"))
}

/// Which save an old value belongs to: the task (or thread) running it, the entity and
/// the row. A save runs its `before_save` and `after_save` in the same task, one after
/// the other.
#[derive(Hash, PartialEq, Eq, Clone, Debug)]
struct StashKey {
    origin: Origin,
    entity: TypeId,
    key: String,
}

#[derive(Hash, PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) enum Origin {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

pub(crate) fn origin() -> Origin {
    match tokio::task::try_id() {
        Some(id) => Origin::Task(id),
        None => Origin::Thread(std::thread::current().id()),
    }
}

struct Stash {
    entries: HashMap<StashKey, (Instant, Box<dyn Any + Send>)>,
    swept: Option<Instant>,
}

fn stash_map() -> std::sync::MutexGuard<'static, Stash> {
    static STASH: OnceLock<Mutex<Stash>> = OnceLock::new();
    STASH
        .get_or_init(|| {
            Mutex::new(Stash {
                entries: HashMap::new(),
                swept: None,
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// An entry this old belongs to a save that failed between its hooks (so its `after_save`
/// never came); entries are swept at most this often.
const STASH_TTL: Duration = Duration::from_secs(60);

fn stash_key<E: 'static>(key: String) -> StashKey {
    StashKey {
        origin: origin(),
        entity: TypeId::of::<E>(),
        key,
    }
}

/// Keeps what `before_save` read for `after_save` of the same save, replacing what an
/// earlier save of the same row in this task left (one that failed in between).
pub fn stash<E: 'static, T: Any + Send>(key: String, value: T) {
    let k = stash_key::<E>(key);
    let now = Instant::now();
    let mut map = stash_map();
    if map
        .swept
        .is_none_or(|at| now.duration_since(at) >= STASH_TTL)
    {
        map.entries
            .retain(|_, (at, _)| now.duration_since(*at) < STASH_TTL);
        map.swept = Some(now);
    }
    map.entries.insert(k, (now, Box::new(value)));
}

/// Takes what [`stash`] kept for this save, if anything.
pub fn take_stash<E: 'static, T: Any>(key: &str) -> Option<T> {
    let k = stash_key::<E>(key.to_owned());
    let (_, value) = stash_map().entries.remove(&k)?;
    value.downcast::<T>().ok().map(|b| *b)
}

/// Drops what an earlier, failed save of this row in this task left: a save that reads no
/// old value must not find one in its `after_save`.
pub fn discard_stash<E: 'static>(key: &str) {
    let k = stash_key::<E>(key.to_owned());
    let mut map = stash_map();
    if !map.entries.is_empty() {
        map.entries.remove(&k);
    }
}

/// Logs that the old value of watched columns could not be read; the watch events are
/// then sent as if the value changed (a spurious refresh beats a missed one).
pub fn warn_old_value_unread(entity: &'static str, key: &str, error: &DbErr) {
    tracing::warn!(
        entity,
        key,
        "could not read the old value of watched columns, treating them as changed: {error}"
    );
}

/// Logs a delete whose ActiveModel carries no primary key: no event can name the row.
pub fn warn_delete_without_key(entity: &'static str) {
    tracing::warn!(
        entity,
        "deleted event not sent: the ActiveModel has no primary key value"
    );
}
