// The receiver twin (examples/receiver.rs) built as a binary of the test package, so that
// `cargo test` rebuilds it and the tests run it as a process, the way it is deployed.
include!("../../examples/receiver.rs");
