//! The agent's liveness and readiness, shared between its main loop (which drives them) and
//! its HTTP server (which reports them on `/healthz` and `/readyz`, see [`crate::http`]).
//!
//! - [`Heartbeat`]: the main loop beats once per turn; the agent is alive while the last beat
//!   is younger than [`STALLED_AFTER`]. Each turn is bounded (a watch wait of a fraction of a second,
//!   a datastore request of at most its timeout, one apply), so a loop that stops beating for
//!   that long is stuck, not busy.
//! - [`Readiness`]: false until the first full sync of the datastore has been applied to the
//!   kernel, then true. It is driven by events the loop observes, never by a timer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the main loop may go without a beat before `/healthz` reports it stalled. Far above
/// one turn of the loop (a full apply at 30k Services is under a second; a datastore request
/// gives up after 10 s), well below what a stuck process should be left alone for.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);

/// Proof of life from the main loop: when it last went round.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last beat.
    last: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Heartbeat {
    /// Records that the loop is going round now (one relaxed store: cheap enough for every
    /// turn).
    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat (since creation when there was none).
    pub fn since_last(&self) -> Duration {
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// Whether the loop beat within [`STALLED_AFTER`].
    pub fn alive(&self) -> bool {
        self.since_last() < STALLED_AFTER
    }
}

/// Whether the kernel reflects the datastore: false until the agent has applied its first full
/// sync (a complete listing of the cluster, computed and acknowledged by the dataplane).
///
/// The agent's loop calls [`Readiness::set_ready`] once the syncer's `InSync` has gone through
/// the calculation and the driver acknowledged the full apply that followed. It stays ready
/// while the datastore is away or the syncer re-lists: the kernel keeps the last state applied
/// and traffic flows (taking every node's pods out of service because the datastore blinked
/// would turn a control-plane outage into a data-plane one).
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the first full sync as applied.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Both, as the HTTP server holds them.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub heartbeat: Heartbeat,
    pub readiness: Readiness,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_false_and_is_shared() {
        let r = Readiness::default();
        let seen_by_server = r.clone();
        assert!(!seen_by_server.is_ready());
        r.set_ready();
        assert!(seen_by_server.is_ready());
    }

    #[test]
    fn heartbeat_measures_time_since_the_last_beat() {
        let h = Heartbeat::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.since_last() >= Duration::from_millis(30));
        h.beat();
        assert!(h.since_last() < Duration::from_millis(30));
        assert!(h.alive());
        let stale = Heartbeat {
            epoch: Instant::now() - STALLED_AFTER - Duration::from_secs(1),
            last: Arc::new(AtomicU64::new(0)),
        };
        assert!(!stale.alive());
    }
}
