//! Background threads. A [`Worker`] is one named thread with a stop signal: spawned with a
//! name, stopped by [`Worker::signal`] or [`Worker::join`], joined when dropped, and a panic in
//! it is logged with the thread's name. Stop signals: dropping (or firing) the [`StopHandle`]
//! wakes every [`StopToken`] at once, including threads parked in `select!` or an
//! interruptible sleep.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::error::{Error, Result};

/// A named background thread that stops when asked and is joined when dropped.
pub struct Worker {
    name: String,
    stop: Option<StopHandle>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawns `body` on a thread named `name` (`sh-<component>[-<id>]`); the token it gets
    /// fires on [`Worker::signal`], [`Worker::join`] or drop.
    pub fn spawn(name: impl Into<String>, body: impl FnOnce(StopToken) + Send + 'static) -> Result<Worker> {
        let name = name.into();
        let (stop, token) = stop_pair();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || body(token))
            .map_err(|source| Error::Io { what: format!("spawning thread {name}"), source })?;
        Ok(Worker { name, stop: Some(stop), thread: Some(thread) })
    }

    /// Hands the stop signal to someone else: the thread then stops when that handle is
    /// dropped (or fired), and [`Worker::join`] only waits.
    pub fn take_stop(&mut self) -> Option<StopHandle> {
        self.stop.take()
    }

    /// Asks the thread to stop without waiting for it, so that several threads can wind
    /// down together before they are joined.
    pub fn signal(&mut self) {
        self.stop.take();
        if let Some(thread) = &self.thread {
            // The thread may be parked rather than waiting on its token.
            thread.thread().unpark();
        }
    }

    /// Stops the thread and waits for it. False when it panicked (already logged).
    pub fn join(mut self) -> bool {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> bool {
        self.signal();
        let Some(thread) = self.thread.take() else { return true };
        match thread.join() {
            Ok(()) => true,
            Err(panic) => {
                log::error!("thread {} panicked: {}", self.name, panic_message(&*panic));
                false
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into its message.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| panic_message(&*panic))
}

/// Owned by whoever may stop the threads; stopping is dropping.
pub struct StopHandle {
    _sender: Sender<()>,
}

impl StopHandle {
    pub fn stop(self) {}
}

/// Held by the threads; cheap to clone.
#[derive(Clone)]
pub struct StopToken {
    receiver: Receiver<()>,
}

pub fn stop_pair() -> (StopHandle, StopToken) {
    let (sender, receiver) = crossbeam_channel::bounded(0);
    (StopHandle { _sender: sender }, StopToken { receiver })
}

impl StopToken {
    /// A token that never fires, for callers with nothing to stop them.
    pub fn never() -> Self {
        let (handle, token) = stop_pair();
        std::mem::forget(handle);
        token
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.receiver.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps for `d` unless stopped first; returns true when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        matches!(self.receiver.recv_timeout(d), Err(RecvTimeoutError::Disconnected))
    }

    /// Sends `item`, waiting for room unless stopped first. False when stopped or when
    /// nobody listens any more.
    pub fn send<T>(&self, to: &Sender<T>, item: T) -> bool {
        crossbeam_channel::select! {
            send(to, item) -> sent => sent.is_ok(),
            recv(self.receiver) -> _ => false,
        }
    }

    /// For `crossbeam_channel::select!`: becomes ready (with an error) when stopped.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.receiver
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_worker_stops_on_drop_and_reports_a_panic() {
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let worker = Worker::spawn("sh-test-sleeper", move |stop| {
            let stopped = stop.sleep(Duration::from_secs(60));
            let _ = done_tx.send((std::thread::current().name().map(str::to_string), stopped));
        })
        .unwrap();
        drop(worker);
        assert_eq!(
            done.try_recv(),
            Ok((Some("sh-test-sleeper".to_string()), true)),
            "the thread has its name, and dropping joined it stopped"
        );

        let held = Arc::new(());
        let in_thread = held.clone();
        let panicking = Worker::spawn("sh-test-panic", move |_| {
            let _held = in_thread;
            panic!("boom");
        })
        .unwrap();
        assert!(!panicking.join(), "the panic is reported");
        assert_eq!(Arc::strong_count(&held), 1, "what the thread held is released");
        assert_eq!(catch_panic(|| panic!("bang")), Err::<(), _>("bang".to_string()));
    }

    #[test]
    fn dropping_the_handle_wakes_sleepers() {
        let (handle, token) = stop_pair();
        assert!(!token.is_stopped());
        assert!(!token.sleep(Duration::from_millis(1)));
        let sleeper = {
            let token = token.clone();
            std::thread::spawn(move || token.sleep(Duration::from_secs(60)))
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        assert!(token.send(&tx, 1));
        handle.stop();
        assert!(sleeper.join().unwrap());
        assert!(token.is_stopped());
        assert!(!token.send(&tx, 2), "a full channel does not block a stopped sender");
        drop(rx);
    }
}
