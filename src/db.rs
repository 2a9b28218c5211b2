//! Connecting and creating the POS tables.

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbErr, EntityTrait, Schema};

use crate::entities::{category, order, product};

/// Connects to `url` (`sqlite::memory:`, `sqlite:///path?mode=rwc`, `postgres://…`).
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = sea_orm::ConnectOptions::new(url.to_owned());
    options.sqlx_logging(false);
    if url.starts_with("sqlite::memory:") {
        // Every pooled connection to :memory: is a separate database: keep one.
        options.max_connections(1).min_connections(1);
    }
    Database::connect(options).await
}

/// Creates `entity`'s table when missing.
pub async fn create_table<E: EntityTrait>(db: &DatabaseConnection, entity: E) -> Result<(), DbErr> {
    let schema = Schema::new(db.get_database_backend());
    let mut stmt = schema.create_table_from_entity(entity);
    stmt.if_not_exists();
    db.execute(&stmt).await.map(|_| ())
}

/// Creates the POS tables when missing.
pub async fn create_pos_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    create_table(db, category::Entity).await?;
    create_table(db, product::Entity).await?;
    create_table(db, order::Entity).await?;
    Ok(())
}
