//! One trace from a write to the app, with OpenTelemetry.
//!
//! ```text
//! cargo run --example traces              # direct mode
//! cargo run --example traces -- --outbox  # outbox mode (traces-outbox.sqlite)
//! ```
//!
//! A sale in the POS backend runs in a `tracing` span that `tracing-opentelemetry` turns
//! into an OpenTelemetry span; the observer (feature `opentelemetry`) sends its events'
//! `traceparent` from that context, and the receiver twin (here in the same process)
//! continues the trace. The spans are collected in memory and printed as trees: the write,
//! each delivery, its attempts and the twin's broadcast, under one trace id. In a real
//! deployment the same layer exports to your collector (e.g. `opentelemetry-otlp`) and the
//! twin, a process of its own, exports its spans there too. The code is `vendora_pos::traced`,
//! which `tests/trace.rs` runs.

use vendora_pos::traced;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), traced::Error> {
    let outbox = match std::env::args().nth(1).as_deref() {
        None => None,
        Some("--outbox") => Some("traces-outbox.sqlite".into()),
        Some(other) => {
            return Err(format!("unknown argument {other:?}; usage: traces [--outbox]").into());
        }
    };
    let (subscriber, spans, provider) = traced::subscriber();
    tracing::subscriber::set_global_default(subscriber)?;
    let trace_id = traced::sale(outbox).await?;
    provider.force_flush()?;
    println!("the sale's trace is {trace_id}\n");
    print!("{}", traced::tree(&spans.all()));
    Ok(())
}
