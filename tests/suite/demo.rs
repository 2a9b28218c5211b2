//! The README's demo works: the POS demo's own code (`vendora_pos::demo`, which
//! `cargo run --example pos` runs) in-process, in both modes, against its own receiver.

use vendora_pos::demo::Demo;

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

/// Both modes in one test: the demo installs its observer for the process.
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
}
