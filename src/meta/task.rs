//! Task definitions (`TaskInfo`) and the checkpoint records found under a task.

use crate::error::{Error, Result};
use crate::proto::brpb::{AzureBlobStorage, Local, Noop, StorageBackend, StreamBackupTaskInfo, GCS, HDFS, S3};
use crate::types::{KeyRange, Ts};

use super::keys;

/// A task to be written by [`super::MetaDataClient::put_task`]: the protobuf info plus the
/// ranges and initial pause flag that live in their own keys.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInfo {
    pub info: StreamBackupTaskInfo,
    pub ranges: Vec<KeyRange>,
    pub pausing: bool,
}

impl TaskInfo {
    pub fn new(name: &str) -> Self {
        let mut info = StreamBackupTaskInfo::new();
        info.set_name(name.to_string());
        TaskInfo { info, ranges: Vec::new(), pausing: false }
    }
    pub fn from_ts(mut self, ts: Ts) -> Self {
        self.info.set_start_ts(ts);
        self
    }
    pub fn until_ts(mut self, ts: Ts) -> Self {
        self.info.set_end_ts(ts);
        self
    }
    pub fn with_range(mut self, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        self.ranges.push(KeyRange::new(start, end));
        self
    }
    pub fn with_ranges(mut self, ranges: impl IntoIterator<Item = KeyRange>) -> Self {
        self.ranges.extend(ranges);
        self
    }
    pub fn with_table_filter(mut self, patterns: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.info.set_table_filter(patterns.into_iter().map(Into::into).collect());
        self
    }
    pub fn to_storage(mut self, storage: StorageBackend) -> Self {
        self.info.set_storage(storage);
        self
    }
    pub fn pausing(mut self, pausing: bool) -> Self {
        self.pausing = pausing;
        self
    }

    pub fn name(&self) -> &str {
        self.info.get_name()
    }

    /// Upstream's rules, in upstream's order, plus range sanity (a range whose end is not
    /// after its start would be silently useless).
    pub fn check(self) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidTask { task: self.name().to_string(), reason };
        if !self.info.has_storage() {
            return Err(invalid("the storage backend is null".into()));
        }
        if self.info.get_table_filter().is_empty() {
            return Err(invalid("the table filter is empty, maybe add '*.*' for including all tables".into()));
        }
        check_task_name(self.name())?;
        if let Some(bad) = self.ranges.iter().find(|r| !r.end.is_empty() && r.end <= r.start) {
            return Err(invalid(format!("range {bad} is empty: its end must be after its start")));
        }
        if self.info.get_end_ts() != 0 && self.info.get_end_ts() < self.info.get_start_ts() {
            return Err(invalid(format!(
                "end ts {} is before start ts {}",
                self.info.get_end_ts(),
                self.info.get_start_ts()
            )));
        }
        Ok(self)
    }
}

/// Task names are `^[0-9a-zA-Z_]+$`: they are path segments of every metadata key.
pub fn check_task_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::InvalidTask {
            task: name.to_string(),
            reason: format!(
                "the task name can contain alphanumeric characters and underscore only (re = ^[0-9a-zA-Z_]+$, name = {name})"
            ),
        });
    }
    Ok(())
}

/// Parses a storage URL the way `br log start --storage` accepts them, S3 options included
/// as query parameters (`s3://bucket/prefix?endpoint=http://host:9000&access-key=…`).
pub fn parse_storage_url(url: &str) -> Result<StorageBackend> {
    let shown = url.split_once('?').map_or(url, |(base, _)| base);
    let bad = |reason: &str| Error::Config(format!("storage URL {shown:?}: {reason}"));
    let (url, query) = url.split_once('?').unwrap_or((url, ""));
    if !query.is_empty() && !url.starts_with("s3://") {
        return Err(bad("only s3:// URLs take ?options"));
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected scheme://..., e.g. local:///backup or s3://bucket/prefix"))?;
    let (bucket, prefix) = rest.split_once('/').map_or((rest, ""), |(b, p)| (b, p.trim_matches('/')));
    let mut backend = StorageBackend::new();
    match scheme {
        "noop" => backend.set_noop(Noop::new()),
        "local" | "file" => {
            if rest.is_empty() {
                return Err(bad("a local path is required"));
            }
            let mut local = Local::new();
            local.set_path(rest.to_string());
            backend.set_local(local);
        }
        "s3" => {
            if bucket.is_empty() {
                return Err(bad("a bucket is required"));
            }
            let mut s3 = S3::new();
            s3.set_bucket(bucket.into());
            s3.set_prefix(prefix.into());
            // BR's default when the URL says nothing: most S3-compatible servers need it.
            s3.set_force_path_style(true);
            apply_s3_options(&mut s3, query).map_err(|reason| bad(&reason))?;
            backend.set_s3(s3);
        }
        "gcs" | "gs" => {
            let mut gcs = GCS::new();
            gcs.set_bucket(bucket.into());
            gcs.set_prefix(prefix.into());
            backend.set_gcs(gcs);
        }
        "azure" | "azblob" => {
            let mut azure = AzureBlobStorage::new();
            azure.set_bucket(bucket.into());
            azure.set_prefix(prefix.into());
            backend.set_azure_blob_storage(azure);
        }
        "hdfs" => {
            let mut hdfs = HDFS::new();
            hdfs.set_remote(url.to_string());
            backend.set_hdfs(hdfs);
        }
        other => return Err(bad(&format!("unsupported scheme {other:?} (noop, local, s3, gcs, azure, hdfs)"))),
    }
    Ok(backend)
}

/// BR's S3 URL options (`S3BackendOptions` JSON names; `_` and `-` alike, any case).
fn apply_s3_options(s3: &mut S3, query: &str) -> std::result::Result<(), String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| format!("option {key}: bad %-escape"))?;
        let flag = || value.parse::<bool>().map_err(|_| format!("option {key}: expected true or false"));
        match key.to_ascii_lowercase().replace('_', "-").as_str() {
            "endpoint" => s3.set_endpoint(value.trim_end_matches('/').to_string()),
            "region" => s3.set_region(value),
            "storage-class" => s3.set_storage_class(value),
            "sse" => s3.set_sse(value),
            "sse-kms-key-id" => s3.set_sse_kms_key_id(value),
            "acl" => s3.set_acl(value),
            "access-key" => s3.set_access_key(value),
            "secret-access-key" => s3.set_secret_access_key(value),
            "session-token" => s3.set_session_token(value),
            "provider" => s3.set_provider(value),
            "role-arn" => s3.set_role_arn(value),
            "external-id" => s3.set_external_id(value),
            "force-path-style" => s3.set_force_path_style(flag()?),
            "object-lock-enabled" => s3.set_object_lock_enabled(flag()?),
            _ => return Err(format!("unknown S3 option {key:?}")),
        }
    }
    Ok(())
}

/// `%XX` escapes of a URL query value (a secret key may hold `+`, `/` or `=`).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(text.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A URL for display, without credentials.
pub fn describe_storage(storage: &StorageBackend) -> String {
    use crate::proto::brpb::StorageBackend_oneof_backend as B;
    match &storage.backend {
        None => "(none)".into(),
        Some(B::noop(_)) => "noop://".into(),
        Some(B::local(l)) => format!("local://{}", l.get_path()),
        Some(B::s3(s)) => format!("s3://{}/{}", s.get_bucket(), s.get_prefix()),
        Some(B::gcs(g)) => format!("gcs://{}/{}", g.get_bucket(), g.get_prefix()),
        Some(B::azure_blob_storage(a)) => format!("azure://{}/{}", a.get_bucket(), a.get_prefix()),
        Some(B::hdfs(h)) => h.get_remote().to_string(),
        Some(B::cloud_dynamic(c)) => format!("{}://{}", c.get_provider_name(), c.get_bucket().get_bucket()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointType {
    Store,
    Region,
    Task,
    Global,
    Invalid,
}

/// One record under `checkpoints_of(task)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub id: u64,
    pub version: u64,
    pub ts: Ts,
    pub is_global: bool,
}

impl Checkpoint {
    pub fn checkpoint_type(&self) -> CheckpointType {
        match (self.is_global, self.id, self.version) {
            (true, _, _) => CheckpointType::Global,
            (false, 0, 0) => CheckpointType::Task,
            (false, _, 0) => CheckpointType::Store,
            (false, id, _) if id != 0 => CheckpointType::Region,
            _ => CheckpointType::Invalid,
        }
    }
}

/// Parses a checkpoint key and value of `task` (upstream's `ParseCheckpoint`).
pub fn parse_checkpoint(task: &str, key: &[u8], value: &[u8]) -> Result<Checkpoint> {
    let prefix = keys::checkpoints_of(task);
    let bad = |reason: String| Error::BadMeta {
        task: task.to_string(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let rest =
        key.strip_prefix(prefix.as_bytes()).ok_or_else(|| bad(format!("the prefix is wrong (expected {prefix})")))?;
    let ts = keys::decode_u64(value)
        .ok_or_else(|| bad(format!("the checkpoint value isn't 64bits (it is {} bytes)", value.len())))?;
    let segments: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
    let decimal = |segment: &[u8]| -> Result<u64> {
        std::str::from_utf8(segment)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("{:?} is not a decimal id", String::from_utf8_lossy(segment))))
    };
    let mut checkpoint = Checkpoint { id: 0, version: 0, ts, is_global: false };
    match segments[0] {
        b"store" => {
            if segments.len() != 2 {
                return Err(bad(format!("the store checkpoint seg mismatch; segs = {}", segments.len())));
            }
            checkpoint.id = decimal(segments[1])?;
        }
        b"central_global" => checkpoint.is_global = true,
        b"region" => {
            if segments.len() != 3 {
                return Err(bad(format!("the region checkpoint seg mismatch; segs = {}", segments.len())));
            }
            checkpoint.id = decimal(segments[1])?;
            checkpoint.version = decimal(segments[2])?;
        }
        _ => {
            checkpoint.id = keys::decode_u64(rest)
                .ok_or_else(|| bad(format!("the store id isn't 64bits (it is {} bytes)", rest.len())))?;
        }
    }
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_follows_upstream_rules() {
        let ok = TaskInfo::new("t_1").to_storage(parse_storage_url("noop://").unwrap()).with_table_filter(["*.*"]);
        assert!(ok.clone().check().is_ok());
        let no_storage = TaskInfo::new("t").with_table_filter(["*.*"]).check().unwrap_err().to_string();
        assert!(no_storage.contains("storage backend is null") && no_storage.contains("task t"));
        assert!(TaskInfo::new("t")
            .to_storage(StorageBackend::new())
            .check()
            .unwrap_err()
            .to_string()
            .contains("table filter"));
        assert!(ok.clone().info.get_name() == "t_1");
        let mut bad_name = ok.clone();
        bad_name.info.set_name("t-1".into());
        assert!(bad_name.check().unwrap_err().to_string().contains("alphanumeric"));
        assert!(ok.clone().with_range("b", "a").check().unwrap_err().to_string().contains("[b, a)"));
        assert!(ok.from_ts(10).until_ts(5).check().is_err());
    }

    #[test]
    fn storage_urls() {
        let s3 = parse_storage_url("s3://bucket/some/prefix/").unwrap();
        assert_eq!((s3.get_s3().get_bucket(), s3.get_s3().get_prefix()), ("bucket", "some/prefix"));
        assert_eq!(parse_storage_url("local:///tmp/backup").unwrap().get_local().get_path(), "/tmp/backup");
        assert!(parse_storage_url("noop://").unwrap().has_noop());
        assert_eq!(describe_storage(&s3), "s3://bucket/some/prefix");
        for bad in ["s3://", "ftp://x", "nothing", "local://"] {
            assert!(parse_storage_url(bad).unwrap_err().to_string().contains(bad));
        }
    }

    #[test]
    fn s3_urls_take_brs_options() {
        let url = "s3://logs/pitr?endpoint=http://127.0.0.1:9000/&Access_Key=AK&secret-access-key=a%2Fb+c\
                   &region=eu-west-1&force-path-style=false&sse=aws:kms";
        let backend = parse_storage_url(url).unwrap();
        let s3 = backend.get_s3();
        assert_eq!((s3.get_bucket(), s3.get_prefix(), s3.get_endpoint()), ("logs", "pitr", "http://127.0.0.1:9000"));
        assert_eq!((s3.get_access_key(), s3.get_secret_access_key()), ("AK", "a/b+c"));
        assert_eq!((s3.get_region(), s3.get_force_path_style(), s3.get_sse()), ("eu-west-1", false, "aws:kms"));
        assert!(parse_storage_url("s3://logs/p").unwrap().get_s3().get_force_path_style(), "BR's default");
        for (bad, wanted) in [
            ("s3://b/p?colour=red", "unknown S3 option \"colour\""),
            ("s3://b/p?force-path-style=yes", "expected true or false"),
            ("s3://b/p?secret-access-key=SECRET%zz", "bad %-escape"),
            ("local:///tmp?endpoint=x", "only s3:// URLs take ?options"),
        ] {
            let err = parse_storage_url(bad).unwrap_err().to_string();
            assert!(err.contains(wanted) && !err.contains("SECRET"), "{err}");
        }
    }

    #[test]
    fn checkpoint_keys_parse_like_upstream() {
        let p = keys::checkpoints_of("t");
        let v = keys::encode_u64(42);
        let parse = |suffix: &[u8]| parse_checkpoint("t", &[p.as_bytes(), suffix].concat(), &v);
        assert_eq!(parse(b"central_global").unwrap().checkpoint_type(), CheckpointType::Global);
        let store = parse(b"store/7").unwrap();
        assert_eq!((store.id, store.ts, store.checkpoint_type()), (7, 42, CheckpointType::Store));
        let region = parse(b"region/9/3").unwrap();
        assert_eq!((region.id, region.version, region.checkpoint_type()), (9, 3, CheckpointType::Region));
        assert_eq!(parse(&5u64.to_be_bytes()).unwrap().id, 5);
        assert!(parse(b"store/7/8").is_err());
        assert!(parse(b"region/x/3").is_err());
        assert!(parse(b"odd").unwrap_err().to_string().contains("isn't 64bits"));
        assert!(parse_checkpoint("t", b"/elsewhere", &v).is_err());
        assert!(parse_checkpoint("t", format!("{p}store/1").as_bytes(), b"short").is_err());
    }
}
