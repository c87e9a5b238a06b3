//! [`PushedWatch`]: the [`Watch`] of backends whose server pushes changes (etcd, Kubernetes).
//! Tasks on the store's runtime thread hold the server-side watches and push batches into a
//! channel; the agent's thread takes them with a timeout. Dropping the watch tells the tasks
//! to stop at their next wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::{Event, StoreError, Watch};

/// How often an idle watch task checks that its consumer is still there.
pub(crate) const IDLE_CHECK: Duration = Duration::from_secs(2);

/// The producing end, held by the watch tasks.
#[derive(Clone)]
pub(crate) struct Pusher {
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
    dropped: Arc<AtomicBool>,
}

impl Pusher {
    /// Sends a batch; false when the consumer is gone (the task should stop).
    pub(crate) fn push(&self, batch: Result<Vec<Event>, StoreError>) -> bool {
        !self.dropped.load(Ordering::Relaxed) && self.tx.send(batch).is_ok()
    }

    /// Whether the consumer dropped the watch.
    pub(crate) fn gone(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The consuming end.
pub(crate) struct PushedWatch {
    rx: mpsc::Receiver<Result<Vec<Event>, StoreError>>,
    /// An error that arrived behind events already returned.
    pending: Option<StoreError>,
    dropped: Arc<AtomicBool>,
}

pub(crate) fn channel() -> (Pusher, PushedWatch) {
    let (tx, rx) = mpsc::channel();
    let dropped = Arc::new(AtomicBool::new(false));
    (
        Pusher {
            tx,
            dropped: dropped.clone(),
        },
        PushedWatch {
            rx,
            pending: None,
            dropped,
        },
    )
}

impl Watch for PushedWatch {
    fn next(&mut self, timeout: Duration) -> Result<Vec<Event>, StoreError> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let mut events = match self.rx.recv_timeout(timeout) {
            Ok(batch) => batch?,
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(Vec::new()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(StoreError::Backend("datastore watch stopped".into()))
            }
        };
        // Everything already queued goes out in one batch; an error after events waits for
        // the next call, so the events before it are not lost.
        while let Ok(more) = self.rx.try_recv() {
            match more {
                Ok(more) => events.extend(more),
                Err(e) => {
                    self.pending = Some(e);
                    break;
                }
            }
        }
        Ok(events)
    }
}

impl Drop for PushedWatch {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Relaxed);
    }
}
