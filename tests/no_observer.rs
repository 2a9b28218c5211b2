//! Without an installed observer, writes still work, and one error says that events are
//! dropped and how to install an observer; an error, so that a subscriber showing only
//! errors (`tracing_subscriber::fmt::init()` with `env-filter` and no `RUST_LOG`) shows it.
//! (Its own test binary: nothing installs one.)

mod common;

use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, Set};
use vendora_pos::db;
use vendora_pos::entities::category;

#[tokio::test(flavor = "current_thread")]
async fn writes_work_and_one_error_explains_how_to_install_an_observer() {
    let (_guard, logs) = common::capture_logs_at(tracing::Level::ERROR);

    let db = db::connect("sqlite::memory:").await.unwrap();
    db::create_pos_tables(&db).await.unwrap();
    for i in 0..3 {
        let c = category::ActiveModel {
            id: NotSet,
            name: Set(format!("c{i}")),
        }
        .insert(&db)
        .await
        .unwrap();
        let mut am = c.into_active_model();
        am.name = Set(format!("c{i}'"));
        am.update(&db).await.unwrap();
    }
    let text = logs();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("no observer is installed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("ERROR"), "{text}");
    assert!(
        warnings[0].contains("Observer::from_env().await?.install()"),
        "{text}"
    );
}
