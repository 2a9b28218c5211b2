// The WebSocket server as the end-to-end tests run it: vendora-observe-server's own program
// (its `main`), built as a binary of the test package so that `cargo test` rebuilds it and
// the tests start it as a process, the way it is deployed.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    vendora_observe_server::main().await
}
