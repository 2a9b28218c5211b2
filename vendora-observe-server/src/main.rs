//! `vendora-observe-server`: the WebSocket server, configured from the environment
//! (`vendora-observe-server --help` lists the settings).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    vendora_observe_server::main().await
}
