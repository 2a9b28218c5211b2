//! W3C Trace Context for webhooks: every event belongs to a trace, and every POST carries a
//! [`traceparent`](https://www.w3.org/TR/trace-context/#traceparent-header) header, so a
//! receiver can continue the trace from the write to the apps.
//!
//! - The write that emits an event starts its trace ([`TraceParent::current`]: a trace id
//!   and the write's span id). With the feature `opentelemetry` and a `tracing-opentelemetry`
//!   layer installed, that is the OpenTelemetry context of the span current at the write, so
//!   the event joins the application's trace; otherwise a new trace. The outbox stores it
//!   with the row, so the trace survives restarts and relays.
//! - Each delivery runs in a `tracing` span `webhook.deliver` whose parent is the span that
//!   was current at the write (direct mode): log lines of the delivery show the request that
//!   made the write. Each attempt is a span `webhook.attempt` with the `trace_id` and its own
//!   `span_id`, the one its `traceparent` names as parent.
//! - A receiver parses the header with [`TraceParent::parse`]; the receiver twin records the
//!   trace id on its broadcast.
//!
//! ```
//! use vendora_observe::trace::TraceParent;
//!
//! let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
//! let parent = TraceParent::parse(header).unwrap();
//! assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert_eq!(parent.span_id(), "00f067aa0ba902b7");
//! assert_eq!(parent.to_string(), header);
//! assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
//! ```

use std::fmt;

/// A position in a trace: the trace id and the id of the span that is the parent of what
/// comes next (the write, for an event; the attempt, for its receiver).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

impl TraceParent {
    /// A new trace, started by a write: random ids, sampled.
    pub fn start() -> TraceParent {
        TraceParent {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            sampled: true,
        }
    }

    /// Where a write running now is in its trace: with the feature `opentelemetry`, the
    /// OpenTelemetry context of the current `tracing` span when it has one (a
    /// `tracing-opentelemetry` layer is installed); otherwise a new trace.
    pub fn current() -> TraceParent {
        TraceParent::of_span(&tracing::Span::current()).unwrap_or_else(TraceParent::start)
    }

    /// The OpenTelemetry position of `span`, when it has one (feature `opentelemetry`).
    pub fn of_span(span: &tracing::Span) -> Option<TraceParent> {
        #[cfg(feature = "opentelemetry")]
        return otel::of_span(span);
        #[cfg(not(feature = "opentelemetry"))]
        {
            let _ = span;
            None
        }
    }

    /// Makes `span` continue this trace, as a child of this position: what a receiver does
    /// with the `traceparent` it got. With the feature `opentelemetry` it sets the span's
    /// OpenTelemetry parent; without, it does nothing.
    pub fn adopt(&self, span: &tracing::Span) {
        #[cfg(feature = "opentelemetry")]
        otel::set_parent(span, *self);
        #[cfg(not(feature = "opentelemetry"))]
        let _ = span;
    }

    /// A child position in the same trace: a new span id.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }

    /// Parses a `traceparent` header (version `00`, or a later version's first four fields);
    /// `None` when it is malformed or its ids are all zero, as the specification says.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let header = header.trim();
        let mut parts = header.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) {
            return None;
        }
        if !hex(flags, 2) || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The parent span's id, 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Whether `other` is in the same trace.
    pub(crate) fn same_trace(&self, other: &TraceParent) -> bool {
        self.trace_id == other.trace_id
    }

    /// The header value's bytes, `00-{trace id}-{span id}-{flags}`, made without the
    /// formatting machinery (one per attempt).
    pub(crate) fn header_bytes(&self) -> [u8; 55] {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        // Each slice holds exactly the hex digits of its bytes.
        let _ = hex::encode_to_slice(self.trace_id.to_be_bytes(), &mut out[3..35]);
        let _ = hex::encode_to_slice(self.span_id.to_be_bytes(), &mut out[36..52]);
        let _ = hex::encode_to_slice([u8::from(self.sampled)], &mut out[53..55]);
        out
    }
}

/// The `traceparent` header value: `00-{trace id}-{span id}-{flags}`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ASCII by construction.
        f.write_str(std::str::from_utf8(&self.header_bytes()).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;

    pub(super) fn of_span(span: &tracing::Span) -> Option<TraceParent> {
        if span.is_none() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        })
    }

    pub(super) fn set_parent(span: &tracing::Span, parent: TraceParent) {
        if span.is_none() {
            return;
        }
        let flags = if parent.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let sc = SpanContext::new(
            TraceId::from_bytes(parent.trace_id.to_be_bytes()),
            SpanId::from_bytes(parent.span_id.to_be_bytes()),
            flags,
            true,
            TraceState::default(),
        );
        // Fails only when the span has already started in another context.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_the_specification_refuses() {
        let t = TraceParent::start();
        assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        assert_eq!(t.child().trace_id(), t.trace_id());
        assert_ne!(t.child().span_id(), t.span_id());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        let later = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x");
        assert!(later.is_some_and(|t| !t.sampled));
    }

    #[test]
    fn the_header_is_written_as_the_specification_writes_it() {
        let cases = [
            (
                1,
                1,
                true,
                "00-00000000000000000000000000000001-0000000000000001-01",
            ),
            (
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                0x00f0_67aa_0ba9_02b7,
                false,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            ),
            (
                u128::MAX,
                u64::MAX,
                true,
                "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01",
            ),
        ];
        for (trace_id, span_id, sampled, header) in cases {
            let t = TraceParent {
                trace_id,
                span_id,
                sampled,
            };
            assert_eq!(t.to_string(), header);
            assert_eq!(&t.header_bytes()[..], header.as_bytes());
        }
    }
}
