//! The README's Quick start is `examples/minimal.rs`, word for word, and it works: run as
//! a program (its own `main`), it delivers its three webhooks, signed, to a real receiver.

use crate::common;

use std::time::Duration;

use vendora_pos::receiver::Receiver;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The fenced block of `lang` that follows `marker` in the README.
fn block_after(text: &str, marker: &str, lang: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("README has no {marker:?}"));
    let fence = format!("```{lang}\n");
    let start = text[at..]
        .find(&fence)
        .unwrap_or_else(|| panic!("no ```{lang} block after {marker:?}"))
        + at
        + fence.len();
    let end = text[start..].find("\n```").expect("closed block") + start;
    text[start..=end].to_owned()
}

#[test]
fn the_readme_quick_start_is_examples_minimal_rs() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/minimal.rs"))
            .unwrap();
    let shown = block_after(&readme(), "## Quick start", "rust");
    assert_eq!(
        shown, example,
        "README.md's Quick start differs from examples/minimal.rs: copy the file into it"
    );
    // The dependencies too: the example's header and the README's Cargo.toml block.
    let deps = block_after(&readme(), "## Quick start", "toml");
    let in_example: String = example
        .lines()
        .skip_while(|l| !l.starts_with("// [dependencies]"))
        .take_while(|l| !l.starts_with("// ```"))
        .map(|l| format!("{}\n", l.trim_start_matches("// ").trim_start_matches("//")))
        .collect();
    assert!(
        deps.contains(&in_example),
        "the README's dependencies differ from examples/minimal.rs's:\n{deps}\n---\n{in_example}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quick_start_delivers_its_three_webhooks() {
    let receiver = Receiver::start(common::SECRET).await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_quick-start"))
        .env("WEBSOCKET_SERVER_URL", receiver.url())
        .env("WEBHOOK_SECRET", common::SECRET)
        .current_dir(std::env::temp_dir())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("sent 3 webhook(s), 0 undelivered"),
        "{stdout}"
    );
    let got = receiver.delivered();
    let names: Vec<String> = got.iter().map(|r| r.event()).collect();
    assert_eq!(
        names,
        ["product:created", "product:updated", "stock:updated"]
    );
    assert!(got.iter().all(|r| r.signature_ok));
    assert_eq!(
        got[2].data(),
        serde_json::json!({"productId": 1, "newStock": 7})
    );
}

/// Without a secret the Quick start stops at once, saying what to set.
#[tokio::test(flavor = "multi_thread")]
async fn the_quick_start_without_a_secret_says_what_to_set() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_quick-start"))
        .env_remove("WEBHOOK_SECRET")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("WEBHOOK_SECRET is not set or empty")
            && stderr.contains("set WEBHOOK_SECRET"),
        "{stderr}"
    );
}
