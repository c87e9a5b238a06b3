//! The dedicated thread with a tokio runtime that an async client (etcd, Kubernetes) runs on,
//! so the blocking [`crate::Store`] trait can be served from plain threads and from inside
//! another runtime alike (the caller's runtime is never re-entered).

use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use tokio::runtime::Handle;

use crate::StoreError;

/// The dedicated runtime thread; stops (dropping in-flight requests) when dropped.
pub(crate) struct RuntimeThread {
    pub(crate) handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeThread {
    pub(crate) fn start(backend: &str) -> Result<RuntimeThread, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("{backend} client runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("malla-{backend}"))
            .spawn(move || {
                // Err just means the store was dropped without sending: stop as well.
                let _ = rt.block_on(stopped);
            })
            .map_err(|e| StoreError::Backend(format!("{backend} client thread: {e}")))?;
        Ok(RuntimeThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Spawns `fut` on the runtime behind `handle` and blocks the calling thread (never a runtime)
/// until it finishes or `timeout` passes.
pub(crate) fn run_on<T: Send + 'static>(
    handle: &Handle,
    timeout: Duration,
    backend: &'static str,
    what: &'static str,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = mpsc::sync_channel(1);
    handle.spawn(async move {
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Backend(format!(
                "{backend} {what}: no answer within {timeout:?}"
            ))),
        };
        let _ = tx.send(r);
    });
    rx.recv()
        .map_err(|_| StoreError::Backend("datastore client runtime stopped".into()))?
}
