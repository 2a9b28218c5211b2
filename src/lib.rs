//! The POS demo's entities and the parts the end-to-end tests share: a signature-checking
//! HTTP receiver on 127.0.0.1 and database set-up for SQLite and PostgreSQL.

pub mod db;
pub mod demo;
pub mod entities;
pub mod receiver;
pub mod scenario;
pub mod traced;
