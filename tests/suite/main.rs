//! The end-to-end suite in one test binary: each module was a binary of its own, and each
//! binary compiled and linked its own copy of sea-orm's, tokio's and axum's generic code
//! (a third of a cold test build). Tests that change process-wide state stay binaries of
//! their own: the installed observer (`recorder`, `no_observer`), bypass detection
//! (`mistakes`), the metrics recorder (`metrics`) and tracing's span interest (`trace`).

#[path = "../common/mod.rs"]
mod common;

mod apps;
mod catch_up;
mod convergence;
mod demo;
mod direct;
mod entity_styles;
mod hostile;
mod node_interop;
mod observed;
mod order;
mod outbox;
mod processes;
mod quick_start;
mod recovery;
mod redis;
mod rooms;
mod server;
mod service;
mod socketio;
