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

/// The conditions a checkpoint upload is written under. Each field is one more condition
/// that must hold at write time, checked in the same transaction as the write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fence {
    /// Write only while this owner term holds: a deposed owner's upload is
    /// [`UploadOutcome::Fenced`] even before it notices.
    pub owner: Option<Leadership>,
}

impl Fence {
    pub fn owner(leadership: Leadership) -> Self {
        Fence { owner: Some(leadership) }
    }
}

pub trait MetaStore: Send + Sync {
    /// Lists every task, then follows changes, sending [`TaskEvent`]s to `out` on a thread of
    /// its own until the watcher is dropped. A listing that fails is reported as
    /// `TaskEvent::Err` and retried after `backoff` (doubling).
    fn begin(&self, out: Sender<TaskEvent>, backoff: Duration) -> Result<TaskWatcher>;

    /// The stored global checkpoint of `task`, 0 when there is none.
    fn global_checkpoint(&self, task: &str) -> Result<Ts>;

    /// Writes `ts` as the global checkpoint of `task` unless the stored value is higher,
    /// atomically, and only while `fence` holds.
    fn upload_global_checkpoint(&self, task: &str, ts: Ts, fence: &Fence) -> Result<UploadOutcome>;

    /// Pauses `task` with the given record (`pause/<task>`).
    fn pause_task(&self, task: &str, pause: &PauseV2) -> Result<()>;
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory metadata store: stored checkpoints, the current owner term and the pause
    //! records written, with scripted failures.

    use std::collections::BTreeMap;

    use parking_lot::Mutex;

    use super::*;
    use crate::error::Error;

    #[derive(Default)]
    pub struct MemStore {
        pub checkpoints: Mutex<BTreeMap<String, Ts>>,
        /// The owner term in force; an upload fenced by another term is `Fenced`.
        pub owner: Mutex<Option<Leadership>>,
        pub pauses: Mutex<Vec<(String, PauseV2)>>,
        /// Every upload asked for, written or not.
        pub uploads: Mutex<Vec<(String, Ts)>>,
        /// When set, uploads fail with this reason.
        pub failing: Mutex<Option<String>>,
    }

    impl MemStore {
        pub fn stored(&self, task: &str) -> Option<Ts> {
            self.checkpoints.lock().get(task).copied()
        }
    }

    impl MetaStore for MemStore {
        fn begin(&self, _: Sender<TaskEvent>, _: Duration) -> Result<TaskWatcher> {
            Ok(TaskWatcher::idle())
        }

        fn global_checkpoint(&self, task: &str) -> Result<Ts> {
            Ok(self.stored(task).unwrap_or(0))
        }

        fn upload_global_checkpoint(&self, task: &str, ts: Ts, fence: &Fence) -> Result<UploadOutcome> {
            self.uploads.lock().push((task.to_string(), ts));
            if let Some(reason) = self.failing.lock().clone() {
                return Err(Error::Etcd { endpoint: "mem".into(), reason });
            }
            if fence.owner.is_some() && fence.owner != *self.owner.lock() {
                return Ok(UploadOutcome::Fenced);
            }
            let mut checkpoints = self.checkpoints.lock();
            let stored = checkpoints.entry(task.to_string()).or_insert(0);
            if *stored > ts {
                return Ok(UploadOutcome::KeptHigher { stored: *stored });
            }
            *stored = ts;
            Ok(UploadOutcome::Written)
        }

        fn pause_task(&self, task: &str, pause: &PauseV2) -> Result<()> {
            self.pauses.lock().push((task.to_string(), pause.clone()));
            Ok(())
        }
    }
}
