// A wrong key beside `crate = "…"`: one message, and the error stub names the runtime
// through the given path (here a re-export), not `::vendora_observe`.
mod reexport {
    pub use ::vendora_observe as vo;
}

mod tag {
    use sea_orm::entity::prelude::*;
    use super::reexport::vo;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vo::Observed)]
    #[sea_orm(table_name = "tags")]
    #[observe(event = "tag", crate = "crate::reexport::vo", latest_win)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

fn main() {}
