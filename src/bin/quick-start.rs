// The README's Quick start (examples/minimal.rs) built as a binary of the test package, so
// that `cargo test` rebuilds it and tests/suite/quick_start.rs runs the very code the README
// shows, with its own `main`.
include!("../../examples/minimal.rs");
