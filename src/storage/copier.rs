//! The advancer's side of the storage copy: the ticker hands over each checkpoint that etcd
//! now holds, and one worker thread writes the latest value per task to the task's storage.
//! The ticker never waits for a storage; a write that fails is tried again when the next
//! upload (an advance, or the heartbeat) offers a value above what the storage holds.
//!
//! Safety: only values that etcd already held (a fenced upload succeeded) are offered, and
//! the storage is written only while its task is known and ownership has not been lost
//! since the value was offered. One write already in flight when ownership or the task
//! goes cannot be called back; it carries a value that was true when it was offered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use super::{write_global_checkpoint, ExternalStorage};
use crate::daemon::metrics::Metrics;
use crate::error::{Error, Result};
use crate::proto::brpb::StorageBackend;
use crate::types::Ts;
use crate::worker::{StopToken, Worker as Thread};

/// What one write did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    Written(Ts),
    Failed,
}

impl CopyOutcome {
    /// The gauge moves only on success; failures are counted.
    pub fn record(self, metrics: &Metrics, task: &str) {
        match self {
            CopyOutcome::Written(ts) => metrics.external_storage_checkpoint.set([task], ts as f64),
            CopyOutcome::Failed => metrics.storage_write_failures.inc_by([task], 1),
        }
    }
}

type Opener = dyn Fn(&StorageBackend) -> Result<Box<dyn ExternalStorage>> + Send;
type Report = dyn Fn(&str, CopyOutcome) + Send;

struct Entry {
    backend: StorageBackend,
    /// The newest value etcd holds that the storage may not have yet.
    pending: Option<Ts>,
    /// What this owner last wrote successfully.
    written: Option<Ts>,
    /// Consecutive failures, for logging once and summarising.
    failures: u64,
    /// An unsupported backend: reported once, then skipped.
    unsupported: bool,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, Entry>,
    /// Bumped on ownership loss: storage handles and write results of an older term are
    /// dropped.
    term: u64,
    timeout: Duration,
}

struct Job {
    task: String,
    backend: StorageBackend,
    ts: Ts,
    term: u64,
    timeout: Duration,
}

impl State {
    fn next_job(&mut self) -> Option<Job> {
        let (term, timeout) = (self.term, self.timeout);
        self.tasks.iter_mut().find_map(|(task, entry)| {
            let ts = entry.pending.take()?;
            (!entry.unsupported && entry.written.map_or(true, |w| ts > w)).then(|| Job {
                task: task.clone(),
                backend: entry.backend.clone(),
                ts,
                term,
                timeout,
            })
        })
    }

    /// The task's entry if the job still speaks for it: same term, same storage.
    fn entry_of(&mut self, job: &Job) -> Option<&mut Entry> {
        let term = self.term;
        self.tasks.get_mut(&job.task).filter(|e| term == job.term && e.backend == job.backend)
    }
}

/// Owned by the ticker. Dropping it stops the worker and joins it (at most one write's
/// timeout).
pub struct CheckpointCopier {
    state: Arc<Mutex<State>>,
    /// Values uploaded during the current tick, handed over after its GC step.
    staged: Vec<(String, Ts)>,
    wake: Sender<()>,
    _thread: Thread,
}

impl CheckpointCopier {
    /// A copier writing through [`super::open`]; `report` sees every write's outcome.
    pub fn start(report: impl Fn(&str, CopyOutcome) + Send + 'static) -> Result<CheckpointCopier> {
        Self::with_opener(super::open, report)
    }

    /// As [`Self::start`], with the storages opened by `opener` (tests plug fakes in).
    pub fn with_opener(
        opener: impl Fn(&StorageBackend) -> Result<Box<dyn ExternalStorage>> + Send + 'static,
        report: impl Fn(&str, CopyOutcome) + Send + 'static,
    ) -> Result<CheckpointCopier> {
        let state = Arc::new(Mutex::new(State::default()));
        let (wake, woken) = bounded(1);
        let worker = Worker {
            state: state.clone(),
            open: Box::new(opener),
            report: Box::new(report),
            handles: HashMap::new(),
            term: 0,
        };
        let thread = Thread::spawn("sh-storage-copier", move |stop| worker.run(woken, stop))?;
        Ok(CheckpointCopier { state, staged: Vec::new(), wake, _thread: thread })
    }

    /// A task appeared or was redefined: its storage is opened at its first write (again,
    /// if the storage changed).
    pub fn register(&self, task: &str, backend: &StorageBackend) {
        let mut state = self.state.lock();
        if state.tasks.get(task).is_some_and(|e| &e.backend == backend) {
            return;
        }
        let entry = Entry { backend: backend.clone(), pending: None, written: None, failures: 0, unsupported: false };
        state.tasks.insert(task.to_string(), entry);
    }

    /// The task is gone: nothing more is written for it and its storage is closed.
    pub fn forget(&mut self, task: &str) {
        self.staged.retain(|(t, _)| t != task);
        self.state.lock().tasks.remove(task);
        self.nudge();
    }

    /// Ownership is lost: pending values and storage handles are dropped; the next owner
    /// term starts from scratch.
    pub fn clear(&mut self) {
        self.staged.clear();
        let mut state = self.state.lock();
        state.term += 1;
        for entry in state.tasks.values_mut() {
            entry.pending = None;
            entry.written = None;
        }
        drop(state);
        self.nudge();
    }

    /// etcd now holds `ts` for `task` (an upload succeeded, or found a higher value).
    pub fn stage(&mut self, task: &str, ts: Ts) {
        self.staged.push((task.to_string(), ts));
    }

    /// Hands the staged values to the worker; each write is bounded by `timeout`.
    pub fn submit(&mut self, timeout: Duration) {
        if self.staged.is_empty() {
            return;
        }
        let mut state = self.state.lock();
        state.timeout = timeout;
        for (task, ts) in self.staged.drain(..) {
            if let Some(entry) = state.tasks.get_mut(&task) {
                entry.pending = entry.pending.max(Some(ts));
            }
        }
        drop(state);
        self.nudge();
    }

    fn nudge(&self) {
        let _ = self.wake.try_send(());
    }
}

struct Worker {
    state: Arc<Mutex<State>>,
    open: Box<Opener>,
    report: Box<Report>,
    /// Open storages by task, with the backend they were opened for.
    handles: HashMap<String, (StorageBackend, Box<dyn ExternalStorage>)>,
    /// The term the handles belong to.
    term: u64,
}

impl Worker {
    fn run(mut self, woken: Receiver<()>, stop: StopToken) {
        loop {
            crossbeam_channel::select! {
                recv(stop.receiver()) -> _ => return,
                recv(woken) -> _ => {}
            }
            loop {
                let job = {
                    let mut state = self.state.lock();
                    if self.term != state.term {
                        self.term = state.term;
                        self.handles.clear();
                    }
                    self.handles.retain(|task, _| state.tasks.contains_key(task));
                    state.next_job()
                };
                let Some(job) = job else { break };
                if stop.is_stopped() {
                    return;
                }
                self.copy(job);
            }
        }
    }

    fn copy(&mut self, job: Job) {
        let result = self.storage_of(&job).and_then(|storage| {
            write_global_checkpoint(storage, job.ts, job.timeout).map(|()| storage.url().to_string())
        });
        let mut state = self.state.lock();
        let Some(entry) = state.entry_of(&job) else { return };
        let task = &job.task;
        match result {
            Ok(url) => {
                entry.written = entry.written.max(Some(job.ts));
                if entry.failures > 0 {
                    log::info!(
                        "task {task}: the checkpoint copy in {url} is written again ({}) after {} failures in a row",
                        job.ts,
                        entry.failures
                    );
                }
                entry.failures = 0;
                (self.report)(task, CopyOutcome::Written(job.ts));
            }
            Err(Error::StorageUnsupported { backend }) => {
                entry.unsupported = true;
                log::warn!("task {task}: {backend} storage is not supported for the checkpoint copy; skipping it");
            }
            Err(e) => {
                entry.failures += 1;
                // Logged once, then at 10, 100, … consecutive failures; recovery is logged too.
                if is_power_of_ten(entry.failures) {
                    log::warn!(
                        "task {task}: failed to write the global checkpoint {} to external storage \
                         (failures in a row: {}; retried at the next upload): {e}",
                        job.ts,
                        entry.failures
                    );
                }
                (self.report)(task, CopyOutcome::Failed);
            }
        }
    }

    /// The task's open storage, opened (again) when missing or opened for another backend.
    fn storage_of(&mut self, job: &Job) -> Result<&dyn ExternalStorage> {
        let stale = self.handles.get(&job.task).map_or(true, |(backend, _)| backend != &job.backend);
        if stale {
            let storage = (self.open)(&job.backend)?;
            self.handles.insert(job.task.clone(), (job.backend.clone(), storage));
        }
        Ok(self.handles[&job.task].1.as_ref())
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::meta::parse_storage_url;
    use crate::testing::wait_until;

    const WAIT: Duration = Duration::from_secs(10);

    /// Records what the copier does; `fail` makes every write fail.
    #[derive(Default)]
    struct Log {
        opens: Vec<String>,
        writes: Vec<(String, Ts)>,
        outcomes: Vec<(String, CopyOutcome)>,
        fail: bool,
    }

    struct FakeStorage {
        url: String,
        log: Arc<Mutex<Log>>,
    }

    impl ExternalStorage for FakeStorage {
        fn write(&self, name: &str, data: &[u8], _: Duration) -> Result<()> {
            assert_eq!(name, super::super::GLOBAL_CHECKPOINT_FILE);
            let mut log = self.log.lock();
            if log.fail {
                return Err(Error::Storage { url: self.url.clone(), reason: "refused".into() });
            }
            log.writes.push((self.url.clone(), super::super::decode_checkpoint(data).unwrap()));
            Ok(())
        }
        fn read(&self, _: &str, _: Duration) -> Result<Option<Vec<u8>>> {
            unreachable!("the copier never reads")
        }
        fn url(&self) -> &str {
            &self.url
        }
    }

    fn copier(log: &Arc<Mutex<Log>>) -> CheckpointCopier {
        let (opens, reports) = (log.clone(), log.clone());
        CheckpointCopier::with_opener(
            move |backend| {
                let url = crate::meta::describe_storage(backend);
                opens.lock().opens.push(url.clone());
                if backend.has_noop() {
                    return Err(Error::StorageUnsupported { backend: "noop" });
                }
                Ok(Box::new(FakeStorage { url, log: opens.clone() }))
            },
            move |task, outcome| reports.lock().outcomes.push((task.to_string(), outcome)),
        )
        .unwrap()
    }

    /// A copier that knows task `t1`, stored in `local:///a`.
    fn copier_of_t1(log: &Arc<Mutex<Log>>) -> CheckpointCopier {
        let copier = copier(log);
        copier.register("t1", &local("/a"));
        copier
    }

    fn local(path: &str) -> StorageBackend {
        parse_storage_url(&format!("local://{path}")).unwrap()
    }

    fn offer(copier: &mut CheckpointCopier, task: &str, ts: Ts) {
        copier.stage(task, ts);
        copier.submit(Duration::from_secs(1));
    }

    fn written(log: &Arc<Mutex<Log>>) -> Vec<Ts> {
        log.lock().writes.iter().map(|(_, ts)| *ts).collect()
    }

    fn outcomes(log: &Arc<Mutex<Log>>) -> Vec<CopyOutcome> {
        log.lock().outcomes.iter().map(|(_, o)| *o).collect()
    }

    #[test]
    fn writes_each_higher_value_once_and_skips_repeats() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut copier = copier_of_t1(&log);
        offer(&mut copier, "t1", 5);
        wait_until("5 written", WAIT, || written(&log) == [5]);
        offer(&mut copier, "t1", 5); // a heartbeat upload of the same value
        offer(&mut copier, "t1", 7);
        wait_until("7 written", WAIT, || written(&log).contains(&7));
        offer(&mut copier, "t1", 7);
        offer(&mut copier, "t1", 9);
        wait_until("9 written", WAIT, || written(&log).contains(&9));
        assert_eq!(written(&log), [5, 7, 9], "repeats are not written");
        assert_eq!(log.lock().opens, ["local:///a"], "the storage is opened once");
        assert_eq!(outcomes(&log), [CopyOutcome::Written(5), CopyOutcome::Written(7), CopyOutcome::Written(9)]);
    }

    #[test]
    fn a_failed_write_is_counted_and_retried_at_the_next_upload() {
        let log = Arc::new(Mutex::new(Log { fail: true, ..Log::default() }));
        let mut copier = copier_of_t1(&log);
        offer(&mut copier, "t1", 5);
        wait_until("a failure", WAIT, || log.lock().outcomes.len() == 1);
        log.lock().fail = false;
        offer(&mut copier, "t1", 5); // the heartbeat brings the same value back
        wait_until("5 written", WAIT, || written(&log) == [5]);
        assert_eq!(outcomes(&log), [CopyOutcome::Failed, CopyOutcome::Written(5)]);
        assert_eq!(log.lock().opens.len(), 1, "a failure keeps the storage open");
    }

    #[test]
    fn ownership_loss_drops_staged_values_and_handles() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut copier = copier_of_t1(&log);
        offer(&mut copier, "t1", 5);
        wait_until("5 written", WAIT, || written(&log) == [5]);
        copier.stage("t1", 6); // uploaded, then the fence says another owner took over
        copier.clear();
        copier.submit(Duration::from_secs(1));
        // The next term writes again (what the file holds is unknown) through a new handle.
        offer(&mut copier, "t1", 5);
        wait_until("5 written again", WAIT, || written(&log) == [5, 5]);
        assert_eq!(log.lock().opens.len(), 2, "reopened after the ownership loss");
    }

    #[test]
    fn nothing_is_written_for_a_forgotten_task() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut copier = copier(&log);
        copier.register("gone", &local("/gone"));
        copier.register("kept", &local("/kept"));
        copier.stage("gone", 3);
        copier.forget("gone");
        copier.submit(Duration::from_secs(1));
        offer(&mut copier, "gone", 4);
        offer(&mut copier, "kept", 4);
        wait_until("the kept task written", WAIT, || written(&log) == [4]);
        assert_eq!(log.lock().writes, [("local:///kept".to_string(), 4)]);
        // Registered again (a new task of the same name): written again.
        copier.register("gone", &local("/gone"));
        offer(&mut copier, "gone", 8);
        wait_until("the new task written", WAIT, || written(&log) == [4, 8]);
    }

    #[test]
    fn an_unsupported_storage_is_tried_once_and_a_new_storage_reopens() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut copier = copier(&log);
        copier.register("t1", &parse_storage_url("noop://").unwrap());
        offer(&mut copier, "t1", 5);
        wait_until("the open attempt", WAIT, || log.lock().opens.len() == 1);
        wait_until("the task marked unsupported", WAIT, || copier.state.lock().tasks["t1"].unsupported);
        offer(&mut copier, "t1", 6);
        wait_until("the offer consumed", WAIT, || copier.state.lock().tasks["t1"].pending.is_none());
        // The task is redefined onto a supported storage.
        copier.register("t1", &local("/a"));
        offer(&mut copier, "t1", 7);
        wait_until("7 written", WAIT, || written(&log) == [7]);
        assert_eq!(log.lock().opens, ["noop://", "local:///a"]);
        assert!(log.lock().outcomes.iter().all(|(_, o)| *o == CopyOutcome::Written(7)), "unsupported is no failure");
    }

    #[test]
    fn outcomes_feed_the_gauge_and_the_failure_counter() {
        let m = Metrics::default();
        CopyOutcome::Written(42).record(&m, "t1");
        CopyOutcome::Failed.record(&m, "t1");
        CopyOutcome::Failed.record(&m, "t1");
        let text = m.render();
        assert!(text.contains("tidb_log_backup_external_storage_checkpoint{task=\"t1\"} 42"), "{text}");
        assert_eq!(m.storage_write_failures.get(["t1"]), 2);
        assert!(is_power_of_ten(1) && is_power_of_ten(10) && is_power_of_ten(1000) && !is_power_of_ten(20));
    }
}
