//! The README's demo command works: the POS example, built by `cargo test`, runs its
//! scenario against its own receiver and exits 0 after checking every event.

use std::process::Command;

fn run_demo(args: &[&str]) -> String {
    // cargo builds examples for `cargo test`; they sit beside the test binaries' folder.
    let deps = std::env::current_exe().unwrap();
    let exe = deps
        .parent()
        .and_then(|d| d.parent())
        .map(|d| {
            d.join("examples")
                .join(format!("pos{}", std::env::consts::EXE_SUFFIX))
        })
        .unwrap();
    assert!(exe.exists(), "{} was not built", exe.display());
    let out = Command::new(&exe)
        .args(args)
        .env_remove("WEBSOCKET_SERVER_URL")
        .env_remove("WEBHOOK_SECRET")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("exactly the 11 expected events, in order, every signature valid"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"app <- stock:updated     {"productId":1,"newStock":7}"#),
        "{stdout}"
    );
    assert_eq!(stdout.matches("(signature ok)").count(), 11, "{stdout}");
    stdout.into_owned()
}

#[test]
fn the_pos_demo_delivers_its_eleven_events() {
    let out = run_demo(&[]);
    assert!(out.contains("mode: direct"), "{out}");
}

#[test]
fn the_outbox_demo_never_sends_the_rolled_back_product() {
    let file = std::env::temp_dir().join(format!("pos-outbox-{}.sqlite", std::process::id()));
    let out = run_demo(&["--outbox", file.to_str().unwrap()]);
    assert!(out.contains("mode: outbox"), "{out}");
    assert!(out.contains("then roll back (nothing is sent)"), "{out}");
    assert!(!out.contains("Never sold"), "{out}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
}
