//! Both entity styles of SeaORM 2 (`DeriveEntityModel` alone and `#[sea_orm::model]`),
//! composite primary keys, and hooks of the user's own beside the observer.

use crate::common;

use common::{WAIT, events};
use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, ModelTrait, Set};
use serde_json::json;
use vendora_pos::db;
use vendora_pos::receiver::Receiver;

/// The dense `#[sea_orm::model]` format, with a relation field that only `ModelEx` keeps.
mod author {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;
    use vendora_observe::Observed;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Observed)]
    #[sea_orm(table_name = "authors", model_attrs(derive(Serialize)))]
    #[observe(event = "author", watch = "name")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        #[sea_orm(has_many)]
        pub books: HasMany<super::book::Entity>,
    }
}

mod book {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;
    use vendora_observe::Observed;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Observed)]
    #[sea_orm(table_name = "books", model_attrs(derive(Serialize)))]
    #[observe(event = "book", on(deleted))]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub author_id: i32,
        pub title: String,
        #[sea_orm(belongs_to, from = "author_id", to = "id")]
        pub author: BelongsTo<super::author::Entity>,
    }
}

/// A composite primary key: `deleted` sends `{"id": {"order_id": …, "line_no": …}}` and
/// watch events name the row the same way.
mod order_line {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
    #[sea_orm(table_name = "order_lines")]
    #[observe(event = "order_line", watch(quantity = "line:quantity"))]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub line_no: i32,
        pub quantity: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

async fn setup() -> (
    sea_orm::DatabaseConnection,
    Receiver,
    vendora_observe::Observer,
) {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_table(&db, author::Entity).await.unwrap();
    db::create_table(&db, book::Entity).await.unwrap();
    db::create_table(&db, order_line::Entity).await.unwrap();
    let receiver = Receiver::start(common::SECRET).await.unwrap();
    let observer = common::observer_for(&receiver.url(), common::fast_retries()).await;
    (db, receiver, observer)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dense_model_format_is_observed_once() {
    let (db, receiver, observer) = setup().await;
    observer
        .scope(async {
            let a = author::ActiveModel {
                id: NotSet,
                name: Set("Ada".into()),
            }
            .insert(&db)
            .await
            .unwrap();
            let b = book::ActiveModel {
                id: NotSet,
                author_id: Set(a.id),
                title: Set("Notes".into()),
            }
            .insert(&db)
            .await
            .unwrap();
            let mut am = a.into_active_model();
            am.name = Set("Ada L.".into());
            am.update(&db).await.unwrap();
            b.delete(&db).await.unwrap();
        })
        .await;
    let got = receiver.wait_delivered(4, WAIT).await;
    assert!(observer.flush(WAIT).await);
    // One expansion only: no event twice.
    assert_eq!(receiver.requests().len(), 4);
    let mut ev = events(&got);
    ev.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        ev,
        [
            ("author:created".into(), json!({"id": 1, "name": "Ada"})),
            ("author:updated".into(), json!({"id": 1, "name": "Ada L."})),
            ("book:deleted".into(), json!({"id": 1})),
            (
                "name:updated".into(),
                json!({"authorId": 1, "newName": "Ada L."})
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn composite_keys_name_the_row_by_every_key_column() {
    let (db, receiver, observer) = setup().await;
    observer
        .scope(async {
            let line = order_line::ActiveModel {
                order_id: Set(7),
                line_no: Set(2),
                quantity: Set(1),
            }
            .insert(&db)
            .await
            .unwrap();
            let mut am = line.into_active_model();
            am.quantity = Set(3);
            am.update(&db).await.unwrap();
            order_line::ActiveModel {
                order_id: Set(7),
                line_no: Set(2),
                quantity: NotSet,
            }
            .delete(&db)
            .await
            .unwrap();
        })
        .await;
    let got = receiver.wait_delivered(4, WAIT).await;
    assert_eq!(
        events(&got),
        [
            (
                "order_line:created".into(),
                json!({"order_id": 7, "line_no": 2, "quantity": 1})
            ),
            (
                "order_line:updated".into(),
                json!({"order_id": 7, "line_no": 2, "quantity": 3})
            ),
            (
                "line:quantity".into(),
                json!({"orderLineId": {"order_id": 7, "line_no": 2}, "newQuantity": 3})
            ),
            (
                "order_line:deleted".into(),
                json!({"id": {"order_id": 7, "line_no": 2}})
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn own_hooks_run_beside_the_observer() {
    // The POS product keeps created_at/updated_at with ActiveModelHooks.
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let recorder = vendora_observe::testing::Recorder::new();
    let (created, updated) = recorder
        .scope(async {
            let p = common::product_am("Tea", 1).insert(&db).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let mut am = p.clone().into_active_model();
            am.stock = Set(2);
            (p, am.update(&db).await.unwrap())
        })
        .await;
    assert_eq!(created.created_at, updated.created_at);
    assert!(updated.updated_at > created.updated_at);
    let names = recorder.names();
    assert_eq!(
        names,
        ["product:created", "product:updated", "stock:updated"]
    );
    // The event carries what the hooks stored.
    let sent = recorder.events()[1].data();
    assert_eq!(sent["updatedAt"], json!(updated.updated_at));
}
