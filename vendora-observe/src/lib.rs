//! # vendora-observe
//!
//! Real-time sync for point-of-sale apps: every create, update and delete of an observed
//! SeaORM entity becomes an HMAC-signed webhook to the WebSocket server, which rebroadcasts
//! it to every connected app.
//!
//! This crate is the runtime: [`WebhookConfig`] (settings, validated at start-up),
//! [`WebhookBody`] (the exact signed bytes, JS-stable), [`signature`] (sign and verify),
//! and [`WebhookService`] (one signed POST per event over a keep-alive client).

#![warn(missing_docs)]

pub mod body;
pub mod config;
pub mod service;
pub mod signature;

pub use body::{BodyError, WebhookBody};
pub use config::{ConfigError, Secret, WebhookConfig, WebhookConfigBuilder};
pub use service::{Delivered, DeliveryError, Webhook, WebhookService};
pub use signature::{sign, verify};
pub use vendora_observe_macros::Observed;
