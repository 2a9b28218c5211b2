//! What the server tells its operator: through `tracing`, or on standard error when the
//! program installed no subscriber (a receiver embedded in an application that logs
//! nothing must still say what it refused). Floods are summed up, never a line per request:
//! [`Tally`] logs the first of a kind at once, then a count every 10 s while it lasts.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

/// Whether a `tracing` subscriber would see a line from here.
fn has_subscriber() -> bool {
    !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
}

/// A warning.
pub(crate) fn warn(message: fmt::Arguments<'_>) {
    tracing::warn!(target: "vendora_observe_server", "{message}");
    if !has_subscriber() {
        eprintln!("vendora-observe-server warning: {message}");
    }
}

/// A line of information.
pub(crate) fn info(message: fmt::Arguments<'_>) {
    tracing::info!(target: "vendora_observe_server", "{message}");
    if !has_subscriber() {
        eprintln!("vendora-observe-server: {message}");
    }
}

/// Text from the network, made safe to print on a terminal or in a log: control characters
/// (escape sequences, carriage returns forging a line) and bidi overrides are shown as
/// `\u{…}`, so a request can neither forge lines nor rewrite the terminal.
///
/// ```
/// assert_eq!(vendora_observe_server::escaped("a\r\n✓ b"), "a\\u{d}\\u{a}✓ b");
/// ```
pub fn escaped(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// How often refusals of one kind are summed up, after the first one.
pub(crate) const REPORT_WINDOW: Duration = Duration::from_secs(10);

/// Counts of things refused, by kind: the first of a kind is logged at once, the next
/// ones counted and summed up once the window since the last line has passed.
pub(crate) struct Tally {
    window: Duration,
    kinds: Mutex<HashMap<&'static str, Count>>,
}

struct Count {
    /// When the last line about this kind was logged.
    logged: Instant,
    /// Refusals since, not logged yet.
    more: u64,
}

impl Tally {
    pub(crate) fn new(window: Duration) -> Self {
        Tally {
            window,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one of `kind`; logs `first` (with a note that more are summed up) if none of
    /// its kind was logged within the window.
    pub(crate) fn note(&self, kind: &'static str, first: fmt::Arguments<'_>) {
        if self.count(kind, Instant::now()) {
            warn(format_args!(
                "{first}; more like it are summed up every {} s",
                self.window.as_secs()
            ));
        }
    }

    /// Whether this one is to be logged now (else it was counted).
    fn count(&self, kind: &'static str, now: Instant) -> bool {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        match kinds.get_mut(kind) {
            Some(c) => {
                c.more += 1;
                false
            }
            None => {
                kinds.insert(
                    kind,
                    Count {
                        logged: now,
                        more: 0,
                    },
                );
                true
            }
        }
    }

    /// The kinds whose window has passed, with the count since their last line. A kind
    /// with none is forgotten, so that its next one is logged at once.
    fn due(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        kinds.retain(|kind, c| {
            if now.duration_since(c.logged) < self.window {
                return true;
            }
            if c.more == 0 {
                return false;
            }
            out.push((*kind, std::mem::take(&mut c.more)));
            c.logged = now;
            true
        });
        out
    }

    /// Sums up what was counted, once a second, for as long as the tally lives.
    pub(crate) async fn report(tally: Weak<Tally>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(tally) = tally.upgrade() else {
                return;
            };
            let window = tally.window.as_secs();
            for (kind, n) in tally.due(Instant::now()) {
                warn(format_args!(
                    "{kind}: {n} more time(s) in the last {window} s"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_kind_is_logged_the_next_ones_summed_up_once_a_window() {
        let r = Tally::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(r.count("too large", at(0)), "the first is logged");
        assert!(!r.count("too large", at(1)));
        assert!(!r.count("too large", at(2)));
        assert!(r.count("slow", at(2)), "another kind is logged at once");
        assert!(
            r.due(at(9)).is_empty(),
            "within the window, nothing is summed up"
        );
        assert_eq!(r.due(at(10)), [("too large", 2)]);
        // The flood goes on: counted, summed up one window after the last line.
        assert!(!r.count("too large", at(11)));
        assert!(r.due(at(19)).is_empty());
        assert_eq!(r.due(at(20)), [("too large", 1)]);
        // Quiet for a window: forgotten, and the next one is logged at once again.
        assert!(r.due(at(30)).is_empty());
        assert!(r.count("too large", at(31)));
    }

    #[test]
    fn network_text_cannot_forge_lines_or_drive_the_terminal() {
        assert_eq!(escaped("order:created"), "order:created");
        assert_eq!(
            escaped("x\r\n✓ product:created\u{1b}[2J\u{202e}"),
            "x\\u{d}\\u{a}✓ product:created\\u{1b}[2J\\u{202e}"
        );
    }
}
