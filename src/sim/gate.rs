//! The replies of hung and slowed stores. gRPC handlers run on completion-queue threads and
//! must not sleep, so a slowed store's reply is a job the gate's own thread runs when it is
//! due, and a hung store's jobs are parked until it resumes, like a SIGSTOPped process whose
//! kernel still accepts connections. Parked jobs of a stopped store are dropped, which
//! cancels their RPCs.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::Result;
use crate::types::StoreId;
use crate::worker::Worker;

type Job = Box<dyn FnOnce() + Send>;

struct Timer {
    due: Instant,
    seq: u64,
    store: StoreId,
    job: Job,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    /// Reversed, so that the max-heap pops the earliest job first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
struct State {
    hung: HashSet<StoreId>,
    delays: HashMap<StoreId, Duration>,
    timers: BinaryHeap<Timer>,
    parked: Vec<(StoreId, Job)>,
    seq: u64,
    shutdown: bool,
}

impl State {
    fn schedule(&mut self, store: StoreId, due: Instant, job: Job) {
        self.seq += 1;
        self.timers.push(Timer { due, seq: self.seq, store, job });
    }

    fn take_parked(&mut self, store: StoreId) -> Vec<Job> {
        let (taken, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(|(s, _)| *s == store);
        self.parked = kept;
        taken.into_iter().map(|(_, job)| job).collect()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

pub struct ReplyGate {
    shared: Arc<Shared>,
    worker: Mutex<Option<Worker>>,
}

impl ReplyGate {
    pub fn start() -> Result<ReplyGate> {
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        // It stops on `shutdown`, which it waits for on its condition variable.
        let worker = Worker::spawn("sh-sim-replies", move |_| run(&worker))?;
        Ok(ReplyGate { shared, worker: Mutex::new(Some(worker)) })
    }

    /// Runs `job` (which sends a reply of `store`) now, after the store's delay, or when the
    /// store resumes; never after `shutdown`.
    pub fn submit(&self, store: StoreId, job: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.state.lock();
        if state.shutdown {
            return;
        }
        if state.hung.contains(&store) {
            state.parked.push((store, Box::new(job)));
            return;
        }
        match state.delays.get(&store).copied().filter(|d| !d.is_zero()) {
            None => {
                drop(state);
                job();
            }
            Some(delay) => {
                state.schedule(store, Instant::now() + delay, Box::new(job));
                self.shared.wake.notify_one();
            }
        }
    }

    pub fn set_hung(&self, store: StoreId, hung: bool) {
        let mut state = self.shared.state.lock();
        if hung {
            state.hung.insert(store);
            return;
        }
        state.hung.remove(&store);
        let now = Instant::now();
        for job in state.take_parked(store) {
            state.schedule(store, now, job);
        }
        self.shared.wake.notify_one();
    }

    pub fn is_hung(&self, store: StoreId) -> bool {
        self.shared.state.lock().hung.contains(&store)
    }

    pub fn set_delay(&self, store: StoreId, delay: Duration) {
        self.shared.state.lock().delays.insert(store, delay);
    }

    /// Forgets the pending replies of a store that went away; their RPCs are cancelled.
    pub fn discard(&self, store: StoreId) {
        let removed = {
            let mut state = self.shared.state.lock();
            let parked = state.take_parked(store);
            let (scheduled, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut state.timers).into_iter().partition(|t| t.store == store);
            state.timers = kept.into_iter().collect();
            (parked, scheduled)
        };
        // Dropping a sink cancels its call: do it outside the lock.
        drop(removed);
    }

    /// Stops the thread and drops every pending job. Jobs hold the sim's state, so the sim
    /// calls this explicitly rather than waiting for a drop that the cycle would prevent.
    pub fn shutdown(&self) {
        let pending = {
            let mut state = self.shared.state.lock();
            state.shutdown = true;
            (std::mem::take(&mut state.parked), std::mem::take(&mut state.timers))
        };
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.lock().take() {
            worker.join();
        }
        drop(pending);
    }
}

impl Drop for ReplyGate {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(shared: &Shared) {
    let mut state = shared.state.lock();
    while !state.shutdown {
        let now = Instant::now();
        match state.timers.peek().map(|t| t.due) {
            Some(due) if due <= now => {
                let timer = state.timers.pop().expect("peeked");
                if state.hung.contains(&timer.store) {
                    state.parked.push((timer.store, timer.job));
                } else {
                    MutexGuard::unlocked(&mut state, timer.job);
                }
            }
            Some(due) => {
                shared.wake.wait_until(&mut state, due);
            }
            None => shared.wake.wait(&mut state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{bounded, Receiver};

    fn recv(rx: &Receiver<u32>, within: Duration) -> Option<u32> {
        rx.recv_timeout(within).ok()
    }

    #[test]
    fn delays_parks_releases_and_discards() {
        let gate = ReplyGate::start().unwrap();
        let (tx, rx) = bounded(16);
        let send = |v: u32| {
            let tx = tx.clone();
            move || tx.send(v).unwrap()
        };
        gate.submit(1, send(1));
        assert_eq!(recv(&rx, Duration::ZERO), Some(1), "no delay: answered inline");

        gate.set_delay(1, Duration::from_millis(100));
        let asked = Instant::now();
        gate.submit(1, send(2));
        assert_eq!(recv(&rx, Duration::from_secs(5)), Some(2));
        assert!(asked.elapsed() >= Duration::from_millis(100));

        gate.set_hung(2, true);
        gate.submit(2, send(3));
        assert_eq!(recv(&rx, Duration::from_millis(200)), None, "hung: parked");
        gate.set_hung(2, false);
        assert_eq!(recv(&rx, Duration::from_secs(5)), Some(3));

        gate.set_hung(2, true);
        gate.submit(2, send(4));
        gate.discard(2);
        gate.set_hung(2, false);
        assert_eq!(recv(&rx, Duration::from_millis(200)), None, "discarded jobs never run");
    }
}
