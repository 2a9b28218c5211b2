//! The POS scenario of the demo and of the end-to-end tests: a product's life in eleven
//! steps (twelve webhooks) across two stores, plus, in outbox mode, a rolled-back step that
//! must send nothing. The catalogue (categories, products) is every store's; an order is
//! its store's alone (`room = "store:{store_id}"`).

use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, DatabaseConnection, DbErr, IntoActiveModel, ModelTrait,
    Set, TransactionTrait,
};

use crate::entities::{category, order, product};

/// The webhooks the scenario sends, in order.
pub const EXPECTED: [&str; 12] = [
    "category:created",
    "product:created",
    "product:updated",
    "product:updated",
    "stock:updated",
    "product:updated",
    "order:created",
    "order:updated",
    "order:created",
    "category:updated",
    "product:deleted",
    "category:deleted",
];

/// The rooms of each of [`EXPECTED`]: `None` for the catalogue's events (every app).
pub const ROOMS: [Option<&str>; 12] = [
    None,
    None,
    None,
    None,
    None,
    None,
    Some("store:1"),
    Some("store:1"),
    Some("store:2"),
    None,
    None,
    None,
];

/// The events an app of `store` receives, in order: the catalogue's and its store's.
pub fn expected_for_store(store: i32) -> Vec<&'static str> {
    let room = format!("store:{store}");
    EXPECTED
        .iter()
        .zip(ROOMS)
        .filter(|(_, r)| r.is_none_or(|r| r == room))
        .map(|(e, _)| *e)
        .collect()
}

/// One step: its label and how many webhooks it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub label: &'static str,
    pub events: usize,
}

/// Runs the scenario on `db` (POS tables created), calling `after` after each step. With
/// `rollback_step`, a product is also created in a transaction that is rolled back.
pub async fn run(
    db: &DatabaseConnection,
    rollback_step: bool,
    mut after: impl AsyncFnMut(Step),
) -> Result<(), DbErr> {
    let step = |label, events| Step { label, events };

    let beverages = category::ActiveModel {
        id: NotSet,
        name: Set("Beverages".into()),
    }
    .insert(db)
    .await?;
    after(step("create category \"Beverages\"", 1)).await;

    let beans = product::ActiveModel {
        id: NotSet,
        name: Set("Espresso beans".into()),
        price: Set(12.5),
        stock: Set(10),
        category_id: Set(Some(beverages.id)),
        ..Default::default()
    }
    .insert(db)
    .await?;
    after(step(
        "create product \"Espresso beans\", stock 10, price 12.5",
        1,
    ))
    .await;

    if rollback_step {
        let txn = db.begin().await?;
        product::ActiveModel {
            id: NotSet,
            name: Set("Never sold".into()),
            price: Set(1.0),
            stock: Set(1),
            category_id: Set(None),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        txn.rollback().await?;
        after(step(
            "create a product inside a transaction, then roll back (nothing is sent)",
            0,
        ))
        .await;
    }

    let mut am = beans.into_active_model();
    am.name = Set("Espresso beans 1 kg".into());
    let beans = am.update(db).await?;
    after(step("rename the product", 1)).await;

    let mut am = beans.into_active_model();
    am.stock = Set(7);
    let beans = am.update(db).await?;
    after(step("sell three: stock 10 -> 7", 2)).await;

    let mut am = beans.into_active_model();
    am.stock = Set(7);
    let beans = am.update(db).await?;
    after(step("set stock to 7 again (not a change)", 1)).await;

    let sale = order::ActiveModel {
        id: NotSet,
        store_id: Set(1),
        product_id: Set(beans.id),
        quantity: Set(3),
        status: Set("pending".into()),
        total: Set(37.5),
    }
    .insert(db)
    .await?;
    after(step("store 1 orders three (its apps only)", 1)).await;

    let mut am = sale.into_active_model();
    am.status = Set("paid".into());
    am.update(db).await?;
    after(step("store 1's order is paid", 1)).await;

    order::ActiveModel {
        id: NotSet,
        store_id: Set(2),
        product_id: Set(beans.id),
        quantity: Set(1),
        status: Set("pending".into()),
        total: Set(12.5),
    }
    .insert(db)
    .await?;
    after(step("store 2 orders one (its apps only)", 1)).await;

    let mut am = beverages.into_active_model();
    am.name = Set("Hot beverages".into());
    let beverages = am.update(db).await?;
    after(step("rename the category", 1)).await;

    beans.delete(db).await?;
    after(step("delete the product", 1)).await;

    beverages.delete(db).await?;
    after(step("delete the category", 1)).await;
    Ok(())
}
