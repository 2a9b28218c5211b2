//! One trace from a write to the app, with OpenTelemetry: `cargo run --example traces` and
//! `tests/trace.rs` run this.
//!
//! A `tracing-opentelemetry` layer turns `tracing` spans into OpenTelemetry spans. The POS
//! backend makes a sale in a span of its own (`pos.sell`, the request handler); the
//! observer (feature `opentelemetry`) sends each event's `traceparent` from that span's
//! context and delivers in `webhook.deliver` → `webhook.attempt` spans; the receiver twin,
//! in the same process here, continues the trace from the header in `webhook.broadcast`.
//! In outbox mode the delivery continues the trace stored with the row.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use sea_orm::{ActiveModelTrait, ActiveValue::NotSet, IntoActiveModel, Set};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use vendora_observe::{Observer, WebhookConfig};

use crate::db;
use crate::entities::product;
use vendora_observe_server::{Scope, ServerConfig};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Finished spans, kept in memory.
#[derive(Debug, Clone, Default)]
pub struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl Spans {
    pub fn all(&self) -> Vec<SpanData> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl SpanExporter for Spans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch);
        Ok(())
    }
}

/// A `tracing` subscriber that turns spans into OpenTelemetry spans kept in the returned
/// `Spans` (each exported as it ends), and the provider behind it.
pub fn subscriber() -> (
    impl tracing::Subscriber + Send + Sync,
    Spans,
    SdkTracerProvider,
) {
    let spans = Spans::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let tracer = provider.tracer("vendora-pos");
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(tracing_subscriber::filter::LevelFilter::INFO);
    (subscriber, spans, provider)
}

/// A sale in the POS backend (create a product, sell three) traced end to end: direct mode,
/// or outbox mode on a SQLite file. Returns the write span's trace id.
pub async fn sale(outbox: Option<PathBuf>) -> Result<TraceId, Error> {
    let secret = "traced-demo-secret";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = vendora_observe_server::start(
        listener,
        ServerConfig::new(secret).app_token("app", Scope::All),
    )
    .await?;
    let config = WebhookConfig::builder()
        .url(format!("http://{}/webhook", running.addr()))
        .secret(secret)
        .build()?;
    let database = match &outbox {
        Some(path) => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            db::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?
        }
        None => db::connect("sqlite::memory:").await?,
    };
    db::create_pos_tables(&database).await?;
    let observer = match outbox {
        Some(_) => {
            Observer::builder(config)
                .outbox(database.clone())
                .build()
                .await?
        }
        None => Observer::builder(config).build().await?,
    };
    let request = tracing::info_span!("pos.sell", product = 1);
    let trace_id = {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        request.context().span().span_context().trace_id()
    };
    observer
        .scope(
            async {
                let beans = product::ActiveModel {
                    id: NotSet,
                    name: Set("Espresso beans".into()),
                    price: Set(12.5),
                    stock: Set(10),
                    category_id: Set(None),
                    ..Default::default()
                }
                .insert(&database)
                .await?;
                let mut am = beans.into_active_model();
                am.stock = Set(7);
                am.update(&database).await?;
                Ok::<_, sea_orm::DbErr>(())
            }
            .instrument(request),
        )
        .await?;
    if !observer.flush(Duration::from_secs(15)).await {
        return Err("the webhooks were not delivered within 15 s".into());
    }
    observer.shutdown(Duration::from_secs(5)).await;
    drop(running);
    Ok(trace_id)
}

/// The spans as trees, one per trace: name, key attributes, duration.
pub fn tree(spans: &[SpanData]) -> String {
    let mut by_trace: Vec<TraceId> = Vec::new();
    for s in spans {
        let t = s.span_context.trace_id();
        if !by_trace.contains(&t) {
            by_trace.push(t);
        }
    }
    let mut out = String::new();
    for trace in by_trace {
        let mine: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .collect();
        let ids: Vec<SpanId> = mine.iter().map(|s| s.span_context.span_id()).collect();
        let mut children: HashMap<SpanId, Vec<&SpanData>> = HashMap::new();
        let mut roots = Vec::new();
        for s in &mine {
            if ids.contains(&s.parent_span_id) {
                children.entry(s.parent_span_id).or_default().push(s);
            } else {
                roots.push(*s);
            }
        }
        let _ = writeln!(out, "trace {trace}  ({} spans)", mine.len());
        let mut stack: Vec<(&SpanData, usize)> = roots.iter().rev().map(|s| (*s, 1)).collect();
        while let Some((s, depth)) = stack.pop() {
            let took = s
                .end_time
                .duration_since(s.start_time)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3;
            let attrs: Vec<String> = s
                .attributes
                .iter()
                .filter(|kv| {
                    ["event", "product", "queued_ms", "parent_id"].contains(&kv.key.as_str())
                })
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            let remote = if depth == 1 && s.parent_span_id != SpanId::INVALID {
                format!("  (parent {} elsewhere)", s.parent_span_id)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{}{} {} {took:.1} ms{remote}",
                "  ".repeat(depth),
                s.name,
                attrs.join(" "),
            );
            let mut kids = children
                .remove(&s.span_context.span_id())
                .unwrap_or_default();
            kids.sort_by_key(|k| k.start_time);
            for k in kids.into_iter().rev() {
                stack.push((k, depth + 1));
            }
        }
    }
    out
}
