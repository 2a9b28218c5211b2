//! An order: created and updated; orders are never deleted (they are cancelled). Each
//! belongs to a store, and only the apps of its store hear of it.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use vendora_observe::Observed;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
#[sea_orm(table_name = "orders")]
#[serde(rename_all = "camelCase")]
#[observe(event = "order", on(created, updated), room = "store:{store_id}")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub store_id: i32,
    pub product_id: i32,
    pub quantity: i32,
    pub status: String,
    pub total: f64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}
