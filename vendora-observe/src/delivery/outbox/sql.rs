//! Statements built for their backend: each value is bound where the text names it, by
//! number (`$1, $2, …` on PostgreSQL, `?1, ?2, …` on SQLite), so that a placeholder names its
//! value wherever it stands in the text. Nothing rewrites a statement's text afterwards: a
//! `?` in a string literal or a comment stays what it is. A statement sent in PostgreSQL's
//! simple-query protocol, where nothing is bound, has its values written into the text as
//! literals by the same code ([`Binds::literal`]).

use sea_orm::{DbBackend, Statement, Value};

use super::TABLE;

/// The values of one statement, bound as its text is written:
///
/// ```text
/// let mut b = Binds::new(backend);
/// let text = format!("UPDATE t SET a = {} WHERE id IN ({})", b.bind(1), b.list([2, 3]));
/// let statement = b.statement(text);
/// ```
pub(crate) struct Binds {
    backend: DbBackend,
    values: Vec<Value>,
    /// Values are written into the text, not bound.
    literal: bool,
}

impl Binds {
    pub(crate) fn new(backend: DbBackend) -> Self {
        Binds {
            backend,
            values: Vec::new(),
            literal: false,
        }
    }

    /// A binder for PostgreSQL that writes each value into the text as a literal (quoted
    /// and escaped as SeaQuery writes PostgreSQL's), for a statement sent with others in one
    /// simple query.
    #[cfg(feature = "postgres")]
    pub(crate) fn literal() -> Self {
        Binds {
            literal: true,
            ..Binds::new(DbBackend::Postgres)
        }
    }

    pub(crate) fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Binds `value`; returns its placeholder, to write where it goes.
    pub(crate) fn bind(&mut self, value: impl Into<Value>) -> String {
        let value = value.into();
        if self.literal {
            use sea_orm::sea_query::{PostgresQueryBuilder, QueryBuilder};
            return PostgresQueryBuilder.value_to_string(&value);
        }
        self.values.push(value);
        match self.backend {
            DbBackend::Postgres => format!("${}", self.values.len()),
            DbBackend::Sqlite => format!("?{}", self.values.len()),
            // Positional: MySQL (which the outbox does not support) binds in text order.
            _ => "?".to_owned(),
        }
    }

    /// Binds each of `values`; returns their placeholders, comma-separated (for `IN (…)`).
    pub(crate) fn list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> String {
        let marks: Vec<String> = values.into_iter().map(|v| self.bind(v)).collect();
        marks.join(", ")
    }

    /// The statement: `text`, written with this binder's placeholders.
    pub(crate) fn statement(self, text: impl Into<String>) -> Statement {
        Statement::from_sql_and_values(self.backend, text.into(), self.values)
    }
}

/// A statement with a single value, or none: the common case.
pub(crate) fn statement(backend: DbBackend, text: impl FnOnce(&mut Binds) -> String) -> Statement {
    let mut binds = Binds::new(backend);
    let text = text(&mut binds);
    binds.statement(text)
}

/// `INDEXED BY` the outbox's index `index` on SQLite, nothing elsewhere: SQLite plans from
/// `sqlite_stat1`, which, when taken mid-burst, says most rows are pending, and it then scans
/// the whole table. The pending rows' indexes are always right.
pub(crate) fn by_index(backend: DbBackend, index: &str) -> String {
    match backend {
        DbBackend::Sqlite => format!(" INDEXED BY {TABLE}_{index}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_backend_and_the_order_they_are_written_in() {
        let build = |backend| {
            statement(backend, |b| {
                format!(
                    "UPDATE t SET note = 'why?', a = {} WHERE id IN ({}) AND b = {}",
                    b.bind(1),
                    b.list([2, 3]),
                    b.bind("x")
                )
            })
        };
        let pg = build(DbBackend::Postgres);
        assert_eq!(
            pg.sql,
            "UPDATE t SET note = 'why?', a = $1 WHERE id IN ($2, $3) AND b = $4"
        );
        assert_eq!(pg.values.as_ref().map(|v| v.0.len()), Some(4));
        let sqlite = build(DbBackend::Sqlite);
        assert_eq!(
            sqlite.sql,
            "UPDATE t SET note = 'why?', a = ?1 WHERE id IN (?2, ?3) AND b = ?4"
        );
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn literals_are_written_into_the_text_quoted_and_escaped() {
        let mut b = Binds::literal();
        let text = format!(
            "SELECT {}, {}, {}",
            b.bind(-7i64),
            b.bind("relay 'x'"),
            b.bind(r"back\slash")
        );
        assert_eq!(text, r"SELECT -7, E'relay \'x\'', E'back\\slash'");
        assert!(b.statement(text).values.is_none_or(|v| v.0.is_empty()));
    }
}
