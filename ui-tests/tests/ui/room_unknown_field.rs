use sea_orm::entity::prelude::*;
use serde::Serialize;
use vendora_observe::Observed;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
#[sea_orm(table_name = "orders")]
#[observe(event = "order", room = "store:{stor_id}")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub store_id: i32,
    pub total: f64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn main() {}
