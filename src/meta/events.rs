//! `AdvancerExt`: the advancer's view of the metadata. `begin` lists every task and then
//! follows changes on a watcher thread, turning them into [`TaskEvent`]s; when the watch
//! breaks or its revision is compacted it re-lists and emits only what changed, so a
//! deletion is never lost and unchanged tasks keep their state. The global checkpoint
//! upload never lowers the stored value, even with two advancers racing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::client::{bad_meta, decode_ranges, decode_task_info, name_under, MetaDataClient};
use super::keys;
use super::pause::PauseV2;
use super::store::{Fence, MetaStore};
use crate::error::{Error, Result, ResultExt};
use crate::etcd::{
    prefix_end, Cmp, CompareResult, EventKind, GetOptions, KeySpan, KeyValue, Leadership, Txn, TxnOp, WatchEvent,
    WatchOptions,
};
use crate::proto::brpb::StreamBackupTaskInfo;
use crate::types::{KeyRange, Ts};
use crate::worker::{StopToken, Worker};

const PAGE: i64 = 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A change of the task set, as the advancer consumes it.
#[derive(Debug)]
pub enum TaskEvent {
    /// A task appeared or was redefined: start it over from these ranges.
    Add {
        info: StreamBackupTaskInfo,
        /// The create revision of the task's info key: which incarnation of the name this
        /// is. Every write for the task is fenced by it, and a stored checkpoint older than
        /// it belongs to an earlier incarnation.
        incarnation: i64,
        ranges: Vec<KeyRange>,
        paused: bool,
    },
    Del {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Something could not be read. Informational: the stream goes on, other tasks are
    /// unaffected, and a named task keeps its last good state.
    Err {
        name: Option<String>,
        error: Error,
    },
}

impl TaskEvent {
    pub fn name(&self) -> Option<&str> {
        match self {
            TaskEvent::Add { info, .. } => Some(info.get_name()),
            TaskEvent::Del { name } | TaskEvent::Pause { name } | TaskEvent::Resume { name } => Some(name),
            TaskEvent::Err { name, .. } => name.as_deref(),
        }
    }
}

impl std::fmt::Display for TaskEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskEvent::Add { info, incarnation, ranges, paused } => {
                write!(
                    f,
                    "Add({}, start_ts={}, incarnation={incarnation}, {} ranges{})",
                    info.get_name(),
                    info.get_start_ts(),
                    ranges.len(),
                    if *paused { ", paused" } else { "" }
                )
            }
            TaskEvent::Del { name } => write!(f, "Del({name})"),
            TaskEvent::Pause { name } => write!(f, "Pause({name})"),
            TaskEvent::Resume { name } => write!(f, "Resume({name})"),
            TaskEvent::Err { name, error } => write!(f, "Err({}, err = {error})", name.as_deref().unwrap_or("")),
        }
    }
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    Written,
    /// The stored checkpoint is already higher; nothing was written.
    KeptHigher {
        stored: Ts,
    },
    /// The fence condition failed: we are no longer the owner.
    Fenced,
    /// The task was deleted or re-created since the write was decided: nothing was
    /// written for an incarnation that no longer exists.
    TaskGone,
}

/// A task as the watcher last saw it. The incarnation is part of the identity: a task
/// deleted and re-created with the same bytes in a watch gap is a new task.
#[derive(Clone, PartialEq)]
struct KnownTask {
    incarnation: i64,
    info_bytes: Vec<u8>,
    ranges: Vec<KeyRange>,
}

/// The task set at one revision.
#[derive(Default)]
struct Snapshot {
    tasks: BTreeMap<String, (StreamBackupTaskInfo, KnownTask)>,
    /// Tasks whose info key exists but whose metadata is bad: not deleted, just unreadable.
    unreadable: BTreeSet<String>,
    paused: BTreeSet<String>,
    errors: Vec<(Option<String>, Error)>,
    revision: i64,
}

/// The running task watcher. Dropping it stops and joins the thread.
pub struct TaskWatcher {
    _worker: Option<Worker>,
}

impl TaskWatcher {
    /// A watcher with no thread, for stores whose task events are fed by hand.
    #[cfg(test)]
    pub(crate) fn idle() -> Self {
        TaskWatcher { _worker: None }
    }
}

#[derive(Clone)]
pub struct AdvancerExt {
    meta: MetaDataClient,
}

impl AdvancerExt {
    pub fn new(meta: MetaDataClient) -> Self {
        AdvancerExt { meta }
    }

    pub fn meta(&self) -> &MetaDataClient {
        &self.meta
    }

    /// Lists the tasks and emits one `Add` per task with its pause state, then follows
    /// changes, all on a thread, until the watcher is dropped or `out` is closed. A listing
    /// that fails becomes a `TaskEvent::Err` and is retried with backoff.
    pub fn begin(&self, out: Sender<TaskEvent>, backoff: Duration) -> Result<TaskWatcher> {
        let ext = self.clone();
        let worker = Worker::spawn("sh-task-watcher", move |stop| {
            let mut follower = Follower { ext, out, stop, backoff, known: BTreeMap::new(), paused: BTreeSet::new() };
            follower.run();
        })?;
        Ok(TaskWatcher { _worker: Some(worker) })
    }

    /// Tasks, ranges and pause flags, all read at one revision. Any error but bad metadata
    /// of one task fails the whole listing: a read error is not a deletion.
    fn list(&self) -> Result<Snapshot> {
        let etcd = self.meta.etcd();
        let info_prefix = keys::prefix_of_task();
        let (infos, revision) = etcd.scan_prefix(info_prefix.as_bytes(), PAGE).context("listing tasks")?;
        let (pauses, _) =
            etcd.scan_prefix_at(keys::prefix_of_pause().as_bytes(), PAGE, revision).context("listing pause flags")?;
        let mut snapshot = Snapshot { revision, ..Default::default() };
        let pause_prefix = keys::prefix_of_pause();
        snapshot.paused =
            pauses.iter().filter_map(|kv| name_under(&pause_prefix, kv.get_key())).map(String::from).collect();
        for kv in infos {
            let Some(name) = name_under(&info_prefix, kv.get_key()) else { continue };
            match self.read_task(name, &kv, revision) {
                Ok(entry) => {
                    snapshot.tasks.insert(name.to_string(), entry);
                }
                Err(e @ Error::BadMeta { .. }) => {
                    snapshot.unreadable.insert(name.to_string());
                    snapshot.errors.push((Some(name.to_string()), e));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(snapshot)
    }

    /// Decodes a task's info and reads its ranges at `revision` (the ranges are written in
    /// the same transaction as the info).
    fn read_task(&self, name: &str, kv: &KeyValue, revision: i64) -> Result<(StreamBackupTaskInfo, KnownTask)> {
        fail::fail_point!("read-task", |_| Err(Error::Etcd {
            endpoint: "failpoint".into(),
            reason: format!("reading task {name} failed (failpoint read-task)")
        }));
        let info = decode_task_info(name, kv.get_key(), kv.get_value())?;
        let (kvs, _) = self.meta.etcd().scan_prefix_at(keys::ranges_of(name).as_bytes(), PAGE, revision)?;
        let ranges = decode_ranges(name, &kvs)?;
        if ranges.is_empty() {
            let prefix = keys::ranges_of(name);
            return Err(bad_meta(name, prefix.as_bytes(), "the task has no key ranges"));
        }
        Ok((info, KnownTask { incarnation: kv.get_create_revision(), info_bytes: kv.get_value().to_vec(), ranges }))
    }

    /// The stored global checkpoint, 0 when there is none.
    pub fn get_global_checkpoint(&self, task: &str) -> Result<Ts> {
        self.global_checkpoint_since(task, 0)
    }

    /// The stored global checkpoint written at or after revision `incarnation`, 0 when
    /// there is none: an older value is an earlier incarnation's (a task deleted and
    /// re-created under the same name) and says nothing about this one's data.
    pub fn global_checkpoint_since(&self, task: &str, incarnation: i64) -> Result<Ts> {
        let key = keys::global_checkpoint_of(task);
        match self.meta.etcd().get(key.clone())? {
            Some(kv) if kv.get_mod_revision() < incarnation => {
                log::warn!(
                    "task {task}: the stored checkpoint was written at revision {}, before this incarnation of the \
                     task (created at {incarnation}): ignored",
                    kv.get_mod_revision()
                );
                Ok(0)
            }
            None => Ok(0),
            Some(kv) => keys::decode_u64(kv.get_value()).ok_or_else(|| Error::BadMeta {
                task: task.to_string(),
                key,
                reason: format!("the global checkpoint isn't 64bits (it is {} bytes)", kv.get_value().len()),
            }),
        }
    }

    /// Runs `ops` in one transaction, only while every condition of `fence` holds. When one
    /// fails: `TaskGone` if the task's info key no longer has the fenced create revision,
    /// `Fenced` otherwise (the owner term).
    fn fenced_txn(&self, task: &str, fence: &Fence, ops: Vec<TxnOp>, what: &str) -> Result<FencedResult> {
        let info_key = keys::task_of(task);
        let mut conditions: Vec<Cmp> = fence.owner.iter().map(Leadership::fence).collect();
        conditions.extend(fence.incarnation.map(|rev| Cmp::create_revision(&info_key, CompareResult::EQUAL, rev)));
        let txn = Txn::new()
            .when(conditions)
            .and_then(ops)
            .or_else([TxnOp::get(KeySpan::key(info_key), &GetOptions { keys_only: true, ..Default::default() })]);
        let result = self.meta.etcd().txn(txn).with_context(|| format!("{what} of task {task}"))?;
        if result.succeeded {
            return Ok(Ok(result));
        }
        let current = result.ranges.first().and_then(|r| r.kvs.first()).map_or(0, |kv| kv.get_create_revision());
        Ok(Err(match fence.incarnation {
            Some(incarnation) if incarnation != current => UploadOutcome::TaskGone,
            _ => UploadOutcome::Fenced,
        }))
    }

    /// Writes `ts` unless the stored value is higher, atomically (big-endian bytes compare
    /// like the numbers), only while `fence` holds. A stored value older than the fenced
    /// incarnation is an earlier incarnation's and is overwritten, never kept.
    pub fn upload_global_checkpoint(&self, task: &str, ts: Ts, fence: &Fence) -> Result<UploadOutcome> {
        let key = keys::global_checkpoint_of(task);
        let mut higher = vec![Cmp::value(&key, CompareResult::GREATER, keys::encode_u64(ts))];
        higher.extend(fence.incarnation.map(|rev| Cmp::mod_revision(&key, CompareResult::GREATER, rev - 1)));
        let monotonic = Txn::new()
            .when(higher)
            .and_then([TxnOp::get(KeySpan::key(key.clone()), &GetOptions::default())])
            .or_else([TxnOp::put(key.clone(), keys::encode_u64(ts), 0)]);
        let outer =
            match self.fenced_txn(task, fence, vec![TxnOp::txn(monotonic)], "uploading the global checkpoint")? {
                Ok(outer) => outer,
                Err(outcome) => return Ok(outcome),
            };
        let result = outer.txns.into_iter().next().ok_or_else(|| Error::Etcd {
            endpoint: self.meta.etcd().config().endpoints.join(","),
            reason: "a nested transaction returned no result".into(),
        })?;
        if !result.succeeded {
            return Ok(UploadOutcome::Written);
        }
        let stored =
            result.ranges.first().and_then(|r| r.kvs.first()).map(|kv| kv.get_value().to_vec()).unwrap_or_default();
        match keys::decode_u64(&stored) {
            Some(stored) => Ok(UploadOutcome::KeptHigher { stored }),
            None => Err(Error::BadMeta {
                task: task.into(),
                key,
                reason: format!(
                    "the stored global checkpoint isn't 64bits ({} bytes) and blocks uploads; delete the key",
                    stored.len()
                ),
            }),
        }
    }

    pub fn clear_global_checkpoint(&self, task: &str) -> Result<()> {
        self.meta.etcd().delete(KeySpan::key(keys::global_checkpoint_of(task)))?;
        Ok(())
    }

    /// Writes the pause record `pause/<task>` only while `fence` holds: `Written`, `Fenced`
    /// or `TaskGone`.
    pub fn pause_task(&self, task: &str, pause: &PauseV2, fence: &Fence) -> Result<UploadOutcome> {
        let put = TxnOp::put(keys::pause_of(task), pause.to_json(), 0);
        Ok(self.fenced_txn(task, fence, vec![put], "pausing")?.err().unwrap_or(UploadOutcome::Written))
    }
}

/// A fenced transaction's result, or why it did not run.
type FencedResult = std::result::Result<crate::etcd::TxnResult, UploadOutcome>;

impl MetaStore for AdvancerExt {
    fn begin(&self, out: Sender<TaskEvent>, backoff: Duration) -> Result<TaskWatcher> {
        AdvancerExt::begin(self, out, backoff)
    }

    fn global_checkpoint(&self, task: &str, incarnation: i64) -> Result<Ts> {
        self.global_checkpoint_since(task, incarnation)
    }

    fn upload_global_checkpoint(&self, task: &str, ts: Ts, fence: &Fence) -> Result<UploadOutcome> {
        AdvancerExt::upload_global_checkpoint(self, task, ts, fence)
    }

    fn pause_task(&self, task: &str, pause: &PauseV2, fence: &Fence) -> Result<UploadOutcome> {
        AdvancerExt::pause_task(self, task, pause, fence)
    }
}

/// The watcher thread's state: what it has told the consumer so far.
struct Follower {
    ext: AdvancerExt,
    out: Sender<TaskEvent>,
    stop: StopToken,
    backoff: Duration,
    known: BTreeMap<String, KnownTask>,
    paused: BTreeSet<String>,
}

impl Follower {
    /// Sends an event, waiting for room while not stopped; false when nobody listens.
    fn emit(&self, event: TaskEvent) -> bool {
        log::info!("task event: {event}");
        self.stop.send(&self.out, event)
    }

    /// Emits the difference between what the consumer knows and `snapshot`. A task whose
    /// metadata is unreadable keeps its last good state (an `Err` event says why).
    fn apply_snapshot(&mut self, snapshot: Snapshot) -> bool {
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|n| !snapshot.tasks.contains_key(*n) && !snapshot.unreadable.contains(*n))
            .cloned()
            .collect();
        for name in removed {
            self.known.remove(&name);
            if !self.emit(TaskEvent::Del { name }) {
                return false;
            }
        }
        for (name, (info, task)) in snapshot.tasks {
            let paused = snapshot.paused.contains(&name);
            let event = if self.known.get(&name) != Some(&task) {
                Some(TaskEvent::Add { info, incarnation: task.incarnation, ranges: task.ranges.clone(), paused })
            } else if paused != self.paused.contains(&name) {
                Some(if paused {
                    TaskEvent::Pause { name: name.clone() }
                } else {
                    TaskEvent::Resume { name: name.clone() }
                })
            } else {
                None
            };
            self.known.insert(name, task);
            if event.is_some_and(|e| !self.emit(e)) {
                return false;
            }
        }
        // An unreadable task's pause flag stays as last reported, so that a change is still
        // reported once the task reads again.
        let mut paused = snapshot.paused;
        for name in &snapshot.unreadable {
            if self.paused.contains(name) {
                paused.insert(name.clone());
            } else {
                paused.remove(name);
            }
        }
        self.paused = paused;
        snapshot.errors.into_iter().all(|(name, error)| self.emit(TaskEvent::Err { name, error }))
    }

    fn run(&mut self) {
        loop {
            let Some(revision) = self.list_until_done() else { return };
            let Some(error) = self.follow(revision) else { return };
            log::warn!("task watch ended ({error}); re-listing every task");
            if self.stop.sleep(self.backoff) {
                return;
            }
        }
    }

    /// Lists until a listing works and emits its differences; the revision it was read at,
    /// or `None` when stopped.
    fn list_until_done(&mut self) -> Option<i64> {
        let mut backoff = self.backoff;
        loop {
            match self.ext.list() {
                Ok(snapshot) => {
                    let revision = snapshot.revision;
                    return self.apply_snapshot(snapshot).then_some(revision);
                }
                Err(e) => {
                    log::warn!("listing tasks failed, retrying in {backoff:?}: {e}");
                    if !self.emit(TaskEvent::Err { name: None, error: e }) || self.stop.sleep(backoff) {
                        return None;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Follows the watch from `revision + 1`. `None`: stopped; `Some(e)`: re-list.
    fn follow(&mut self, revision: i64) -> Option<Error> {
        let etcd = self.ext.meta.etcd().clone();
        // One watch over info/ .. pause/ keeps task and pause events in revision order.
        let span = KeySpan::Range(keys::prefix_of_task().into_bytes(), prefix_end(keys::prefix_of_pause().as_bytes()));
        let watcher = match etcd.watch(span, WatchOptions { start_revision: revision + 1, prev_kv: false }) {
            Ok(watcher) => watcher,
            Err(e) => return Some(e),
        };
        loop {
            crossbeam_channel::select! {
                recv(self.stop.receiver()) -> _ => return None,
                recv(watcher.batches()) -> batch => match batch {
                    Ok(Ok(batch)) => {
                        for event in batch.events {
                            match self.on_watch_event(event) {
                                Ok(true) => {}
                                Ok(false) => return None,
                                Err(e) => return Some(e),
                            }
                        }
                    }
                    Ok(Err(e)) => return Some(e),
                    Err(_) => return Some(Error::Stopped("etcd watch".into())),
                },
            }
        }
    }

    /// Applies one watch event. `Ok(false)`: the consumer is gone; `Err`: re-list.
    fn on_watch_event(&mut self, event: WatchEvent) -> Result<bool> {
        let key = event.kv.get_key();
        if let Some(name) = name_under(&keys::prefix_of_task(), key) {
            let name = name.to_string();
            return Ok(match event.kind {
                EventKind::Delete => self.known.remove(&name).is_none() || self.emit(TaskEvent::Del { name }),
                EventKind::Put => match self.ext.read_task(&name, &event.kv, event.kv.get_mod_revision()) {
                    Ok((info, task)) => {
                        let paused = self.paused.contains(&name);
                        self.known.insert(name, task.clone());
                        let incarnation = task.incarnation;
                        self.emit(TaskEvent::Add { info, incarnation, ranges: task.ranges, paused })
                    }
                    Err(e @ Error::BadMeta { .. }) => self.emit(TaskEvent::Err { name: Some(name), error: e }),
                    Err(e) => return Err(e),
                },
            });
        }
        if let Some(name) = name_under(&keys::prefix_of_pause(), key) {
            let name = name.to_string();
            // Any value under the pause key is a pause (TiKV decides by existence).
            let changed = match event.kind {
                EventKind::Put => self.paused.insert(name.clone()),
                EventKind::Delete => self.paused.remove(&name),
            };
            if !changed || !self.known.contains_key(&name) {
                return Ok(true);
            }
            return Ok(self.emit(match event.kind {
                EventKind::Put => TaskEvent::Pause { name },
                EventKind::Delete => TaskEvent::Resume { name },
            }));
        }
        // last-error/ and owner/ keys share the watched range; they are not task events.
        Ok(true)
    }
}
