//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! With the feature on, every observer records what it does under the names below; install
//! any `metrics` recorder (e.g. `metrics-exporter-prometheus`) to collect them. Without a
//! recorder, or without the feature, nothing is recorded and nothing is paid.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `vendora_observe_events_emitted_total` | counter | event, mode | events the hooks handed to an observer (outbox: rows written, also in transactions later rolled back) |
//! | `vendora_observe_events_sent_total` | counter | event, mode | events answered 2xx |
//! | `vendora_observe_attempts_failed_total` | counter | event, mode | attempts that failed (every retry's failure counts) |
//! | `vendora_observe_events_retried_total` | counter | event, mode | retries scheduled |
//! | `vendora_observe_events_dead_total` | counter | event, mode | events given up on (dead-lettered) |
//! | `vendora_observe_events_shed_total` | counter | event, mode | events refused by a full or closed queue (direct mode) |
//! | `vendora_observe_events_superseded_total` | counter | event, mode | events not sent because a newer one of their row superseded them |
//! | `vendora_observe_pending_events` | gauge | mode | events accepted and not yet delivered, dead or superseded (outbox: pending rows in the table) |
//! | `vendora_observe_oldest_pending_age_seconds` | gauge | mode | age of the oldest pending event; 0 when none is pending |
//! | `vendora_observe_delivery_latency_seconds` | histogram | event, mode | from the write (outbox: the row's insertion) to the 2xx |
//! | `vendora_observe_attempt_duration_seconds` | histogram | event, mode, outcome | one POST, `outcome` = `ok` or `error` |
//!
//! The counters are the ones [`Observer::stats`](crate::Observer::stats) reads, recorded at
//! the same moments. The gauges are sampled once a second (in outbox mode the pending count
//! is the one [`Stats::pending`](crate::Stats::pending) holds). `mode` is `direct` or `outbox`;
//! `event` is the event name (`product:updated`); no label carries a row key, so the number of
//! series stays bounded by the number of event names.

use std::time::{Duration, SystemTime};

/// Which delivery mode an observer runs, as the `mode` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Direct,
    Outbox,
}

impl Mode {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Outbox => "outbox",
        }
    }
}

/// The counters, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Emitted,
    Sent,
    Failed,
    Retried,
    Dead,
    Shed,
    Superseded,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Count {
    const ALL: [Count; 7] = [
        Count::Emitted,
        Count::Sent,
        Count::Failed,
        Count::Retried,
        Count::Dead,
        Count::Shed,
        Count::Superseded,
    ];

    fn name(self) -> &'static str {
        match self {
            Count::Emitted => "vendora_observe_events_emitted_total",
            Count::Sent => "vendora_observe_events_sent_total",
            Count::Failed => "vendora_observe_attempts_failed_total",
            Count::Retried => "vendora_observe_events_retried_total",
            Count::Dead => "vendora_observe_events_dead_total",
            Count::Shed => "vendora_observe_events_shed_total",
            Count::Superseded => "vendora_observe_events_superseded_total",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Count::Emitted => "Events the hooks handed to an observer",
            Count::Sent => "Events delivered (answered 2xx)",
            Count::Failed => "Delivery attempts that failed",
            Count::Retried => "Retries scheduled after a failed attempt",
            Count::Dead => "Events given up on (dead-lettered)",
            Count::Shed => "Events refused because the queue was full or closed",
            Count::Superseded => {
                "Events not sent because a newer event of their row superseded them"
            }
        }
    }
}

#[cfg(feature = "metrics")]
mod imp {
    use super::*;

    const PENDING: &str = "vendora_observe_pending_events";
    const OLDEST: &str = "vendora_observe_oldest_pending_age_seconds";
    const LATENCY: &str = "vendora_observe_delivery_latency_seconds";
    const ATTEMPT: &str = "vendora_observe_attempt_duration_seconds";

    /// Describes every metric to the installed recorder (names, units, help).
    pub(crate) fn describe() {
        use metrics::Unit;
        for c in Count::ALL {
            metrics::describe_counter!(c.name(), Unit::Count, c.help());
        }
        metrics::describe_gauge!(
            PENDING,
            Unit::Count,
            "Events accepted and not yet delivered"
        );
        metrics::describe_gauge!(OLDEST, Unit::Seconds, "Age of the oldest pending event");
        metrics::describe_histogram!(
            LATENCY,
            Unit::Seconds,
            "From the write to the receiver's 2xx"
        );
        metrics::describe_histogram!(ATTEMPT, Unit::Seconds, "One delivery attempt (a POST)");
    }

    pub(crate) fn count(c: Count, mode: Mode, event: &str, n: u64) {
        metrics::counter!(c.name(), "event" => event.to_owned(), "mode" => mode.label())
            .increment(n);
    }

    pub(crate) fn delivered(mode: Mode, event: &str, born: SystemTime) {
        if let Ok(age) = SystemTime::now().duration_since(born) {
            metrics::histogram!(LATENCY, "event" => event.to_owned(), "mode" => mode.label())
                .record(age.as_secs_f64());
        }
    }

    pub(crate) fn attempt(mode: Mode, event: &str, took: Duration, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        metrics::histogram!(
            ATTEMPT,
            "event" => event.to_owned(),
            "mode" => mode.label(),
            "outcome" => outcome
        )
        .record(took.as_secs_f64());
    }

    pub(crate) fn backlog(mode: Mode, pending: u64, oldest: Option<SystemTime>) {
        metrics::gauge!(PENDING, "mode" => mode.label()).set(pending as f64);
        let age = oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        metrics::gauge!(OLDEST, "mode" => mode.label()).set(age.as_secs_f64());
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::*;

    #[inline(always)]
    pub(crate) fn count(_: Count, _: Mode, _: &str, _: u64) {}

    #[inline(always)]
    pub(crate) fn delivered(_: Mode, _: &str, _: SystemTime) {}

    #[inline(always)]
    pub(crate) fn attempt(_: Mode, _: &str, _: Duration, _: bool) {}
}

pub(crate) use imp::*;
