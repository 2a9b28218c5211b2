//! The testing facade: a scoped recorder captures events without HTTP, per task, so tests
//! that run in parallel each see their own. Nothing is sent from inside a recording, even
//! with an observer installed.

mod common;

use std::time::Duration;

use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, Set};
use vendora_observe::testing::Recorder;
use vendora_pos::db;
use vendora_pos::entities::category;
use vendora_pos::receiver::Receiver;

async fn insert_and_rename(db: &sea_orm::DatabaseConnection, name: &str) -> category::Model {
    let c = category::ActiveModel {
        id: NotSet,
        name: Set(name.into()),
    }
    .insert(db)
    .await
    .unwrap();
    let mut am = c.into_active_model();
    am.name = Set(format!("{name}!"));
    am.update(db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_recordings_see_only_their_own_events_and_nothing_is_sent() {
    let receiver = Receiver::start(common::SECRET).await.unwrap();
    let observer = common::observer_for(&receiver.url(), common::fast_retries()).await;
    // Installed for the whole process: the recordings must still send nothing.
    observer.install();
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();

    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let recorder = Recorder::new();
            let name = format!("cat-{i}");
            let c = recorder.scope(insert_and_rename(&db, &name)).await;
            (i, c, recorder)
        }));
    }
    for t in tasks {
        let (i, c, recorder) = t.await.unwrap();
        assert_eq!(
            recorder.names(),
            ["category:created", "category:updated"],
            "task {i}"
        );
        let events = recorder.events();
        assert_eq!(events[0].data()["name"], format!("cat-{i}"));
        assert_eq!(events[1].data()["name"], format!("cat-{i}!"));
        assert!(
            events
                .iter()
                .all(|e| e.key == c.id.to_string() && e.entity == "category")
        );
        assert_eq!(
            events[1].body.as_str(),
            format!(
                r#"{{"event":"category:updated","data":{{"id":{},"name":"cat-{i}!"}}}}"#,
                c.id
            )
        );
    }
    // Outside any recording the installed observer sends: one marker write, then check
    // that it is the only request the receiver ever saw.
    let marker = common::product_am("marker", 1).insert(&db).await.unwrap();
    let got = receiver.wait_delivered(1, common::WAIT).await;
    assert!(observer.flush(Duration::from_secs(10)).await);
    assert_eq!(receiver.requests().len(), 1);
    assert_eq!(got[0].data()["id"], marker.id);
    vendora_observe::Observer::uninstall();
}

#[tokio::test]
async fn named_filters_and_clear() {
    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let recorder = Recorder::new();
    recorder.scope(insert_and_rename(&db, "a")).await;
    assert_eq!(recorder.named("category:updated").len(), 1);
    recorder.clear();
    assert!(recorder.events().is_empty());
    // quietly inside a recording: nothing recorded either.
    recorder
        .scope(vendora_observe::quietly(insert_and_rename(&db, "b")))
        .await;
    assert!(recorder.events().is_empty());
}

/// Inside `quietly` a write's events go nowhere, so the hooks do not read the old value of
/// a watched column either: a quiet bulk update costs what an unobserved one does.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_update_of_a_watched_column_reads_no_old_value() {
    use std::sync::{Arc, Mutex};
    let mut db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    let statements: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = statements.clone();
    db.set_metric_callback(move |info| log.lock().unwrap().push(info.statement.sql.clone()));
    let reads = || {
        statements
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.starts_with("SELECT") && s.contains("\"products\""))
            .count()
    };
    let recorder = Recorder::new();
    recorder
        .scope(async {
            let p = common::product_am("quiet", 1).insert(&db).await.unwrap();
            let mut am = p.clone().into_active_model();
            am.stock = Set(2);
            am.update(&db).await.unwrap();
            // The control: recorded, the old value was read.
            assert_eq!(reads(), 1, "{:#?}", statements.lock().unwrap());
            let mut am = p.into_active_model();
            am.stock = Set(3);
            vendora_observe::quietly(am.update(&db)).await.unwrap();
        })
        .await;
    assert_eq!(
        recorder.names(),
        ["product:created", "product:updated", "stock:updated"]
    );
    assert_eq!(reads(), 1, "{:#?}", statements.lock().unwrap());
}
