//! Without an installed observer, writes still work, and one warning says that events are
//! dropped and how to install an observer. (Its own test binary: nothing installs one.)

use std::io::Write;
use std::sync::{Arc, Mutex};

use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, Set};
use vendora_pos::db;
use vendora_pos::entities::category;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn writes_work_and_one_warning_explains_how_to_install_an_observer() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

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
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("no observer is installed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("WARN"), "{text}");
    assert!(
        warnings[0].contains("Observer::from_env().await?.install()"),
        "{text}"
    );
}
