//! The observer's metrics on a Prometheus endpoint, while POS traffic flows.
//!
//! ```text
//! cargo run --example metrics                       # scrape http://127.0.0.1:9464/metrics
//! METRICS_ADDR=0.0.0.0:9000 cargo run --example metrics
//! ```
//!
//! Runs the POS scenario every second against a receiver of its own on 127.0.0.1 that
//! answers one request in five with 503 (so retries show), until Ctrl-C. In an application
//! the whole set-up is the `vendora-observe` feature `metrics` and the three lines that
//! install the exporter; every observer then records its counters, backlog gauges and
//! latency histograms (the names: the `vendora_observe::telemetry` docs).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use vendora_observe::{Observer, WebhookConfig};
use vendora_pos::receiver::{Receiver, Reply};
use vendora_pos::{db, scenario};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    // The 503s below are on purpose: only errors are logged unless RUST_LOG says otherwise.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let addr: SocketAddr = match std::env::var("METRICS_ADDR") {
        Ok(addr) => addr.parse().map_err(|e| {
            format!("METRICS_ADDR={addr:?} is not an address like 127.0.0.1:9464: {e}")
        })?,
        Err(_) => ([127, 0, 0, 1], 9464).into(),
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        // Buckets make the latencies histograms (summaries otherwise), for heatmaps and
        // quantiles over any window.
        .set_buckets(&[
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr} (set METRICS_ADDR): {e}"))?;
    println!("metrics: http://{addr}/metrics");

    let receiver = Receiver::start("metrics-demo-secret").await?;
    let config = WebhookConfig::builder()
        .url(receiver.url())
        .secret("metrics-demo-secret")
        .build()?;
    let observer = Observer::builder(config).build().await?;
    observer.install();
    let database = db::connect("sqlite::memory:").await?;
    db::create_pos_tables(&database).await?;

    let mut round = 0u64;
    loop {
        round += 1;
        // One request in five fails (and is retried) this round.
        receiver.queue_replies((0..11).map(|i| {
            if (i + round).is_multiple_of(5) {
                Reply::Status(503, None)
            } else {
                Reply::Ok
            }
        }));
        scenario::run(&database, false, async |_| {}).await?;
        let stats = observer.stats();
        println!(
            "round {round}: sent {}, retried {}, dead {}, pending {}",
            stats.sent, stats.retried, stats.dead, stats.pending
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let report = observer.shutdown(Duration::from_secs(5)).await;
    println!("shut down: {:?}", report.stats);
    Ok(())
}
