//! What a relay says of rows leased to other relays, and the rows it takes back from a
//! relay whose process is gone.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::ConnectionTrait;

use super::Outbox;
use super::claim;
use super::holder::Holder;
use super::lease::now_ms;

/// What [`LeaseNotice`] tells of.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tell {
    /// Every row leased elsewhere, at start-up.
    AtStart,
    /// A look at the relays holding rows: those of a process gone are taken back, and
    /// those whose lease ends before `below` (no longer renewed) are told of.
    Unrenewed { below: i64 },
}

/// How often a relay looks at the relays holding rows of its frontier: a process that
/// died on this machine has its rows taken back within this.
const LOOK_EVERY_MS: i64 = 1_000;

/// Says when rows leased to other relays hold this one's chains, once per relay: at
/// start-up (rows a process left when it stopped without `shutdown` — a crash, kill -9 —
/// and then nothing of their chains goes out for up to a lease), and later of a relay
/// whose rows' lease is no longer renewed (a live relay renews every quarter of the lease
/// at least). Rows of a relay whose process is gone from this machine are taken back.
#[derive(Debug, Default)]
pub(super) struct LeaseNotice {
    /// A claim ran since this relay started.
    started: bool,
    /// Relays told of (a bounded set: emptied when it grows past 1,024).
    told: HashSet<String>,
    /// When the rows leased elsewhere were last read (at most every second).
    looked_at: i64,
}

impl LeaseNotice {
    /// After each claim: whether to read the rows leased elsewhere, given when the first
    /// lease of the frontier's such rows ends (`first`): at most once a second while there
    /// are some. A relay's unrenewed leases stay within half a lease of their end for half
    /// a lease, so every one is told of; a dead process's are taken back within a second.
    pub(super) fn due(&mut self, first: Option<i64>, now: i64, lease: Duration) -> Option<Tell> {
        let started = std::mem::replace(&mut self.started, true);
        first?;
        let lease = lease.as_millis() as i64;
        // A live relay's leases end at least three quarters of a lease from now.
        let below = now + lease / 2;
        let tell = if !started {
            Tell::AtStart
        } else if now - self.looked_at >= LOOK_EVERY_MS {
            Tell::Unrenewed { below }
        } else {
            return None;
        };
        self.looked_at = now;
        Some(tell)
    }

    /// Reads the pending rows leased elsewhere by relay: takes back those of a relay whose
    /// process is gone (see [`super::holder`]), and tells of the others, of relays not told
    /// of yet. Returns whether rows were taken back.
    pub(super) async fn tell(&mut self, outbox: &Outbox, relay: &str, tell: Tell) -> bool {
        let inner = &outbox.inner;
        let now = now_ms();
        let (whose, below) = match tell {
            Tell::AtStart => ("another relay", i64::MAX),
            Tell::Unrenewed { below } => ("a relay that no longer renews its lease", below),
        };
        // Every holder is read, so that a dead process's rows are taken back at once; only
        // those whose lease ends before `below` are told of.
        let rows = match inner
            .options
            .db
            .query_all_raw(claim::leased_elsewhere_statement(
                inner.backend,
                relay,
                now,
                i64::MAX,
            ))
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!("outbox: reading rows leased elsewhere failed: {e}");
                return false;
            }
        };
        if self.told.len() > 1024 {
            self.told.clear();
        }
        let (mut events, mut until, mut took_back, mut running) = (0, None::<i64>, false, 0);
        for r in rows {
            let (Ok(holder), Ok(n), Ok(last)) = (
                r.try_get::<String>("", "relay"),
                r.try_get::<i64>("", "n"),
                r.try_get::<i64>("", "until"),
            ) else {
                continue;
            };
            let pid = match super::holder::judge(&holder) {
                // A relay of a process that runs on this machine (this one included, under
                // an earlier identity) renews its leases or lets them end.
                // Said once per relay: the look runs every second.
                Holder::Running => {
                    if self.told.insert(holder) {
                        running += n;
                    }
                    continue;
                }
                Holder::Gone(pid) => Some(pid),
                Holder::Unknown => None,
            };
            if let Some(pid) = pid
                && take_back(outbox, &holder, pid).await
            {
                took_back = true;
                continue;
            }
            if last >= below {
                // Renewed lately: a live relay elsewhere.
                continue;
            }
            if self.told.insert(holder) {
                events += n;
                until = until.max(Some(last));
            }
        }
        if running > 0 {
            tracing::info!(
                "outbox: {running} pending event(s) are leased to relays of processes running \
                 on this machine (this one included); their chains wait for those relays"
            );
        }
        let Some(until) = until else {
            return took_back;
        };
        crate::diagnostics::warn(
            crate::diagnostics::Kind::Setup,
            format_args!(
                "outbox: {events} pending event(s) are leased to {whose}, for up to {} s \
                 more, and the events after them in their chains wait for them. With no \
                 other instance running, they were left by a process that stopped without \
                 `Observer::shutdown` (a crash, kill -9) and go out when their lease ends \
                 (OutboxOptions::lease, {} s)",
                ((until - now).max(0) as u64).div_ceil(1000),
                inner.options.lease.as_secs()
            ),
        );
        took_back
    }
}

/// Hands back every pending row leased to `holder`, a relay whose process (`pid`) is gone,
/// and says so. Whether it did.
async fn take_back(outbox: &Outbox, holder: &str, pid: u32) -> bool {
    let inner = &outbox.inner;
    match inner
        .options
        .db
        .execute_raw(claim::release_all_statement(inner.backend, holder))
        .await
    {
        Ok(done) => {
            crate::diagnostics::warn(
                crate::diagnostics::Kind::Setup,
                format_args!(
                    "outbox: took back {} pending event(s) leased to a relay whose process \
                     (pid {pid}, this machine) is gone: it stopped without \
                     `Observer::shutdown` (a crash, kill -9); they go out now",
                    done.rows_affected()
                ),
            );
            true
        }
        Err(e) => {
            tracing::debug!("outbox: taking back the rows of relay {holder}: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    #[test]
    fn rows_leased_elsewhere_are_read_at_start_then_once_a_second() {
        let mut notice = LeaseNotice::default();
        // The first claim finds another relay's rows: read whatever their lease.
        assert!(matches!(
            notice.due(Some(1_060_000), 1_000_000, LEASE),
            Some(Tell::AtStart)
        ));
        // Within a second of the last look: not read again.
        assert!(notice.due(Some(1_046_000), 1_000_500, LEASE).is_none());
        // A second later: read, telling only of leases ending within half a lease.
        assert!(matches!(
            notice.due(Some(1_080_000), 1_001_000, LEASE),
            Some(Tell::Unrenewed { below: 1_031_000 })
        ));
        assert!(notice.due(Some(1_080_000), 1_001_999, LEASE).is_none());
        assert!(notice.due(Some(1_080_000), 1_002_000, LEASE).is_some());
        // Nothing leased elsewhere: nothing to read.
        assert!(notice.due(None, 1_095_000, LEASE).is_none());
    }

    #[test]
    fn a_first_claim_without_leased_rows_ends_the_start_up_notice() {
        let mut notice = LeaseNotice::default();
        assert!(notice.due(None, 1_000_000, LEASE).is_none());
        // Another relay's rows, later: read as a look (told of only when unrenewed), not
        // as the start-up notice.
        assert!(matches!(
            notice.due(Some(1_061_000), 1_001_000, LEASE),
            Some(Tell::Unrenewed { .. })
        ));
    }
}
