// The receiver twin: the Rust counterpart of the Node.js WebSocket server, hardened for the
// internet (see vendora_pos::twin). Configured from the environment:
//
// WEBHOOK_SECRET=… APP_TOKENS=… cargo run --example receiver     # 127.0.0.1:3001, or HOST / PORT
//
// WEBHOOK_PREVIOUS_SECRETS (rotation), WEBHOOK_REQUIRE_STANDARD_HEADERS (replay protection),
// APP_TOKEN_SECRET (tokens minted by the backend), ALLOWED_ORIGINS (browser apps),
// APP_AUTH=off (no app authentication: development only), REDIS_URL (several twins).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match vendora_pos::twin::run_from_env().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
