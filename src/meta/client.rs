//! `MetaDataClient`: reads and writes log-backup tasks in etcd exactly as BR does.

use std::collections::BTreeMap;

use protobuf::Message;

use super::keys;
use super::pause::{PauseState, PauseV2};
use super::task::{parse_checkpoint, Checkpoint, CheckpointType, TaskInfo};
use crate::error::{Error, Result, ResultExt};
use crate::etcd::{EtcdClient, GetOptions, KeySpan, KeyValue, Txn, TxnOp};
use crate::proto::brpb::{StreamBackupError, StreamBackupTaskInfo};
use crate::types::{KeyRange, StoreId, Ts};

const PAGE: i64 = 1024;

/// Task metadata in etcd under `/tidb/br-stream`.
#[derive(Clone)]
pub struct MetaDataClient {
    etcd: EtcdClient,
}

/// A task handle: its info plus the client to read its other keys.
#[derive(Clone)]
pub struct Task {
    client: MetaDataClient,
    pub info: StreamBackupTaskInfo,
}

pub(super) fn bad_meta(task: &str, key: &[u8], reason: impl Into<String>) -> Error {
    Error::BadMeta { task: task.to_string(), key: String::from_utf8_lossy(key).into_owned(), reason: reason.into() }
}

/// Decodes a task info value, insisting that it names the task its key names.
pub fn decode_task_info(name: &str, key: &[u8], value: &[u8]) -> Result<StreamBackupTaskInfo> {
    let info = StreamBackupTaskInfo::parse_from_bytes(value)
        .map_err(|e| bad_meta(name, key, format!("invalid binary presentation of task info: {e}")))?;
    if info.get_name() != name {
        return Err(bad_meta(name, key, format!("the info names task {:?}", info.get_name())));
    }
    Ok(info)
}

/// Decodes the range keys of `name` (read under `ranges_of(name)`).
pub fn decode_ranges(name: &str, kvs: &[KeyValue]) -> Result<Vec<KeyRange>> {
    let prefix = keys::ranges_of(name);
    let mut ranges = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let start = kv
            .get_key()
            .strip_prefix(prefix.as_bytes())
            .ok_or_else(|| bad_meta(name, kv.get_key(), format!("range key outside {prefix}")))?;
        let range = KeyRange::new(start, kv.get_value());
        if !range.end.is_empty() && range.end <= range.start {
            return Err(bad_meta(name, kv.get_key(), format!("range {range} ends before it starts")));
        }
        ranges.push(range);
    }
    Ok(ranges)
}

/// The task name of a key under `prefix`, when the key is directly under it.
pub fn name_under<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k str> {
    std::str::from_utf8(key.strip_prefix(prefix.as_bytes())?).ok().filter(|n| !n.is_empty() && !n.contains('/'))
}

impl MetaDataClient {
    pub fn new(etcd: EtcdClient) -> Self {
        MetaDataClient { etcd }
    }

    pub fn etcd(&self) -> &EtcdClient {
        &self.etcd
    }

    /// Writes info, ranges and the optional pause flag in one transaction.
    pub fn put_task(&self, task: &TaskInfo) -> Result<()> {
        let name = task.name();
        let info = task
            .info
            .write_to_bytes()
            .map_err(|e| Error::InvalidTask { task: name.into(), reason: format!("failed to marshal: {e}") })?;
        let mut ops = vec![TxnOp::put(keys::task_of(name), info, 0)];
        ops.extend(task.ranges.iter().map(|r| TxnOp::put(keys::range_key_of(name, &r.start), r.end.clone(), 0)));
        if task.pausing {
            ops.push(TxnOp::put(keys::pause_of(name), Vec::new(), 0));
        }
        self.etcd
            .txn(Txn::new().and_then(ops))
            .with_context(|| format!("failed to commit the change for task {name}"))?;
        Ok(())
    }

    /// Removes every key of the task: info, ranges, pause, checkpoints, storage
    /// checkpoints (exact task only) and last errors.
    pub fn delete_task(&self, name: &str) -> Result<()> {
        let storage_prefix = format!("{}/", keys::storage_checkpoint_of(name));
        let ops = [
            TxnOp::delete(KeySpan::key(keys::task_of(name))),
            TxnOp::delete(KeySpan::prefix(keys::ranges_of(name))),
            TxnOp::delete(KeySpan::prefix(keys::checkpoints_of(name))),
            TxnOp::delete(KeySpan::key(keys::pause_of(name))),
            TxnOp::delete(KeySpan::prefix(keys::last_error_prefix_of(name))),
            TxnOp::delete(KeySpan::prefix(storage_prefix)),
        ];
        self.etcd.txn(Txn::new().and_then(ops)).with_context(|| format!("failed to delete task {name}"))?;
        Ok(())
    }

    /// Pauses with a PauseV2 record (reason, severity, host, pid, time).
    pub fn pause_task(&self, name: &str, pause: &PauseV2) -> Result<()> {
        self.etcd
            .put(keys::pause_of(name), pause.to_json(), 0)
            .with_context(|| format!("failed to pause task {name}"))?;
        Ok(())
    }

    pub fn resume_task(&self, name: &str) -> Result<()> {
        self.etcd
            .delete(KeySpan::key(keys::pause_of(name)))
            .with_context(|| format!("failed to resume task {name}"))?;
        Ok(())
    }

    pub fn clean_last_error_of_task(&self, name: &str) -> Result<()> {
        self.etcd
            .delete(KeySpan::prefix(keys::last_error_prefix_of(name)))
            .with_context(|| format!("failed to clean last error of task {name}"))?;
        Ok(())
    }

    pub fn get_task(&self, name: &str) -> Result<Task> {
        let key = keys::task_of(name);
        let kv = self.etcd.get(key.clone()).with_context(|| format!("failed to fetch task {name}"))?;
        let kv = kv.ok_or_else(|| Error::TaskNotFound(name.to_string()))?;
        Ok(self.task_by_info(decode_task_info(name, key.as_bytes(), kv.get_value())?))
    }

    /// The task and whether it is paused, read in one transaction.
    pub fn get_task_with_pause_status(&self, name: &str) -> Result<(Task, bool)> {
        let key = keys::task_of(name);
        let txn = Txn::new().and_then([
            TxnOp::get(KeySpan::key(key.clone()), &GetOptions::default()),
            TxnOp::get(KeySpan::key(keys::pause_of(name)), &GetOptions { count_only: true, ..Default::default() }),
        ]);
        let result = self.etcd.txn(txn).with_context(|| format!("failed to fetch task {name}"))?;
        let kv = result.ranges[0].kvs.first().ok_or_else(|| Error::TaskNotFound(name.to_string()))?;
        let task = self.task_by_info(decode_task_info(name, key.as_bytes(), kv.get_value())?);
        Ok((task, result.ranges[1].count > 0))
    }

    pub fn task_by_info(&self, info: StreamBackupTaskInfo) -> Task {
        Task { client: self.clone(), info }
    }

    /// Every task, in key order, and the revision of the read. A task whose info does not
    /// decode is returned in the error list instead, so one bad task hides no other.
    pub fn get_all_tasks_with_revision(&self) -> Result<(Vec<Task>, Vec<Error>, i64)> {
        let prefix = keys::prefix_of_task();
        let (kvs, revision) = self.etcd.scan_prefix(prefix.as_bytes(), PAGE).context("failed to list tasks")?;
        let mut tasks = Vec::new();
        let mut errors = Vec::new();
        for kv in kvs {
            let Some(name) = name_under(&prefix, kv.get_key()) else {
                errors.push(bad_meta("?", kv.get_key(), "not a task key"));
                continue;
            };
            match decode_task_info(name, kv.get_key(), kv.get_value()) {
                Ok(info) => tasks.push(self.task_by_info(info)),
                Err(e) => errors.push(e),
            }
        }
        Ok((tasks, errors, revision))
    }

    pub fn get_all_tasks(&self) -> Result<Vec<Task>> {
        let (tasks, errors, _) = self.get_all_tasks_with_revision()?;
        for e in errors {
            log::warn!("skipping a task: {e}");
        }
        Ok(tasks)
    }

    pub fn get_task_count(&self) -> Result<usize> {
        let options = GetOptions { count_only: true, ..Default::default() };
        let result =
            self.etcd.range(KeySpan::prefix(keys::prefix_of_task()), &options).context("failed to count tasks")?;
        Ok(result.count as usize)
    }
}

impl Task {
    pub fn name(&self) -> &str {
        self.info.get_name()
    }

    pub fn ranges(&self) -> Result<Vec<KeyRange>> {
        let (kvs, _) = self
            .client
            .etcd
            .scan_prefix(keys::ranges_of(self.name()).as_bytes(), PAGE)
            .with_context(|| format!("failed to fetch ranges of task {}", self.name()))?;
        decode_ranges(self.name(), &kvs)
    }

    pub fn is_paused(&self) -> Result<bool> {
        let options = GetOptions { count_only: true, ..Default::default() };
        let result = self
            .client
            .etcd
            .range(KeySpan::key(keys::pause_of(self.name())), &options)
            .with_context(|| format!("failed to fetch the status of task {}", self.name()))?;
        Ok(result.count > 0)
    }

    /// The pause record, if paused.
    pub fn pause_state(&self) -> Result<Option<PauseState>> {
        let kv = self.client.etcd.get(keys::pause_of(self.name()))?;
        Ok(kv.map(|kv| PauseState::from_value(kv.get_value())))
    }

    pub fn pause(&self, pause: &PauseV2) -> Result<()> {
        self.client.pause_task(self.name(), pause)
    }

    pub fn resume(&self) -> Result<()> {
        self.client.resume_task(self.name())
    }

    /// Every checkpoint record of the task; stops at the first record that does not parse.
    pub fn next_backup_ts_list(&self) -> Result<Vec<Checkpoint>> {
        let prefix = keys::checkpoints_of(self.name());
        let (kvs, _) = self
            .client
            .etcd
            .scan_prefix(prefix.as_bytes(), PAGE)
            .with_context(|| format!("failed to get checkpoints of {}", self.name()))?;
        kvs.iter().map(|kv| parse_checkpoint(self.name(), kv.get_key(), kv.get_value())).collect()
    }

    /// max(start ts, every store's persisted checkpoint of this exact task).
    pub fn get_storage_checkpoint(&self) -> Result<Ts> {
        // Upstream scans without the trailing slash and so also reads task `t1` for `t`.
        let prefix = format!("{}/", keys::storage_checkpoint_of(self.name()));
        let (kvs, _) = self.client.etcd.scan_prefix(prefix.as_bytes(), PAGE)?;
        let mut ts = self.info.get_start_ts();
        for kv in kvs {
            let value = keys::decode_u64(kv.get_value()).ok_or_else(|| {
                bad_meta(
                    self.name(),
                    kv.get_key(),
                    format!("the value isn't 64bits (it is {} bytes)", kv.get_value().len()),
                )
            })?;
            ts = ts.max(value);
        }
        Ok(ts)
    }

    /// The global checkpoint as BR reports it: `central_global` if present, else the min
    /// over store checkpoints, never below the storage checkpoint or the start ts.
    pub fn get_global_checkpoint_ts(&self) -> Result<Ts> {
        let checkpoints = self.next_backup_ts_list()?;
        if let Some(global) = checkpoints.iter().find(|c| c.checkpoint_type() == CheckpointType::Global) {
            return Ok(global.ts);
        }
        let store_min = checkpoints.iter().filter(|c| c.checkpoint_type() == CheckpointType::Store).map(|c| c.ts).min();
        Ok(store_min.unwrap_or(self.info.get_start_ts()).max(self.get_storage_checkpoint()?))
    }

    /// Unconditional write, as upstream's `UploadGlobalCheckpoint` (the advancer uses the
    /// monotonic [`super::AdvancerExt::upload_global_checkpoint`] instead).
    pub fn upload_global_checkpoint(&self, ts: Ts) -> Result<()> {
        self.client.etcd.put(keys::global_checkpoint_of(self.name()), keys::encode_u64(ts), 0)?;
        Ok(())
    }

    /// The last fatal error each store reported for this task.
    pub fn last_error(&self) -> Result<BTreeMap<StoreId, StreamBackupError>> {
        let prefix = keys::last_error_prefix_of(self.name());
        let (kvs, _) = self
            .client
            .etcd
            .scan_prefix(prefix.as_bytes(), PAGE)
            .with_context(|| format!("failed to get the last error for task {}", self.name()))?;
        let mut errors = BTreeMap::new();
        for kv in kvs {
            let suffix = String::from_utf8_lossy(&kv.get_key()[prefix.len()..]).into_owned();
            let store: StoreId = suffix.parse().map_err(|_| {
                bad_meta(self.name(), kv.get_key(), format!("failed to parse the store ID string {suffix:?}"))
            })?;
            let error = StreamBackupError::parse_from_bytes(kv.get_value()).map_err(|e| {
                bad_meta(self.name(), kv.get_key(), format!("failed to parse wire encoding for store {store}: {e}"))
            })?;
            errors.insert(store, error);
        }
        Ok(errors)
    }
}
