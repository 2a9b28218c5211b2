//! Rooms from the entity: every event of a targeted entity names its rooms in the signed
//! body — created, updated, watch events and deleted, also a delete given only the primary
//! key, and an update that moves the row tells the rooms it leaves.

use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, ModelTrait, Set, TransactionTrait,
};
use vendora_observe::testing::Recorder;

mod ticket {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
    #[sea_orm(table_name = "tickets")]
    #[serde(rename_all = "camelCase")]
    #[observe(
        event = "ticket",
        watch = "status",
        room = "store:{store_id}",
        room = "till:{till}",
        rooms_with = "super::escalated"
    )]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub store_id: i32,
        pub till: Option<String>,
        pub status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// Rooms a template cannot express: an escalated ticket also goes to head office.
fn escalated(t: &ticket::Model) -> Vec<String> {
    if t.status == "escalated" {
        vec!["hq".to_owned()]
    } else {
        Vec::new()
    }
}

async fn tickets() -> sea_orm::DatabaseConnection {
    let db = vendora_pos::db::connect("sqlite::memory:").await.unwrap();
    vendora_pos::db::create_table(&db, ticket::Entity)
        .await
        .unwrap();
    db
}

fn rooms(recorder: &Recorder) -> Vec<(String, Vec<String>)> {
    recorder
        .events()
        .iter()
        .map(|e| (e.name().to_owned(), e.rooms().expect("targeted")))
        .collect()
}

fn pairs(expected: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    expected
        .iter()
        .map(|(e, r)| (e.to_string(), r.iter().map(|r| r.to_string()).collect()))
        .collect()
}

#[tokio::test]
async fn every_event_of_a_targeted_entity_names_its_rooms() {
    let db = tickets().await;
    let recorder = Recorder::new();
    recorder
        .scope(async {
            let t = ticket::ActiveModel {
                id: NotSet,
                store_id: Set(1),
                till: Set(Some("a".into())),
                status: Set("open".into()),
            }
            .insert(&db)
            .await?;
            let mut am = t.into_active_model();
            am.status = Set("escalated".into());
            let t = am.update(&db).await?;
            // Moved to store 2, off its till: told to the rooms it leaves and joins.
            let mut am = t.into_active_model();
            am.store_id = Set(2);
            am.till = Set(None);
            let t = am.update(&db).await?;
            // Deleted through an ActiveModel holding only the key: the row is read.
            ticket::ActiveModel {
                id: Set(t.id),
                ..Default::default()
            }
            .delete(&db)
            .await?;
            // A delete of a row that is not there deletes nothing and tells no one.
            ticket::ActiveModel {
                id: Set(99),
                ..Default::default()
            }
            .delete(&db)
            .await?;
            Ok::<_, sea_orm::DbErr>(())
        })
        .await
        .unwrap();
    assert_eq!(
        rooms(&recorder),
        pairs(&[
            ("ticket:created", &["store:1", "till:a"]),
            ("ticket:updated", &["store:1", "till:a", "hq"]),
            ("status:updated", &["store:1", "till:a", "hq"]),
            ("ticket:updated", &["store:2", "hq", "store:1", "till:a"]),
            ("ticket:deleted", &["store:2", "hq"]),
        ])
    );
    let body = recorder.events()[4].body.as_str().to_owned();
    assert_eq!(
        body,
        r#"{"event":"ticket:deleted","data":{"id":1},"rooms":["store:2","hq"]}"#
    );
}

/// In a transaction, the delete's read of the row's rooms runs in it (and locks the row on
/// PostgreSQL); a `Model::delete` needs no read at all; an entity without rooms keeps the
/// body it always had.
#[tokio::test]
async fn deletes_in_a_transaction_and_untargeted_bodies() {
    let db = tickets().await;
    vendora_pos::db::create_pos_tables(&db).await.unwrap();
    let recorder = Recorder::new();
    recorder
        .scope(async {
            let txn = db.begin().await?;
            let t = ticket::ActiveModel {
                id: NotSet,
                store_id: Set(3),
                till: Set(None),
                status: Set("open".into()),
            }
            .insert(&txn)
            .await?;
            ticket::ActiveModel {
                id: Set(t.id),
                ..Default::default()
            }
            .delete(&txn)
            .await?;
            txn.commit().await?;
            let t = ticket::ActiveModel {
                id: NotSet,
                store_id: Set(4),
                till: Set(Some("b".into())),
                status: Set("open".into()),
            }
            .insert(&db)
            .await?;
            t.delete(&db).await?;
            let c = vendora_pos::entities::category::ActiveModel {
                id: NotSet,
                name: Set("Tea".into()),
            }
            .insert(&db)
            .await?;
            c.delete(&db).await?;
            Ok::<_, sea_orm::DbErr>(())
        })
        .await
        .unwrap();
    let events = recorder.events();
    let got: Vec<(String, Option<Vec<String>>)> = events
        .iter()
        .map(|e| (e.name().to_owned(), e.rooms()))
        .collect();
    let some = |r: &[&str]| Some(r.iter().map(|r| r.to_string()).collect::<Vec<_>>());
    assert_eq!(
        got,
        vec![
            ("ticket:created".to_owned(), some(&["store:3"])),
            ("ticket:deleted".to_owned(), some(&["store:3"])),
            ("ticket:created".to_owned(), some(&["store:4", "till:b"])),
            ("ticket:deleted".to_owned(), some(&["store:4", "till:b"])),
            ("category:created".to_owned(), None),
            ("category:deleted".to_owned(), None),
        ]
    );
    assert_eq!(
        events[5].body.as_str(),
        format!(
            r#"{{"event":"category:deleted","data":{{"id":{}}}}}"#,
            events[4].data()["id"]
        )
    );
}
