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
pub mod receiver;
pub mod signature;
pub mod testing;

pub use async_trait::async_trait;
pub use body::{BodyError, WebhookBody};
pub use bypass::detect_bypass;
pub use config::{ConfigError, Secret, WebhookConfig, WebhookConfigBuilder};
pub use delivery::outbox::{self, Outbox, OutboxOptions, OutboxRow};
pub use delivery::{
    DeadLetter, Delivered, DeliveryError, Order, Overflow, RetryPolicy, Stats, Webhook,
    WebhookService,
};
pub use error::StartError;
pub use hooks::{ActiveModelHooks, is_quiet, quietly};
pub use observer::{Observer, ObserverBuilder, ShutdownReport};
pub use signature::{sign, verify};

/// `#[derive(Observed)]`: emit signed webhooks for a SeaORM entity's writes.
pub use vendora_observe_macros::Observed;

/// What generated code names. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::bypass::expect_write;
    pub use crate::delivery::EventKind;
    pub use crate::hooks::{
        ActiveModelHooks, Emission, EntityInfo, discard_stash, emit, is_autocommit, key_string,
        listening, object, stash, take_stash, to_value, warn_delete_without_key,
        warn_old_value_unread,
    };
    pub use async_trait::async_trait;
    pub use sea_orm;
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
