//! Nothing is lost in silence, seen from outside: programs with no tracing subscriber,
//! that exit without shutting down, that use a wrong secret or install no observer, run
//! as processes; what they print on stderr is what their user sees.

use crate::common;

use std::process::Output;
use std::time::Duration;

use common::{SECRET, WAIT, product_am};
use sea_orm::ActiveModelTrait;
use vendora_pos::receiver::{Blackhole, Receiver};

async fn child(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vendora-test-child"))
        .args(args)
        .env_remove("RUST_LOG")
        .output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the child ended")
        .expect("the child ran")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A program that returns from main with webhooks still queued is told how many were
/// never sent, how many were cut in flight, and what to call.
#[tokio::test(flavor = "multi_thread")]
async fn exiting_without_shutdown_says_how_many_webhooks_were_lost_and_what_to_call() {
    let hole = Blackhole::start().await.unwrap();
    let out = child(&["write", &hole.url(), SECRET, "4", "exit"]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // One task's four writes: the first in flight to a receiver that never answers (it
    // may have processed it), three behind it.
    assert!(
        err.contains("3 webhook(s) were never sent, and 1 cut in flight"),
        "stderr: {err}"
    );
    assert!(err.contains("observer.shutdown("), "stderr: {err}");
}

/// The same program with a proper shutdown says nothing of the kind.
#[tokio::test(flavor = "multi_thread")]
async fn shutting_down_delivers_and_reports_no_loss() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let out = child(&["write", &receiver.url(), SECRET, "4", "shutdown"]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("shutdown drained=true"),
        "{out:?}"
    );
    assert!(!err.contains("never sent"), "stderr: {err}");
    assert_eq!(receiver.delivered().len(), 4);
}

/// With no tracing subscriber, a wrong secret is not silent: each refused event reaches
/// stderr as one line, dead-lettered, naming the setting to fix (not a line for the 401 and
/// another for the dead letter, which would halve what the stderr budget shows).
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_reaches_stderr_without_a_tracing_subscriber() {
    let receiver = Receiver::start(SECRET).await.unwrap();
    let out = child(&["write", &receiver.url(), "not-the-secret", "2", "shutdown"]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("X-Webhook-Id")).collect();
    assert_eq!(lines.len(), 2, "one line per event; stderr: {err}");
    for line in lines {
        assert!(
            line.contains("dead-lettered after 1 attempt(s)")
                && line.contains("401 Unauthorized")
                && line.contains("WEBHOOK_SECRET probably differs"),
            "stderr: {err}"
        );
    }
    assert!(receiver.delivered().is_empty());
}

/// Writes with no observer installed say once how to install one.
#[tokio::test(flavor = "multi_thread")]
async fn no_observer_reaches_stderr_once() {
    let out = child(&["no-observer"]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("no observer is installed").count(),
        1,
        "stderr: {err}"
    );
    assert!(err.contains("Observer::from_env()"), "stderr: {err}");
}

/// Dropping the last handle of an observer with events pending does not lose them: they
/// are delivered in the background.
#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_last_handle_delivers_what_is_pending() {
    let env = common::env().await;
    env.receiver
        .set_reply(vendora_pos::receiver::Reply::Delay(Duration::from_millis(
            200,
        )));
    env.observer
        .scope(async {
            for i in 0..3 {
                product_am(&format!("p{i}"), i)
                    .insert(&env.db)
                    .await
                    .unwrap();
            }
        })
        .await;
    assert!(env.observer.stats().pending > 0);
    drop(env.observer);
    env.receiver.wait_delivered(3, WAIT).await;
}
