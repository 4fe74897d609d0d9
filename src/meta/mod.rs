//! Log-backup metadata in etcd: the key layout, tasks, pause records, checkpoints and the
//! task event stream the advancer follows. Byte-compatible with BR, TiDB and TiKV.

pub(crate) mod client;
mod events;
pub mod keys;
pub(crate) mod pause;
mod store;
mod task;

pub use client::{MetaDataClient, Task};
pub use events::{AdvancerExt, TaskEvent, TaskWatcher, UploadOutcome};
pub use pause::{PausePayload, PauseState, PauseV2, Severity};
#[cfg(test)]
pub(crate) use store::testing;
pub use store::{Fence, MetaStore};
pub use task::{
    check_task_name, describe_storage, parse_checkpoint, parse_storage_url, Checkpoint, CheckpointType, TaskInfo,
};
