//! A product: full-model events, and `stock:updated` when the stock really changed.

use sea_orm::Set;
use sea_orm::entity::prelude::*;
use serde::Serialize;
use vendora_observe::{ActiveModelHooks, Observed, async_trait};

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
#[sea_orm(table_name = "products")]
#[serde(rename_all = "camelCase")]
#[observe(event = "product", watch = "stock", hooks)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub name: String,
    pub price: f64,
    pub stock: i32,
    pub category_id: Option<i32>,
    pub created_at: ChronoDateTimeUtc,
    pub updated_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

/// Timestamps, as Laravel's: kept by our own hooks beside the observer's.
#[async_trait]
impl ActiveModelHooks for ActiveModel {
    async fn before_save<C>(mut self, _db: &C, insert: bool) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        let now = chrono::Utc::now();
        if insert && self.created_at.is_not_set() {
            self.created_at = Set(now);
        }
        if insert || self.is_changed() {
            self.updated_at = Set(now);
        }
        Ok(self)
    }
}
