//! What one webhook costs the sender: building and signing a 1 KiB body, and dispatches
//! per second to a receiver on 127.0.0.1 over one keep-alive connection and over several.
//!
//! ```text
//! cargo run --release --example bench_service
//! ```
//! Prints measurements; asserts nothing.

use std::time::{Duration, Instant};

use serde_json::json;
use vendora_observe::{WebhookBody, WebhookConfig, WebhookService, sign};
use vendora_pos::receiver::Receiver;

const SECRET: &str = "bench-secret";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    // A 1 KiB product-like payload.
    let data = json!({
        "id": 12345, "name": "Espresso beans 1 kg, single origin", "price": 12.5, "stock": 7,
        "categoryId": 3, "createdAt": "2026-11-29T07:41:11.714216501Z",
        "updatedAt": "2026-11-29T07:41:11.720931667Z",
        "description": "x".repeat(700), "tags": ["coffee", "beans", "espresso"], "ratio": 0.3333333333333333
    });
    let probe = WebhookBody::new("product:updated", &data).unwrap();
    let n = 20_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let body = WebhookBody::new("product:updated", &data).unwrap();
        let sig = sign(SECRET.as_bytes(), body.as_bytes());
        std::hint::black_box((body, sig));
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "build + sign a {} B body: p50 {:?}, p99 {:?} ({} runs)",
        probe.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        n
    );

    let receiver = Receiver::start(SECRET).await.unwrap();
    let service = WebhookService::new(
        WebhookConfig::builder()
            .url(receiver.url())
            .secret(SECRET)
            .build()
            .unwrap(),
    )
    .unwrap();
    let small = json!({"productId": 1, "newStock": 7});
    // Warm up the connection.
    for _ in 0..200 {
        service.try_dispatch("stock:updated", &small).await.unwrap();
    }
    for concurrency in [1usize, 4, 16] {
        let total = 6_000;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let service = service.clone();
            let small = small.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..total / concurrency {
                    service.try_dispatch("stock:updated", &small).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "dispatch over {concurrency:>2} keep-alive connection(s): {:>7.0} webhooks/s",
            total as f64 / secs
        );
    }
}
