//! The global checkpoint's copy in a task's external storage (upstream tidb#68956): BR's
//! restore and `br log metadata` take the restorable upper bound from the largest
//! `v1/global_checkpoint/*.ts` file there, which otherwise only TiKV writes at its flushes.
//!
//! - [`open`] decodes the task's `StorageBackend` (the protobuf BR writes) into a writer:
//!   `local` (a path) or `s3` (SigV4 over a small synchronous HTTP client); other kinds are
//!   [`Error::StorageUnsupported`].
//! - [`CheckpointCopier`] is the advancer's side: a worker thread fed the latest uploaded
//!   checkpoint per task, so a slow or dead storage never holds up a tick.

mod copier;
mod local;
mod s3;
pub mod sigv4;

use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::brpb::{StorageBackend, StorageBackend_oneof_backend as Backend};
use crate::types::Ts;

pub use copier::{CheckpointCopier, CopyOutcome};
pub use local::LocalStorage;
pub use s3::{S3Storage, S3Target};

/// Where the advancer's copy lives under the task's storage root (upstream's name; TiKV's
/// own files sit beside it in the same directory).
pub const GLOBAL_CHECKPOINT_FILE: &str = "v1/global_checkpoint/central_global.ts";

/// A task's backup destination, as far as the checkpoint copy needs it.
pub trait ExternalStorage: Send {
    /// Replaces the object `name` (relative to the storage root) with `data`.
    fn write(&self, name: &str, data: &[u8], timeout: Duration) -> Result<()>;
    /// The object's bytes, `None` if it does not exist.
    fn read(&self, name: &str, timeout: Duration) -> Result<Option<Vec<u8>>>;
    /// The storage for log lines, without credentials.
    fn url(&self) -> &str;
}

/// The file's bytes: 8 bytes little-endian, unlike every checkpoint in etcd (big-endian).
pub fn encode_checkpoint(ts: Ts) -> [u8; 8] {
    ts.to_le_bytes()
}

pub fn decode_checkpoint(bytes: &[u8]) -> Option<Ts> {
    Some(Ts::from_le_bytes(bytes.try_into().ok()?))
}

/// Opens the storage a task's backend describes. S3 credentials come from the backend, else
/// from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`.
pub fn open(backend: &StorageBackend) -> Result<Box<dyn ExternalStorage>> {
    let unsupported = |backend| Err(Error::StorageUnsupported { backend });
    match &backend.backend {
        Some(Backend::local(local)) => Ok(Box::new(LocalStorage::new(local.get_path())?)),
        Some(Backend::s3(s3)) => Ok(Box::new(S3Storage::new(S3Target::from_backend(s3, |k| std::env::var(k).ok())?))),
        Some(Backend::noop(_)) => unsupported("noop"),
        Some(Backend::gcs(_)) => unsupported("gcs"),
        Some(Backend::azure_blob_storage(_)) => unsupported("azure"),
        Some(Backend::hdfs(_)) => unsupported("hdfs"),
        Some(Backend::cloud_dynamic(_)) => unsupported("cloud-dynamic"),
        None => unsupported("an empty"),
    }
}

pub fn write_global_checkpoint(storage: &dyn ExternalStorage, ts: Ts, timeout: Duration) -> Result<()> {
    storage.write(GLOBAL_CHECKPOINT_FILE, &encode_checkpoint(ts), timeout)
}

/// The copy in `storage`, `None` when none was written yet.
pub fn read_global_checkpoint(storage: &dyn ExternalStorage, timeout: Duration) -> Result<Option<Ts>> {
    let Some(bytes) = storage.read(GLOBAL_CHECKPOINT_FILE, timeout)? else { return Ok(None) };
    decode_checkpoint(&bytes).map(Some).ok_or_else(|| Error::Storage {
        url: storage.url().to_string(),
        reason: format!("{GLOBAL_CHECKPOINT_FILE} holds {} bytes, not an 8-byte checkpoint", bytes.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::parse_storage_url;

    #[test]
    fn the_file_is_8_bytes_little_endian() {
        // A real TSO: physical 2024-05-01T12:00:00Z, logical 1.
        let ts: Ts = (1_714_564_800_000 << 18) | 1;
        assert_eq!(ts, 449_462_874_931_200_001);
        assert_eq!(encode_checkpoint(ts), [0x01, 0x00, 0x00, 0x78, 0x1a, 0xd0, 0x3c, 0x06]);
        assert_eq!(encode_checkpoint(0x0102_0304_0506_0708), [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(decode_checkpoint(&encode_checkpoint(ts)), Some(ts));
        assert_eq!(decode_checkpoint(&[1, 2, 3]), None);
        assert_eq!(GLOBAL_CHECKPOINT_FILE, "v1/global_checkpoint/central_global.ts");
    }

    #[test]
    fn only_local_and_s3_open() {
        for (url, kind) in
            [("noop://", "noop"), ("gcs://b/p", "gcs"), ("azure://b/p", "azure"), ("hdfs://nn/p", "hdfs")]
        {
            match open(&parse_storage_url(url).unwrap()) {
                Err(Error::StorageUnsupported { backend }) => assert_eq!(backend, kind),
                other => panic!("{url}: {:?}", other.map(|s| s.url().to_string())),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let local = open(&parse_storage_url(&format!("local://{}", dir.path().display())).unwrap()).unwrap();
        assert_eq!(read_global_checkpoint(local.as_ref(), Duration::from_secs(1)).unwrap(), None);
        write_global_checkpoint(local.as_ref(), 42, Duration::from_secs(1)).unwrap();
        let file = dir.path().join(GLOBAL_CHECKPOINT_FILE);
        assert_eq!(std::fs::read(&file).unwrap(), 42u64.to_le_bytes());
        assert_eq!(read_global_checkpoint(local.as_ref(), Duration::from_secs(1)).unwrap(), Some(42));
        std::fs::write(&file, b"garbage").unwrap();
        let err = read_global_checkpoint(local.as_ref(), Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.contains("7 bytes") && err.contains(&dir.path().display().to_string()), "{err}");
    }
}
