//! # vendora-observe-server
//!
//! The WebSocket server of [vendora-observe](https://docs.rs/vendora-observe): it verifies
//! the signed webhooks the backend sends and rebroadcasts each event over socket.io to the
//! apps allowed to see it. Installed as a program (`cargo install vendora-observe-server`),
//! configured from the environment; its parts are a library for receivers of your own.

#![warn(missing_docs)]

mod dedupe;
pub mod http;
pub mod live;
mod log;
mod token;
#[doc(hidden)]
pub mod twin;
mod verify;

pub use dedupe::{Claim, Dedupe, Ticket};
pub use token::{AppToken, TokenError};
pub use verify::{
    IncomingEvent, MAX_BODY, MAX_ID, REPLAY_TOLERANCE, Rejection, Verifier, token_matches,
    verify_request,
};

/// The program: serves as the environment says until Ctrl-C or SIGTERM; a wrong setting is
/// printed with its fix, and the process exits with status 2.
#[doc(hidden)]
pub async fn main() -> std::process::ExitCode {
    match twin::run_from_env().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
