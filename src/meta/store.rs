//! `MetaStore`: what the advancer reads from and writes to the metadata store, behind a trait
//! (the third part of upstream's `Env`, its `StreamMeta`), so that what a tick does is
//! testable against [`testing::MemStore`] in milliseconds. [`super::AdvancerExt`] is the
//! etcd implementation.

use std::time::Duration;

use crossbeam_channel::Sender;

use super::events::{TaskEvent, TaskWatcher, UploadOutcome};
use super::pause::PauseV2;
use crate::error::Result;
use crate::etcd::Leadership;
use crate::types::Ts;

/// The conditions a write for a task (checkpoint upload, pause) is made under. Each field is
/// one more condition that must hold at write time, checked in the same transaction as the
/// write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fence {
    /// Write only while this owner term holds: a deposed owner's upload is
    /// [`UploadOutcome::Fenced`] even before it notices.
    pub owner: Option<Leadership>,
    /// Write only while the task's info key has this create revision: a write decided for
    /// a task that was deleted (or deleted and re-created) meanwhile is
    /// [`UploadOutcome::TaskGone`] and leaves nothing behind.
    pub incarnation: Option<i64>,
}

impl Fence {
    /// Both fences of an owner's write for one incarnation of a task.
    pub fn owner_of(leadership: Leadership, incarnation: i64) -> Self {
        Fence { owner: Some(leadership), incarnation: Some(incarnation) }
    }
}

pub trait MetaStore: Send + Sync {
    /// Lists every task, then follows changes, sending [`TaskEvent`]s to `out` on a thread of
    /// its own until the watcher is dropped. A listing that fails is reported as
    /// `TaskEvent::Err` and retried after `backoff` (doubling).
    fn begin(&self, out: Sender<TaskEvent>, backoff: Duration) -> Result<TaskWatcher>;

    /// The stored global checkpoint of `task` written by its incarnation `incarnation` (the
    /// info key's create revision) or later; 0 when there is none or it is older.
    fn global_checkpoint(&self, task: &str, incarnation: i64) -> Result<Ts>;

    /// Writes `ts` as the global checkpoint of `task` unless the stored value is higher,
    /// atomically, and only while `fence` holds.
    fn upload_global_checkpoint(&self, task: &str, ts: Ts, fence: &Fence) -> Result<UploadOutcome>;

    /// Pauses `task` with the given record (`pause/<task>`), only while `fence` holds:
    /// `Written`, `Fenced` or `TaskGone`.
    fn pause_task(&self, task: &str, pause: &PauseV2, fence: &Fence) -> Result<UploadOutcome>;
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory metadata store: stored checkpoints, the current owner term, the live
    //! incarnation of each task and the pause records written, with scripted failures.

    use std::collections::BTreeMap;

    use parking_lot::Mutex;

    use super::*;
    use crate::error::Error;

    #[derive(Default)]
    pub struct MemStore {
        pub checkpoints: Mutex<BTreeMap<String, Ts>>,
        /// The owner term in force; an upload fenced by another term is `Fenced`.
        pub owner: Mutex<Option<Leadership>>,
        /// The create revision of each task's info key; a task not here is gone.
        pub incarnations: Mutex<BTreeMap<String, i64>>,
        pub pauses: Mutex<Vec<(String, PauseV2)>>,
        /// Every upload asked for, written or not.
        pub uploads: Mutex<Vec<(String, Ts)>>,
        /// When set, uploads and pauses fail with this reason.
        pub failing: Mutex<Option<String>>,
        /// How many of the next pause writes fail.
        pub failing_pauses: Mutex<usize>,
        /// Where `begin` was told to send task events: tests send them by hand.
        pub listener: Mutex<Option<Sender<TaskEvent>>>,
    }

    impl MemStore {
        pub fn stored(&self, task: &str) -> Option<Ts> {
            self.checkpoints.lock().get(task).copied()
        }

        /// The outcome of a write under `fence` that did not run, if any.
        fn refused(&self, task: &str, fence: &Fence) -> Result<Option<UploadOutcome>> {
            if let Some(reason) = self.failing.lock().clone() {
                return Err(Error::Etcd { endpoint: "mem".into(), reason });
            }
            if fence.owner.is_some() && fence.owner != *self.owner.lock() {
                return Ok(Some(UploadOutcome::Fenced));
            }
            let live = self.incarnations.lock().get(task).copied();
            Ok(fence.incarnation.filter(|_| fence.incarnation != live).map(|_| UploadOutcome::TaskGone))
        }
    }

    impl MetaStore for MemStore {
        fn begin(&self, out: Sender<TaskEvent>, _: Duration) -> Result<TaskWatcher> {
            *self.listener.lock() = Some(out);
            Ok(TaskWatcher::idle())
        }

        fn global_checkpoint(&self, task: &str, _: i64) -> Result<Ts> {
            Ok(self.stored(task).unwrap_or(0))
        }

        fn upload_global_checkpoint(&self, task: &str, ts: Ts, fence: &Fence) -> Result<UploadOutcome> {
            self.uploads.lock().push((task.to_string(), ts));
            if let Some(outcome) = self.refused(task, fence)? {
                return Ok(outcome);
            }
            let mut checkpoints = self.checkpoints.lock();
            let stored = checkpoints.entry(task.to_string()).or_insert(0);
            if *stored > ts {
                return Ok(UploadOutcome::KeptHigher { stored: *stored });
            }
            *stored = ts;
            Ok(UploadOutcome::Written)
        }

        fn pause_task(&self, task: &str, pause: &PauseV2, fence: &Fence) -> Result<UploadOutcome> {
            let mut failing = self.failing_pauses.lock();
            if *failing > 0 {
                *failing -= 1;
                return Err(Error::Etcd { endpoint: "mem".into(), reason: "pause write failed".into() });
            }
            if let Some(outcome) = self.refused(task, fence)? {
                return Ok(outcome);
            }
            self.pauses.lock().push((task.to_string(), pause.clone()));
            Ok(UploadOutcome::Written)
        }
    }
}
