use sea_orm::entity::prelude::*;
use vendora_observe::Observed;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Observed)]
#[sea_orm(table_name = "products")]
#[observe(event = "product")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    pub name: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn main() {}
