//! Background threads. A [`Worker`] is one named thread with a stop signal: spawned with a
//! name, stopped by [`Worker::signal`] or [`Worker::join`], joined when dropped, and a panic in
//! it is logged with the thread's name. Stop signals: dropping (or firing) the [`StopHandle`]
//! wakes every [`StopToken`] at once, including threads parked in `select!` or an
//! interruptible sleep.

use std::any::Any;
use std::future::{pending, poll_fn, Future};
use std::panic::{self, AssertUnwindSafe};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;

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

/// A stop signal for a thread blocked on a future (a gRPC call) rather than on a channel:
/// [`Interrupt::fire`] ends every wait in [`Interrupt::block_on`], now and later, at once.
#[derive(Clone, Default)]
pub struct Interrupt {
    state: Arc<Mutex<InterruptState>>,
}

#[derive(Default)]
struct InterruptState {
    fired: bool,
    /// One per thread waiting (`block_on` wakes through its thread's waker).
    waiting: Vec<Waker>,
}

impl Interrupt {
    pub fn fire(&self) {
        let mut state = self.state.lock();
        state.fired = true;
        for waker in state.waiting.drain(..) {
            waker.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.state.lock().fired
    }

    /// Runs `future` on this thread until it completes (`Some`) or the interrupt fires
    /// (`None`: the future is dropped, which cancels a gRPC call).
    pub fn block_on<F: Future>(&self, future: F) -> Option<F::Output> {
        futures_executor::block_on(self.guard(future))
    }

    /// Sleeps for `duration` unless the interrupt fires first; returns whether it fired.
    pub fn sleep(&self, duration: Duration) -> bool {
        matches!(block_on_by(self.guard(pending::<()>()), Instant::now() + duration), Some(None))
    }

    /// `future`, ending early (`None`) when the interrupt fires.
    pub fn guard<'a, F: Future + 'a>(&'a self, future: F) -> impl Future<Output = Option<F::Output>> + 'a {
        let mut future = Box::pin(future);
        poll_fn(move |cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            let mut state = self.state.lock();
            if state.fired {
                return Poll::Ready(None);
            }
            if !state.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                state.waiting.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

/// Wakes the thread that polls.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` on this thread until it completes (`Some`) or `deadline` passes (`None`,
/// the future dropped). Spurious unparks only cause another poll.
pub(crate) fn block_on_by<F: Future>(future: F, deadline: Instant) -> Option<F::Output> {
    let mut future = pin!(future);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return Some(output);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_by_gives_up_at_the_deadline_and_returns_what_completes() {
        let started = Instant::now();
        let never = futures_util::future::pending::<()>();
        assert!(block_on_by(never, started + Duration::from_millis(50)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));

        // Completed from another thread: the waker unparks the waiting one.
        let (tx, rx) = futures_util::future::abortable(futures_util::future::pending::<()>());
        let aborter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            rx.abort();
        });
        let waited = block_on_by(tx, Instant::now() + Duration::from_secs(10));
        assert!(matches!(waited, Some(Err(_))), "the abort completes the wait");
        aborter.join().unwrap();
    }

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

    #[test]
    fn an_interrupt_ends_a_wait_on_a_future_that_never_completes() {
        let interrupt = Interrupt::default();
        assert_eq!(interrupt.block_on(async { 7 }), Some(7));
        let waiter = {
            let interrupt = interrupt.clone();
            std::thread::spawn(move || interrupt.block_on(std::future::pending::<()>()))
        };
        // Whether the waiter is parked yet or not, the interrupt reaches it.
        interrupt.fire();
        assert_eq!(waiter.join().unwrap(), None);
        assert!(interrupt.is_fired());
        assert_eq!(interrupt.block_on(std::future::pending::<()>()), None, "later waits end at once");
    }
}
