//! Mistakes get answers: writes that bypass the hooks (opt-in detection), and a watch
//! event name two entities send.

mod common;

use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::NotSet, EntityName, QueryFilter, Set, sea_query::Expr};
use vendora_observe::testing::Recorder;
use vendora_pos::db;
use vendora_pos::entities::product;

/// A product for `insert_many`, which runs no hooks: its timestamps are set here.
fn bulk(name: &str) -> product::ActiveModel {
    let now = chrono::Utc::now();
    product::ActiveModel {
        created_at: Set(now),
        updated_at: Set(now),
        ..common::product_am(name, 1)
    }
}

/// Every kind of bypass on a watched table is reported once, with what to do; writes
/// through the hooks, writes inside `quietly`, and writes to unwatched tables are not.
#[tokio::test(flavor = "current_thread")]
async fn writes_that_bypass_the_hooks_are_reported_once_per_table_and_kind() {
    let (_guard, logs) = common::capture_logs();
    let mut db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    vendora_observe::detect_bypass(&mut db, &[product::Entity.table_name()]);
    let recorder = Recorder::new();
    recorder
        .scope(async {
            // Through the hooks: fine.
            let p = common::product_am("hooked", 1).insert(&db).await.unwrap();
            let mut am: product::ActiveModel = p.into();
            am.stock = Set(2);
            am.update(&db).await.unwrap();
            // Bypasses.
            for _ in 0..2 {
                product::Entity::insert_many([bulk("bulk a"), bulk("bulk b")])
                    .exec(&db)
                    .await
                    .unwrap();
            }
            product::Entity::update_many()
                .col_expr(product::Column::Stock, Expr::value(9))
                .filter(product::Column::Name.eq("bulk a"))
                .exec(&db)
                .await
                .unwrap();
            product::Entity::delete_many()
                .filter(product::Column::Name.eq("bulk b"))
                .exec(&db)
                .await
                .unwrap();
            // Meant to send nothing.
            vendora_observe::quietly(
                product::Entity::delete_many()
                    .filter(product::Column::Name.eq("bulk a"))
                    .exec(&db),
            )
            .await
            .unwrap();
            // Another table, not watched.
            vendora_pos::entities::category::Entity::delete_many()
                .exec(&db)
                .await
                .unwrap();
        })
        .await;
    let text = logs();
    let reports: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ran no hooks"))
        .collect();
    assert_eq!(reports.len(), 3, "{text}");
    for kind in [
        "INSERT on `products`",
        "UPDATE on `products`",
        "DELETE on `products`",
    ] {
        assert_eq!(
            reports.iter().filter(|l| l.contains(kind)).count(),
            1,
            "{kind}: {text}"
        );
    }
    assert!(reports[0].contains("ActiveModel::insert"), "{}", reports[0]);
    assert_eq!(
        recorder.names(),
        ["product:created", "product:updated", "stock:updated"]
    );
}

mod ticket {
    use sea_orm::entity::prelude::*;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
    #[sea_orm(table_name = "tickets")]
    #[observe(event = "ticket", watch = "status")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod shipment {
    use sea_orm::entity::prelude::*;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, Observed)]
    #[sea_orm(table_name = "shipments")]
    #[observe(event = "shipment", watch = "status")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// `watch = "status"` on two entities sends `status:updated` from both: said once, at the
/// first use by the second entity, with the fix.
#[tokio::test(flavor = "current_thread")]
async fn a_watch_event_name_sent_by_two_entities_is_reported_once() {
    let (_guard, logs) = common::capture_logs();
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_table(&db, ticket::Entity).await.unwrap();
    db::create_table(&db, shipment::Entity).await.unwrap();
    let recorder = Recorder::new();
    recorder
        .scope(async {
            for round in 0..2 {
                let t = ticket::ActiveModel {
                    id: NotSet,
                    status: Set("open".into()),
                }
                .insert(&db)
                .await
                .unwrap();
                let mut am: ticket::ActiveModel = t.into();
                am.status = Set(format!("closed {round}"));
                am.update(&db).await.unwrap();
                let s = shipment::ActiveModel {
                    id: NotSet,
                    status: Set("packed".into()),
                }
                .insert(&db)
                .await
                .unwrap();
                let mut am: shipment::ActiveModel = s.into();
                am.status = Set(format!("sent {round}"));
                am.update(&db).await.unwrap();
            }
        })
        .await;
    let text = logs();
    let reports: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("is sent by two entities"))
        .collect();
    assert_eq!(reports.len(), 1, "{text}");
    assert!(
        reports[0].contains("`status:updated` is sent by two entities, `ticket` and `shipment`"),
        "{}",
        reports[0]
    );
    assert!(
        reports[0].contains(r#"watch(status = \"shipment_status:updated\")"#)
            || reports[0].contains(r#"watch(status = "shipment_status:updated")"#),
        "{}",
        reports[0]
    );
    assert_eq!(recorder.named("status:updated").len(), 4);
}
