//! Nothing here: the package holds `tests/ui.rs`, the compile errors of
//! `#[derive(Observed)]` (see `Cargo.toml`).
