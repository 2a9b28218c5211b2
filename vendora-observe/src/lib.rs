//! # vendora-observe
//!
//! Real-time sync for point-of-sale apps: every create, update and delete of an observed
//! SeaORM entity becomes an HMAC-signed webhook to the WebSocket server, which rebroadcasts
//! it to every connected app.
//!
//! The parts:
//! - [`macro@Observed`]: `#[derive(Observed)]` on a SeaORM `Model` writes its
//!   `ActiveModelBehavior`, so inserts, updates and deletes emit events;
//! - [`Observer`]: takes those events and delivers them in the background, with retries,
//!   per-row order and dead-lettering; installed once at start-up;
//! - [`WebhookConfig`]: settings, validated when made; [`WebhookBody`]: the exact signed
//!   bytes, JS-stable; [`signature`]: sign and verify; [`WebhookService`]: one signed POST;
//! - [`quietly`] mutes a block of code; [`testing::Recorder`] captures events in tests.
//!
//! # Example
//!
//! An observed entity on in-memory SQLite, with the events captured by the test recorder
//! (an installed [`Observer`] would send them as signed webhooks instead):
//!
//! ```
//! use sea_orm::entity::prelude::*;
//! use sea_orm::{ActiveValue::NotSet, ConnectionTrait, Database, Schema, Set};
//! use vendora_observe::{Observed, testing::Recorder};
//!
//! mod product {
//!     use sea_orm::entity::prelude::*;
//!     use vendora_observe::Observed;
//!
//!     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
//!     #[sea_orm(table_name = "products")]
//!     #[observe(event = "product", watch = "stock")]
//!     pub struct Model {
//!         #[sea_orm(primary_key)]
//!         pub id: i32,
//!         pub name: String,
//!         pub stock: i32,
//!     }
//!
//!     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
//!     pub enum Relation {}
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let db = Database::connect("sqlite::memory:").await?;
//! db.execute(&Schema::new(db.get_database_backend()).create_table_from_entity(product::Entity))
//!     .await?;
//!
//! let recorder = Recorder::new();
//! recorder
//!     .scope(async {
//!         let beans = product::ActiveModel { id: NotSet, name: Set("Beans".into()), stock: Set(10) }
//!             .insert(&db)
//!             .await?;
//!         let mut am: product::ActiveModel = beans.into();
//!         am.stock = Set(7);
//!         am.update(&db).await?;
//!         Ok::<_, DbErr>(())
//!     })
//!     .await?;
//!
//! assert_eq!(recorder.names(), ["product:created", "product:updated", "stock:updated"]);
//! assert_eq!(
//!     recorder.events()[2].body.as_str(),
//!     r#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#
//! );
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod body;
mod bypass;
pub mod config;
pub mod delivery;
mod diagnostics;
mod error;
mod hooks;
mod observer;
pub mod signature;
pub mod telemetry;
pub mod testing;
pub mod trace;

pub use async_trait::async_trait;
pub use body::{BodyError, WebhookBody};
pub use bypass::detect_bypass;
pub use config::{ConfigError, Secret, WebhookConfig, WebhookConfigBuilder};
pub use delivery::outbox::{self, Outbox, OutboxOptions, OutboxRow};
pub use delivery::{
    DeadLetter, Delivered, DeliveryError, Order, Overflow, RetryPolicy, Stats, Webhook,
    WebhookService,
};
pub use error::{ErrorChain, StartError};
pub use hooks::{ActiveModelHooks, is_quiet, quietly};
pub use observer::{Observer, ObserverBuilder, ShutdownReport};
pub use signature::{sign, verify};

/// `#[derive(Observed)]`: every `insert`, `update`, `save` and `delete` of a SeaORM entity
/// sends a signed webhook.
///
/// Put it beside `DeriveEntityModel` on the entity's `Model`, with `serde::Serialize` (the
/// full-model events send the model's `Serialize` form, so `#[serde(...)]` attributes shape
/// them) and one `#[observe(...)]` attribute. It writes the entity's
/// `ActiveModelBehavior` impl:
///
/// - do **not** write `impl ActiveModelBehavior for ActiveModel {}` yourself (sea-orm-cli
///   generates that line: delete it). Both would implement the trait, and the compiler
///   reports E0119 "conflicting implementations of trait `ActiveModelBehavior`" at
///   `Observed`. To keep hooks of your own, use [`hooks`](#hooks).
/// - only `ActiveModel::{insert, update, save, delete}` and `Model::delete` run hooks:
///   `insert_many`, `update_many`, `delete_many` and raw SQL send nothing (see
///   [`detect_bypass`]).
///
/// Events go to the installed [`Observer`]; in tests, a [`testing::Recorder`] captures them
/// (as below). Inside [`quietly`] nothing is sent.
///
/// # `event = "E"` (required)
///
/// The prefix of the event names: `E:created` and `E:updated` carry the full model,
/// `E:deleted` carries `{"id": <primary key>}` (a composite key is an object of its
/// columns). The prefix has no `:` and no spaces.
///
/// ```
/// # use sea_orm::{entity::prelude::*, ActiveValue::NotSet, Database, Schema, Set};
/// # use vendora_observe::testing::Recorder;
/// mod category {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
///     #[sea_orm(table_name = "categories")]
///     #[observe(event = "category")]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///         pub name: String,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), DbErr> {
/// # let db = Database::connect("sqlite::memory:").await?;
/// # db.execute(&Schema::new(db.get_database_backend()).create_table_from_entity(category::Entity)).await?;
/// let recorder = Recorder::new();
/// recorder
///     .scope(async {
///         let c = category::ActiveModel { id: NotSet, name: Set("Tea".into()) }.insert(&db).await?;
///         let mut am: category::ActiveModel = c.into();
///         am.name = Set("Green tea".into());
///         am.update(&db).await?.delete(&db).await?;
///         Ok::<_, DbErr>(())
///     })
///     .await?;
/// assert_eq!(recorder.names(), ["category:created", "category:updated", "category:deleted"]);
/// assert_eq!(recorder.events()[1].data()["name"], "Green tea");
/// assert_eq!(recorder.events()[2].body.as_str(), r#"{"event":"category:deleted","data":{"id":1}}"#);
/// # Ok(()) }
/// ```
///
/// # `on(created, updated, deleted)`
///
/// Only these events (default: all three). Orders are never deleted, so:
///
/// ```
/// # use sea_orm::{entity::prelude::*, ActiveValue::NotSet, Database, Schema, Set};
/// # use vendora_observe::testing::Recorder;
/// mod order {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
///     #[sea_orm(table_name = "orders")]
///     #[observe(event = "order", on(created, updated))]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///         pub status: String,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), DbErr> {
/// # let db = Database::connect("sqlite::memory:").await?;
/// # db.execute(&Schema::new(db.get_database_backend()).create_table_from_entity(order::Entity)).await?;
/// let recorder = Recorder::new();
/// recorder
///     .scope(async {
///         let o = order::ActiveModel { id: NotSet, status: Set("paid".into()) }.insert(&db).await?;
///         o.delete(&db).await?;
///         Ok::<_, DbErr>(())
///     })
///     .await?;
/// assert_eq!(recorder.names(), ["order:created"]);
/// # Ok(()) }
/// ```
///
/// # `watch = "f"`, `watch(f, g = "name")`
///
/// After `E:updated`, also `f:updated` with `{"<E>Id": <primary key>, "new<F>": <value>}`
/// (camelCase), only when the stored value differed before the write, as Laravel's
/// `wasChanged`: `Set(same value)` is not a change. `g = "name"` names that event. Several
/// `watch` keys add up. The old value is read in `before_save` through the write's own
/// connection (inside a transaction it locks the row, so concurrent writers each report
/// their real change), and only when the watched column is `Set`.
///
/// ```
/// # use sea_orm::{entity::prelude::*, ActiveValue::NotSet, Database, Schema, Set};
/// # use vendora_observe::testing::Recorder;
/// mod product {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
///     #[sea_orm(table_name = "products")]
///     #[observe(event = "product", watch(stock, price = "price:changed"))]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///         pub stock: i32,
///         pub price: f64,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), DbErr> {
/// # let db = Database::connect("sqlite::memory:").await?;
/// # db.execute(&Schema::new(db.get_database_backend()).create_table_from_entity(product::Entity)).await?;
/// let recorder = Recorder::new();
/// recorder
///     .scope(async {
///         let p = product::ActiveModel { id: NotSet, stock: Set(10), price: Set(2.5) }
///             .insert(&db)
///             .await?;
///         let mut am: product::ActiveModel = p.into();
///         am.stock = Set(7);
///         am.price = Set(2.5); // the same price: not a change
///         am.update(&db).await?;
///         Ok::<_, DbErr>(())
///     })
///     .await?;
/// assert_eq!(recorder.names(), ["product:created", "product:updated", "stock:updated"]);
/// assert_eq!(
///     recorder.events()[2].body.as_str(),
///     r#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#
/// );
/// # Ok(()) }
/// ```
///
/// # `room = "store:{store_id}"`, `rooms_with = "path"`
///
/// An entity whose rows belong to some apps only declares its rooms, and each of its
/// events names them in the signed body: `{"event":…,"data":…,"rooms":["store:1"]}`. The
/// WebSocket server sends such an event only to the apps whose token holds one of its
/// rooms (an app token `APP_TOKENS=till-7=store:1`, or minted with rooms); an event
/// without rooms reaches every app. `room` is a template over the model's fields (checked
/// at compile time; `{{` and `}}` for braces; a field that is `None` names no room), and may
/// be given several times. `rooms_with` names a function `fn(&Model) -> Vec<String>` for
/// rooms a template cannot express.
///
/// Every event of a targeted entity carries its rooms: `created`, `updated`, watch events
/// and `deleted`, also when the `ActiveModel` given to `delete` holds only the primary key
/// (the row is read first, inside the delete's transaction; a delete of a row that is not
/// there sends nothing). An update that changes a field of a template also tells the rooms
/// the row leaves (the stored row is read, as for `watch`); with `rooms_with`, the rooms
/// are those of the row after the write.
///
/// ```
/// # use sea_orm::{entity::prelude::*, ActiveValue::NotSet, Database, Schema, Set};
/// # use vendora_observe::testing::Recorder;
/// mod order {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
///     #[sea_orm(table_name = "orders")]
///     #[observe(event = "order", room = "store:{store_id}", rooms_with = "super::head_office")]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///         pub store_id: i32,
///         pub total: i32,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
/// }
///
/// /// Large orders are head office's business too.
/// fn head_office(order: &order::Model) -> Vec<String> {
///     if order.total > 1000 { vec!["hq".into()] } else { vec![] }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), DbErr> {
/// # let db = Database::connect("sqlite::memory:").await?;
/// # db.execute(&Schema::new(db.get_database_backend()).create_table_from_entity(order::Entity)).await?;
/// let recorder = Recorder::new();
/// recorder
///     .scope(async {
///         order::ActiveModel { id: NotSet, store_id: Set(1), total: Set(5000) }.insert(&db).await?;
///         order::ActiveModel { id: Set(1), ..Default::default() }.delete(&db).await
///     })
///     .await?;
/// let events = recorder.events();
/// assert_eq!(events[0].rooms().unwrap(), ["store:1", "hq"]);
/// assert_eq!(
///     events[1].body.as_str(),
///     r#"{"event":"order:deleted","data":{"id":1},"rooms":["store:1","hq"]}"#
/// );
/// # Ok(()) }
/// ```
///
/// # `latest_wins`
///
/// Latest-wins coalescing: when a row has a backlog (the receiver is slow or down), an
/// `E:updated` or watch event that a newer event of the same row and kind already waiting
/// behind it supersedes is not sent, and counted in [`Stats::superseded`]. An app then sees
/// every `E:created` and `E:deleted`, and of each run of updates of a row at least the
/// last, in order. Without a backlog every event is sent. For entities whose apps only need
/// the current state (prices, stock levels); leave it off where apps count the updates.
///
/// ```
/// mod price {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
///     #[sea_orm(table_name = "prices")]
///     #[observe(event = "price", watch = "amount", latest_wins)]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///         pub amount: i32,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
/// }
/// ```
///
/// # `hooks`
///
/// A type has one `ActiveModelBehavior` impl, and the derive writes it. With `hooks`, the
/// generated impl also runs your [`ActiveModelHooks`] impl (the same methods, the same
/// `#[async_trait]`): your `before_*` first, your `after_*` before the event is emitted, and
/// the event carries the model your `after_save` returns.
///
/// ```
/// mod note {
///     use sea_orm::{Set, entity::prelude::*};
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
///     #[sea_orm(table_name = "notes")]
///     #[observe(event = "note", hooks)]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///         pub text: String,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
///
///     #[vendora_observe::async_trait]
///     impl vendora_observe::ActiveModelHooks for ActiveModel {
///         async fn before_save<C>(mut self, _db: &C, _insert: bool) -> Result<Self, DbErr>
///         where
///             C: ConnectionTrait,
///         {
///             let text = self.text.clone().unwrap();
///             self.text = Set(text.trim().to_owned());
///             Ok(self)
///         }
///     }
/// }
/// ```
///
/// # `crate = "path"`
///
/// Where `vendora_observe` is, when it is renamed or re-exported (the generated code names
/// everything through it):
///
/// ```
/// /// The application's own façade over its dependencies.
/// mod deps {
///     pub use ::vendora_observe::*;
/// }
///
/// mod tag {
///     use sea_orm::entity::prelude::*;
///
///     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, crate::deps::Observed)]
///     #[sea_orm(table_name = "tags")]
///     #[observe(event = "tag", crate = "crate::deps")]
///     pub struct Model {
///         #[sea_orm(primary_key)]
///         pub id: i32,
///     }
///
///     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
///     pub enum Relation {}
/// }
/// # fn main() {}
/// ```
///
/// # Compile errors
///
/// A wrong attribute gets one message at the offending token:
///
/// ```text
/// error: `watch` names no field of `Model`: there is no `stok`; did you mean `stock`?
///  --> src/entities/product.rs:7:38
///   |
/// 7 | #[observe(event = "product", watch = "stok")]
///   |                                      ^^^^^^
/// ```
pub use vendora_observe_macros::Observed;

/// What generated code names. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::bypass::expect_write;
    pub use crate::delivery::EventKind;
    pub use crate::hooks::{
        ActiveModelHooks, DeleteRooms, Emission, EntityInfo, RoomPiece, discard_stash, emit,
        is_autocommit, key_string, listening, note_delete_without_row, object, push_room, stash,
        take_stash, to_value, warn_delete_without_key, warn_old_value_unread,
    };
    pub use async_trait::async_trait;
    pub use sea_orm;

    /// The outbox claim's statements, for the query-plan tests; the relay's database work
    /// alone and the ceiling of any relay, for the bench (feature `internals`).
    #[cfg(feature = "internals")]
    pub mod outbox_plan {
        pub use crate::delivery::outbox::claim::{
            IN_INDEX_ORDER, by_id_statements, frontier_settings, frontier_statement, runs_of,
            skip_scan_statement,
        };
        pub use crate::delivery::outbox::internals::drain_without_sending;
        pub use crate::observer::send_without_writing;
    }
    pub use serde;
    pub use serde_json;

    /// Implemented by every `Serialize` type: the derive asks for it so that a model
    /// without `Serialize` gets one clear error.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` must implement `serde::Serialize` to be observed",
        label = "add `Serialize` to this struct's `#[derive(...)]`",
        note = "the full-model events (`created`, `updated`) send the model's `Serialize` form"
    )]
    pub trait ObservedModel: serde::Serialize {}
    impl<T: serde::Serialize> ObservedModel for T {}

    /// The data of a full-model event. The bound is [`ObservedModel`] rather than
    /// `Serialize` so that a model without `Serialize` gets one clear error.
    pub fn model_value<T: ObservedModel + ?Sized>(
        model: &T,
    ) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(model)
    }
}
