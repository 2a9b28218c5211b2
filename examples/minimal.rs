// The README's Quick start, whole: one observed entity on SQLite, and its first signed
// webhooks.
//
// ```text
// WEBHOOK_SECRET=s3cr3t APP_TOKENS=dev-token vendora-observe-server   # in another terminal
// WEBHOOK_SECRET=s3cr3t cargo run --example minimal
// ```
//
// The dependencies it needs:
//
// ```toml
// [dependencies]
// vendora-observe = "0.1"
// sea-orm = { version = "2.0.4", features = ["sqlx-sqlite", "runtime-tokio", "macros"] }
// serde = { version = "1", features = ["derive"] }
// tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
// ```

use std::time::Duration;

use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, ConnectionTrait, Database, Schema, Set};
use vendora_observe::Observer;

mod product {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;
    use vendora_observe::Observed;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
    #[sea_orm(table_name = "products")]
    #[serde(rename_all = "camelCase")]
    #[observe(event = "product", watch = "stock")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        pub stock: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    // No `impl ActiveModelBehavior for ActiveModel {}`: #[derive(Observed)] writes it.
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // WEBSOCKET_SERVER_URL (default http://localhost:3001) and WEBHOOK_SECRET, from the
    // environment or .env. A missing secret stops here, saying what to set.
    let observer = Observer::from_env().await?;
    observer.install();

    let db = Database::connect("sqlite::memory:").await?;
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(product::Entity))
        .await?;

    // product:created
    let beans = product::ActiveModel {
        id: NotSet,
        name: Set("Espresso beans".into()),
        stock: Set(10),
    }
    .insert(&db)
    .await?;

    // product:updated, then stock:updated (the stock really changed)
    let mut beans: product::ActiveModel = beans.into();
    beans.stock = Set(7);
    beans.update(&db).await?;

    // Delivers what is still queued, then stops. Without it, events queued when main
    // returns would be lost (and you would be told so). Failures are on stderr.
    let report = observer.shutdown(Duration::from_secs(5)).await;
    println!(
        "sent {} webhook(s), {} undelivered",
        report.stats.sent,
        report.undelivered()
    );
    Ok(())
}
