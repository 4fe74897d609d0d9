//! Stop signals for background threads: dropping (or firing) the [`StopHandle`] wakes every
//! [`StopToken`] at once, including threads parked in `select!` or an interruptible sleep.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

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
    use super::*;

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
