//! A test double for your own test suites, as Laravel's `Http::fake()`: capture the events
//! a block of code emits, without HTTP.
//!
//! The recorder is scoped to the task that runs the block, so tests running in parallel
//! each see only their own events. Inside a recording scope nothing is sent, whatever
//! observer is installed.
//!
//! ```no_run
//! use vendora_observe::testing::Recorder;
//!
//! # async fn t(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
//! let recorder = Recorder::new();
//! recorder.scope(async {
//!     // product.insert(db).await?; product.update(db).await?; …
//!     Ok::<_, sea_orm::DbErr>(())
//! }).await?;
//! assert_eq!(recorder.names(), ["product:created", "product:updated", "stock:updated"]);
//! assert_eq!(recorder.events()[2].data()["newStock"], 7);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::body::WebhookBody;

/// One captured event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// The entity's event prefix (`product`).
    pub entity: &'static str,
    /// The row's primary key as compact JSON.
    pub key: String,
    /// The exact body that would have been signed and sent.
    pub body: WebhookBody,
}

impl RecordedEvent {
    /// The event name (`product:created`).
    pub fn name(&self) -> &str {
        self.body.event()
    }

    /// The event's data, parsed back from the body.
    pub fn data(&self) -> Value {
        self.part("data").unwrap_or(Value::Null)
    }

    /// The rooms of a targeted entity's event (`#[observe(room = …)]`), parsed back from
    /// the body; `None` for an event every app receives.
    pub fn rooms(&self) -> Option<Vec<String>> {
        serde_json::from_value(self.part("rooms")?).ok()
    }

    fn part(&self, key: &str) -> Option<Value> {
        serde_json::from_slice::<Value>(self.body.as_bytes())
            .ok()
            .and_then(|mut v| v.get_mut(key).map(Value::take))
    }
}

/// Captures events emitted inside [`Recorder::scope`].
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<RecordedEvent>>>,
}

tokio::task_local! {
    static RECORDER: Recorder;
}

pub(crate) fn current() -> Option<Recorder> {
    RECORDER.try_with(Recorder::clone).ok()
}

/// Whether a recorder is capturing this task's events (no clone).
pub(crate) fn is_recording() -> bool {
    RECORDER.try_with(|_| ()).is_ok()
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f`, capturing the events its writes emit. May be used several times, and on
    /// several tasks (clone the recorder into spawned tasks and scope them too).
    pub fn scope<F: Future>(&self, f: F) -> impl Future<Output = F::Output> + use<F> {
        RECORDER.scope(self.clone(), f)
    }

    pub(crate) fn push(&self, entity: &'static str, key: &str, body: WebhookBody) {
        self.lock().push(RecordedEvent {
            entity,
            key: key.to_owned(),
            body,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything captured so far, in order.
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.lock().clone()
    }

    /// The names of the events captured so far, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|e| e.name().to_owned()).collect()
    }

    /// The captured events named `name`.
    pub fn named(&self, name: &str) -> Vec<RecordedEvent> {
        self.lock()
            .iter()
            .filter(|e| e.name() == name)
            .cloned()
            .collect()
    }

    /// Forgets what was captured.
    pub fn clear(&self) {
        self.lock().clear();
    }
}
