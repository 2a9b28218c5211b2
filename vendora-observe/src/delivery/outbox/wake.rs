//! What wakes an idle relay besides its poll: PostgreSQL's `NOTIFY` at a commit, and the
//! looks again after a wake-up by a write of this process that found nothing yet.

use std::time::Duration;

#[cfg(feature = "postgres")]
use sea_orm::DbBackend;

#[cfg(feature = "postgres")]
pub(crate) type Listener = Option<sqlx::postgres::PgListener>;
#[cfg(not(feature = "postgres"))]
pub(crate) type Listener = Option<()>;

#[cfg(feature = "postgres")]
pub(crate) async fn listen(db: &sea_orm::DatabaseConnection) -> Listener {
    if db.get_database_backend() != DbBackend::Postgres {
        return None;
    }
    // A pool of its own, of one connection, made with the application pool's options:
    // `PgListener` keeps the connection it takes for as long as it lives, and taken from the
    // application's pool it was one connection fewer for the application (with a pool of
    // one, none: the application's next query waited for its acquire timeout).
    let options = db.get_postgres_connection_pool().connect_options();
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with((*options).clone());
    match sqlx::postgres::PgListener::connect_with(&own).await {
        Ok(mut l) => match l.listen(super::CHANNEL).await {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::warn!("outbox: LISTEN failed, polling instead: {e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("outbox: no LISTEN connection, polling instead: {e}");
            None
        }
    }
}

#[cfg(not(feature = "postgres"))]
pub(crate) async fn listen(_db: &sea_orm::DatabaseConnection) -> Listener {
    None
}

/// Waits for a NOTIFY, or forever without a listener.
pub(super) async fn notified(listener: &mut Listener) {
    #[cfg(feature = "postgres")]
    if let Some(l) = listener {
        if l.recv().await.is_err() {
            // The listener reconnects by itself on the next recv; do not spin meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return;
    }
    let _ = listener;
    std::future::pending::<()>().await
}

/// How long a relay listening for `NOTIFY` waits for it after a wake-up by a write of its
/// own process before looking anyway.
pub(super) const NOTIFY_GRACE: Duration = Duration::from_millis(20);

/// The looks again after a wake-up by a write of this process that found nothing. The hook
/// writes the outbox row, and wakes the relay, before the write's transaction commits (no
/// commit hook reaches it): the relay then looks 1, 2, 4 … 64 ms later, until it finds
/// work, rather than at its next poll (SQLite has no NOTIFY).
#[derive(Debug, Default)]
pub(super) struct Recheck {
    /// When to look again, and how many looks found nothing since the wake-up.
    next: Option<(tokio::time::Instant, u32)>,
    /// A wake-up came since the last claim.
    woken: bool,
}

impl Recheck {
    /// The looks after a wake-up, at most: 1 + 2 + … + 64 ms, 127 ms in all.
    const LOOKS: u32 = 7;

    pub(super) fn woken(&mut self) {
        self.woken = true;
    }

    /// A wake-up by a write of this process on PostgreSQL, whose `NOTIFY` comes at the
    /// write's commit: a look before it would find nothing and delay the look the `NOTIFY`
    /// brings, so the relay looks only should no `NOTIFY` have come [`NOTIFY_GRACE`] later
    /// (the `LISTEN` connection was being re-established), then as after any wake-up.
    pub(super) fn woken_awaiting_notify(&mut self) {
        self.woken = true;
        let at = tokio::time::Instant::now() + NOTIFY_GRACE;
        if self.next.is_none_or(|(next, _)| at < next) {
            self.next = Some((at, 0));
        }
    }

    pub(super) fn after_claim(&mut self, found_nothing: bool) {
        let looks = match (std::mem::take(&mut self.woken), self.next) {
            _ if !found_nothing => {
                self.next = None;
                return;
            }
            (true, _) => 0,
            (false, Some((_, n))) => n + 1,
            (false, None) => return,
        };
        self.next = (looks < Self::LOOKS).then(|| {
            (
                tokio::time::Instant::now() + Duration::from_millis(1 << looks),
                looks,
            )
        });
    }

    /// A `NOTIFY` came: the listener works, and it will bring this process's commits too.
    pub(super) fn notified(&mut self) {
        *self = Recheck::default();
    }

    pub(super) fn pending(&self) -> bool {
        self.next.is_some()
    }

    pub(super) async fn due(&self) {
        match self.next {
            Some((at, _)) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wake_that_finds_nothing_looks_again_1_2_4_to_64_ms_later() {
        let mut r = Recheck::default();
        r.after_claim(true);
        assert!(!r.pending(), "no wake-up, no look again");
        r.woken();
        let mut waits = Vec::new();
        r.after_claim(true);
        while r.pending() {
            let before = tokio::time::Instant::now();
            r.due().await;
            waits.push(before.elapsed().as_millis());
            r.after_claim(true);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64]);
        r.woken();
        r.after_claim(true);
        r.due().await;
        r.after_claim(false);
        assert!(!r.pending(), "work found: no more looks");
    }

    #[tokio::test(start_paused = true)]
    async fn a_listening_relay_woken_by_its_own_write_waits_for_the_notify() {
        // The NOTIFY comes: the look it brings is the only one.
        let mut r = Recheck::default();
        r.woken_awaiting_notify();
        assert!(r.pending(), "a look should no NOTIFY come");
        r.notified();
        assert!(!r.pending(), "the NOTIFY's look replaces it");
        r.after_claim(true);
        assert!(
            !r.pending(),
            "a NOTIFY's look that finds nothing looks no more"
        );
        // No NOTIFY comes (LISTEN is being re-established): a look after NOTIFY_GRACE,
        // then the looks of any wake-up.
        r.woken_awaiting_notify();
        let start = tokio::time::Instant::now();
        r.due().await;
        assert_eq!(start.elapsed(), NOTIFY_GRACE);
        r.after_claim(true);
        let before = tokio::time::Instant::now();
        r.due().await;
        assert_eq!(before.elapsed().as_millis(), 1);
        // A second write's wake-up does not put off a look already due sooner.
        r.woken_awaiting_notify();
        let before = tokio::time::Instant::now();
        r.due().await;
        assert!(before.elapsed() <= Duration::from_millis(2));
    }
}
