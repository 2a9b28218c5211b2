//! Opt-in detection of writes that run no hooks, so send no webhook: SeaORM's
//! `insert_many` / `Entity::insert(..).exec`, `update_many`, `delete_many`, and raw SQL run
//! through `execute_raw` or `query_*_raw`, on an observed table.
//!
//! [`detect_bypass`] installs SeaORM's metric callback on a connection. The generated hooks
//! say which table the write that follows them touches; a write statement on a watched
//! table that no hook announced is a bypass, logged once per table and kind (INSERT,
//! UPDATE, DELETE). Writes inside [`quietly`](crate::quietly) are meant to send nothing
//! and are not reported. `execute_unprepared` runs no metric callback, so it is not seen.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use sea_orm::{DatabaseConnection, EntityName};

use crate::hooks::{Origin, is_quiet, origin};

/// Whether any connection detects bypasses: the hooks mark nothing otherwise.
static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct Registry {
    tables: RwLock<HashSet<String>>,
    /// Writes announced by hooks and not yet seen, per task (or thread): table and count.
    expected: Mutex<HashMap<Origin, Vec<(&'static str, u32)>>>,
    warned: Mutex<HashSet<(String, &'static str)>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// Watches `db` for writes to `tables` that run no hooks (`insert_many`, `update_many`,
/// `delete_many`, raw SQL through `execute_raw`), and logs each table and kind once, with
/// what to do instead. Installs SeaORM's metric callback on `db` (replacing one set
/// before); connections cloned from `db` afterwards share it.
///
/// ```
/// # use sea_orm::{EntityName, entity::prelude::*};
/// # mod product {
/// #     use sea_orm::entity::prelude::*;
/// #     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, vendora_observe::Observed)]
/// #     #[sea_orm(table_name = "products")]
/// #     #[observe(event = "product")]
/// #     pub struct Model { #[sea_orm(primary_key)] pub id: i32 }
/// #     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
/// #     pub enum Relation {}
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sea_orm::DbErr> {
/// let mut db = sea_orm::Database::connect("sqlite::memory:").await?;
/// vendora_observe::detect_bypass(&mut db, &[product::Entity.table_name()]);
/// # Ok(()) }
/// ```
pub fn detect_bypass(db: &mut DatabaseConnection, tables: &[&str]) {
    let registry = registry();
    registry
        .tables
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .extend(tables.iter().map(|t| t.to_string()));
    ENABLED.store(true, Ordering::Release);
    db.set_metric_callback(|info| {
        if let Some((kind, table)) = written_table(&info.statement.sql) {
            check(kind, table);
        }
    });
}

/// Called by the generated `before_save` / `before_delete`: the next write of this task
/// to `E`'s table comes from a hook.
pub fn expect_write<E: EntityName>() {
    if !ENABLED.load(Ordering::Acquire) {
        return;
    }
    let table = E::default().table_name();
    let mut expected = registry()
        .expected
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mine = expected.entry(origin()).or_default();
    match mine.iter_mut().find(|(t, _)| *t == table) {
        Some((_, n)) => *n += 1,
        None => mine.push((table, 1)),
    }
}

fn check(kind: &'static str, table: &str) {
    let registry = registry();
    if !registry
        .tables
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .contains(table)
    {
        return;
    }
    {
        let mut expected = registry.expected.lock().unwrap_or_else(|p| p.into_inner());
        let me = origin();
        if let Some(mine) = expected.get_mut(&me)
            && let Some(at) = mine.iter().position(|(t, _)| *t == table)
        {
            mine[at].1 -= 1;
            if mine[at].1 == 0 {
                mine.swap_remove(at);
                if mine.is_empty() {
                    expected.remove(&me);
                }
            }
            return;
        }
    }
    if is_quiet() {
        return;
    }
    let first = registry
        .warned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((table.to_owned(), kind));
    if first {
        crate::diagnostics::warn(
            crate::diagnostics::Kind::Setup,
            format_args!(
                "{kind} on `{table}` ran no hooks, so no webhook was sent for it: SeaORM's \
                 insert_many / Entity::insert(..).exec, update_many, delete_many and raw SQL \
                 bypass ActiveModel hooks; write with ActiveModel::insert / update / delete, \
                 send the event yourself with WebhookService, or run the write inside \
                 vendora_observe::quietly(..) if no event is wanted (reported once per table \
                 and kind)"
            ),
        );
    }
}

/// The kind and table of a write statement: `INSERT INTO t`, `UPDATE t`, `DELETE FROM t`
/// (quoted or not, schema-qualified or not).
fn written_table(sql: &str) -> Option<(&'static str, &str)> {
    let sql = sql.trim_start();
    let upper = |n: usize| sql.get(..n).map(str::to_ascii_uppercase);
    let (kind, rest) = if upper(11).as_deref() == Some("INSERT INTO") {
        ("INSERT", &sql[11..])
    } else if upper(11).as_deref() == Some("DELETE FROM") {
        ("DELETE", &sql[11..])
    } else if upper(6).as_deref() == Some("UPDATE") {
        ("UPDATE", &sql[6..])
    } else {
        return None;
    };
    let name = rest
        .trim_start()
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()?;
    let last = name.rsplit('.').next()?;
    Some((
        kind,
        last.trim_matches(|c| c == '"' || c == '`' || c == '[' || c == ']'),
    ))
}

#[cfg(test)]
mod tests {
    use super::written_table;

    #[test]
    fn write_statements_name_their_table() {
        assert_eq!(
            written_table(r#"INSERT INTO "products" ("name") VALUES ($1)"#),
            Some(("INSERT", "products"))
        );
        assert_eq!(
            written_table(r#"  update "public"."products" SET x = 1"#),
            Some(("UPDATE", "products"))
        );
        assert_eq!(
            written_table("DELETE FROM `orders` WHERE id = 1"),
            Some(("DELETE", "orders"))
        );
        assert_eq!(written_table(r#"SELECT * FROM "products""#), None);
        assert_eq!(
            written_table("INSERT INTO t(a) VALUES (1)"),
            Some(("INSERT", "t"))
        );
    }
}
