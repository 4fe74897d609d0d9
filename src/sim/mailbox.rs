//! A bounded queue from the sim's threads to the future that feeds one subscription stream
//! (which runs on a gRPC completion-queue thread, so it must never block). Like TiKV, which
//! drops a broadcast when a subscriber's queue is full, a batch that does not fit is dropped.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    /// The receiver took an item and has not finished sending it.
    in_flight: bool,
    waker: Option<Waker>,
    senders: usize,
    receiver_gone: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    drained: Condvar,
}

pub struct Outbox<T>(Arc<Shared<T>>);
pub struct Inbox<T>(Arc<Shared<T>>);

pub fn mailbox<T>(capacity: usize) -> (Outbox<T>, Inbox<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            capacity,
            in_flight: false,
            waker: None,
            senders: 1,
            receiver_gone: false,
        }),
        drained: Condvar::new(),
    });
    (Outbox(shared.clone()), Inbox(shared))
}

impl<T> Outbox<T> {
    /// Queues all of `items` or none of them; false when they were dropped (queue full or
    /// receiver gone).
    pub fn push_all(&self, items: Vec<T>) -> bool {
        let waker = {
            let mut state = self.0.state.lock();
            if state.receiver_gone || state.queue.len() + items.len() > state.capacity {
                return false;
            }
            state.queue.extend(items);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    pub fn is_closed(&self) -> bool {
        self.0.state.lock().receiver_gone
    }

    /// Waits until everything queued so far was handed to gRPC, or the receiver is gone, or
    /// `deadline` passes; true unless the deadline passed.
    pub fn wait_drained(&self, deadline: Instant) -> bool {
        let mut state = self.0.state.lock();
        while !state.receiver_gone && (state.in_flight || !state.queue.is_empty()) {
            if self.0.drained.wait_until(&mut state, deadline).timed_out() {
                return false;
            }
        }
        true
    }
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        self.0.state.lock().senders += 1;
        Outbox(self.0.clone())
    }
}

impl<T> Drop for Outbox<T> {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.0.state.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Inbox<T> {
    /// The next item; `None` once every sender is gone and the queue is empty. The item
    /// counts as in flight until [`Inbox::sent`].
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut state = self.0.state.lock();
            if let Some(item) = state.queue.pop_front() {
                state.in_flight = true;
                return Poll::Ready(Some(item));
            }
            if state.senders == 0 {
                return Poll::Ready(None);
            }
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The item from the last `recv` was handed to gRPC.
    pub fn sent(&self) {
        self.0.state.lock().in_flight = false;
        self.0.drained.notify_all();
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.receiver_gone = true;
        state.queue.clear();
        drop(state);
        self.0.drained.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn delivers_in_order_drops_when_full_and_ends_with_senders() {
        let (tx, mut rx) = mailbox(3);
        assert!(tx.push_all(vec![1, 2]));
        assert!(!tx.push_all(vec![3, 4]), "the whole batch is dropped when it does not fit");
        let tx2 = tx.clone();
        assert!(tx2.push_all(vec![3]));
        assert!(!tx.wait_drained(Instant::now() + Duration::from_millis(10)));
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(futures_executor::block_on(rx.recv()).unwrap());
            rx.sent();
        }
        assert_eq!(got, [1, 2, 3]);
        assert!(tx.wait_drained(Instant::now()));
        drop((tx, tx2));
        assert_eq!(futures_executor::block_on(rx.recv()), None);
    }

    #[test]
    fn senders_see_a_gone_receiver() {
        let (tx, rx) = mailbox::<u8>(1);
        drop(rx);
        assert!(tx.is_closed() && !tx.push_all(vec![1]));
        assert!(tx.wait_drained(Instant::now()));
    }
}
