use sea_orm::entity::prelude::*;
use serde::Serialize;
use vendora_observe::Observed;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
#[sea_orm(table_name = "orders")]
#[observe(event = "order", rooms_with = "rooms_of")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub store_id: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

// Takes the store id, not the model.
fn rooms_of(store_id: i32) -> Vec<String> {
    vec![format!("store:{store_id}")]
}

fn main() {}
