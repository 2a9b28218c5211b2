//! The README's demo works: the POS demo's own code (`vendora_pos::demo`, which
//! `cargo run --example pos` runs) in-process, in both modes, against its own receiver.

use vendora_pos::demo::Demo;
use vendora_pos::receiver::{Receiver, Reply, Reserved};

const SECRET: &str = "demo-test-secret";

async fn run_demo(outbox: Option<std::path::PathBuf>) -> String {
    let mut out = Vec::new();
    let result = Demo {
        server: None,
        outbox,
    }
    .run(&mut out)
    .await;
    let text = String::from_utf8(out).unwrap();
    assert!(result.is_ok(), "{result:?}\n{text}");
    assert!(
        text.contains("exactly the 12 expected events, in order, every signature valid"),
        "{text}"
    );
    assert!(
        text.contains(r#"app <- stock:updated     {"productId":1,"newStock":7}"#),
        "{text}"
    );
    assert_eq!(text.matches("(signature ok)").count(), 12, "{text}");
    text
}

/// Both modes in one test (the demo installs its observer for the process), then the outbox
/// demo against a WebSocket server that is down for its first 2.5 s and then answers 503
/// three times: the demo waits while delivery makes progress, saying so, and reports
/// exactly what happened — all twelve delivered, and success.
#[tokio::test(flavor = "multi_thread")]
async fn the_pos_demo_delivers_its_twelve_events_in_both_modes() {
    let out = run_demo(None).await;
    assert!(out.contains("mode: direct"), "{out}");

    let file = std::env::temp_dir().join(format!("pos-outbox-{}.sqlite", std::process::id()));
    let out = run_demo(Some(file.clone())).await;
    assert!(out.contains("mode: outbox"), "{out}");
    assert!(out.contains("then roll back (nothing is sent)"), "{out}");
    assert!(!out.contains("Never sold"), "{out}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }

    let port = Reserved::new().unwrap();
    let addr = port.addr();
    let late = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
        let receiver = Receiver::start_on(port, SECRET).unwrap();
        receiver.queue_replies([
            Reply::Status(503, None),
            Reply::Status(503, None),
            Reply::Status(503, None),
        ]);
        receiver
    });
    let config = vendora_observe::WebhookConfig::builder()
        .url(format!("http://{addr}/webhook"))
        .secret(SECRET)
        .build()
        .unwrap();
    let mut out = Vec::new();
    let result = Demo {
        server: Some(config),
        outbox: Some(file.clone()),
    }
    .run(&mut out)
    .await;
    let text = String::from_utf8(out).unwrap();
    assert!(result.is_ok(), "{result:?}\n{text}");
    assert!(text.contains("waiting: "), "{text}");
    assert!(
        text.contains("observer: delivered 12 of 12, dead 0, left undelivered 0"),
        "{text}"
    );
    let receiver = late.await.unwrap();
    assert_eq!(receiver.delivered().len(), 12);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
}
