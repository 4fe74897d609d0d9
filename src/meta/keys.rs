//! The etcd key layout under `/tidb/br-stream`, byte for byte what TiDB, BR and TiKV use.

pub const STREAM_PREFIX: &str = "/tidb/br-stream";
/// The owner election directory of the advancer.
pub const OWNER_PREFIX: &str = "/tidb/br-stream/owner";
pub const GLOBAL_CHECKPOINT_WORD: &str = "central_global";

/// `/tidb/br-stream/info/`: the directory of task infos.
pub fn prefix_of_task() -> String {
    format!("{STREAM_PREFIX}/info/")
}

/// `/tidb/br-stream/pause/`: the directory of pause flags.
pub fn prefix_of_pause() -> String {
    format!("{STREAM_PREFIX}/pause/")
}

/// `/tidb/br-stream/info/<name>`: the task's `StreamBackupTaskInfo`.
pub fn task_of(name: &str) -> String {
    format!("{STREAM_PREFIX}/info/{name}")
}

/// `/tidb/br-stream/ranges/<name>/`: the trailing slash keeps task `t` from matching `t1`.
pub fn ranges_of(name: &str) -> String {
    format!("{STREAM_PREFIX}/ranges/{name}/")
}

/// `ranges_of(name)` followed by the raw start key bytes, verbatim.
pub fn range_key_of(name: &str, start_key: &[u8]) -> Vec<u8> {
    let mut key = ranges_of(name).into_bytes();
    key.extend_from_slice(start_key);
    key
}

/// `/tidb/br-stream/pause/<name>`.
pub fn pause_of(name: &str) -> String {
    format!("{STREAM_PREFIX}/pause/{name}")
}

/// `/tidb/br-stream/checkpoint/<task>/`.
pub fn checkpoints_of(task: &str) -> String {
    format!("{STREAM_PREFIX}/checkpoint/{}/", task.trim_end_matches('/'))
}

/// `/tidb/br-stream/checkpoint/<task>/central_global`: the global checkpoint the advancer owns.
pub fn global_checkpoint_of(task: &str) -> String {
    format!("{}{GLOBAL_CHECKPOINT_WORD}", checkpoints_of(task))
}

/// `/tidb/br-stream/storage-checkpoint/<task>`: no trailing slash, as upstream; scans of it
/// also match tasks whose names extend this one, so readers filter to the exact task.
pub fn storage_checkpoint_of(task: &str) -> String {
    format!("{STREAM_PREFIX}/storage-checkpoint/{task}")
}

/// `/tidb/br-stream/last-error/<task>/`.
pub fn last_error_prefix_of(task: &str) -> String {
    format!("{STREAM_PREFIX}/last-error/{}/", task.trim_end_matches('/'))
}

/// 8-byte big-endian, the encoding of every timestamp in the metadata.
pub fn encode_u64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// The u64 in an 8-byte big-endian value, or `None` for any other length.
pub fn decode_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_upstreams() {
        assert_eq!(prefix_of_task(), "/tidb/br-stream/info/");
        assert_eq!(task_of("t1"), "/tidb/br-stream/info/t1");
        assert_eq!(ranges_of("t1"), "/tidb/br-stream/ranges/t1/");
        assert_eq!(range_key_of("t1", b"a/\x00b"), b"/tidb/br-stream/ranges/t1/a/\x00b".to_vec());
        assert_eq!(range_key_of("t1", b""), b"/tidb/br-stream/ranges/t1/".to_vec());
        assert_eq!(pause_of("t1"), "/tidb/br-stream/pause/t1");
        assert_eq!(checkpoints_of("t1"), "/tidb/br-stream/checkpoint/t1/");
        assert_eq!(global_checkpoint_of("t1"), "/tidb/br-stream/checkpoint/t1/central_global");
        assert_eq!(storage_checkpoint_of("t1"), "/tidb/br-stream/storage-checkpoint/t1");
        assert_eq!(last_error_prefix_of("t1"), "/tidb/br-stream/last-error/t1/");
        assert_eq!(encode_u64(0x0102), vec![0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(decode_u64(&encode_u64(u64::MAX - 7)), Some(u64::MAX - 7));
        assert_eq!(decode_u64(b"short"), None);
    }
}
