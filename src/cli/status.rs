//! `task status` in the layout of `br log status` (`br/pkg/stream/stream_status.go`): the
//! same field names, the NORMAL / PAUSE / ERROR rule, BR's date format and, with `--json`,
//! BR's field set. Rendering is pure so that golden tests pin it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use streamhelper::format::printable;
use streamhelper::format::{format_br_date, format_duration};
use streamhelper::meta::{describe_storage, CheckpointType, PausePayload, PauseState, Severity, Task};
use streamhelper::proto::brpb::StreamBackupError;
use streamhelper::storage;
use streamhelper::ts::{compose_ts, system_time_of};
use streamhelper::Result;
use streamhelper::{StoreId, Ts};

/// Everything `task status` shows about one task.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub name: String,
    pub start_ts: Ts,
    pub end_ts: Ts,
    pub storage: String,
    pub table_filter: Vec<String>,
    pub checkpoint: Ts,
    /// Per-store checkpoints, shown when no global checkpoint exists yet.
    pub store_checkpoints: Option<Vec<(StoreId, Ts)>>,
    pub pause: Option<PauseState>,
    pub last_errors: BTreeMap<StoreId, StreamBackupError>,
    /// The copy in the task's external storage (`v1/global_checkpoint/central_global.ts`):
    /// `Ok(None)` before the first write, `Err` when it cannot be read.
    pub storage_copy: std::result::Result<Option<Ts>, String>,
}

/// Deadline of reading the checkpoint copy from a task's storage.
const STORAGE_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl StatusView {
    pub fn read(task: &Task) -> Result<StatusView> {
        let checkpoints = task.next_backup_ts_list()?;
        let has_global = checkpoints.iter().any(|c| c.checkpoint_type() == CheckpointType::Global);
        let store_checkpoints = (!has_global).then(|| {
            checkpoints.iter().filter(|c| c.checkpoint_type() == CheckpointType::Store).map(|c| (c.id, c.ts)).collect()
        });
        Ok(StatusView {
            name: task.name().to_string(),
            start_ts: task.info.get_start_ts(),
            end_ts: task.info.get_end_ts(),
            storage: describe_storage(task.info.get_storage()),
            table_filter: task.info.get_table_filter().to_vec(),
            checkpoint: task.get_global_checkpoint_ts()?,
            store_checkpoints,
            pause: task.pause_state()?,
            last_errors: task.last_error()?,
            storage_copy: storage::open(task.info.get_storage())
                .and_then(|s| storage::read_global_checkpoint(s.as_ref(), STORAGE_READ_TIMEOUT))
                .map_err(|e| e.to_string()),
        })
    }

    /// BR's rule: paused with store errors or an ERROR pause is ERROR; other pauses PAUSE.
    pub fn status(&self) -> &'static str {
        let severe = matches!(&self.pause, Some(PauseState::V2(p)) if p.severity == Severity::Error);
        match &self.pause {
            Some(_) if severe || !self.last_errors.is_empty() => "ERROR",
            Some(_) => "PAUSE",
            None => "NORMAL",
        }
    }
}

/// Dates and gaps as BR prints them, relative to `now`, in the zone `offset_secs`.
struct Clock {
    now: SystemTime,
    offset_secs: i64,
}

impl Clock {
    fn date(&self, ts: Ts) -> String {
        format_br_date(system_time_of(ts), self.offset_secs)
    }

    fn date_and_gap(&self, ts: Ts) -> String {
        let gap = self.now.duration_since(system_time_of(ts)).unwrap_or_default();
        let rounded = std::time::Duration::from_secs((gap.as_millis() as u64 + 500) / 1000);
        format!("{}; gap={}", self.date(ts), format_duration(rounded))
    }
}

/// `key: value` rows with the keys right-aligned, as BR's console table.
/// Values come from etcd: control characters are escaped, so that what a peer stored cannot
/// add lines or drive the terminal.
fn table(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:>width$}: {}\n", printable(v))).collect()
}

fn rows_of(view: &StatusView, clock: &Clock) -> Vec<(String, String)> {
    let mut rows = vec![("name".to_string(), view.name.clone())];
    let status = match view.status() {
        "NORMAL" => "● NORMAL",
        "PAUSE" => "● PAUSE",
        _ => "○ ERROR",
    };
    rows.push(("status".into(), status.into()));
    rows.push(("start".into(), clock.date(view.start_ts)));
    if view.end_ts > 0 {
        rows.push(("end".into(), clock.date(view.end_ts)));
    }
    rows.push(("storage".into(), view.storage.clone()));
    rows.push(("checkpoint[global]".into(), clock.date_and_gap(view.checkpoint)));
    let copy = match &view.storage_copy {
        Ok(Some(ts)) => clock.date_and_gap(*ts),
        Ok(None) => "not written yet".into(),
        Err(e) => e.clone(),
    };
    rows.push(("checkpoint[storage]".into(), copy));
    for (store, ts) in view.store_checkpoints.iter().flatten() {
        rows.push((format!("checkpoint[store={store}]"), clock.date_and_gap(*ts)));
    }
    if let Some(PauseState::V2(pause)) = &view.pause {
        let time = streamhelper::format::parse_rfc3339(&pause.operation_time)
            .map(|t| format_br_date(t, clock.offset_secs))
            .unwrap_or_else(|_| pause.operation_time.clone());
        rows.push(("pause-time".into(), time));
        rows.push(("pause-operator".into(), pause.operation_hostname.clone()));
        rows.push(("pause-operator-pid".into(), pause.operation_pid.to_string()));
        match pause.payload() {
            Ok(PausePayload::None) => {}
            Ok(PausePayload::Text(text)) => rows.push(("pause-payload".into(), text)),
            Ok(PausePayload::Error(e)) => {
                rows.push(("pause-payload[errcode]".into(), e.get_error_code().to_string()));
                rows.push(("pause-payload[errmesg]".into(), e.get_error_message().to_string()));
            }
            Err(e) => rows.push(("pause-payload[errparse]".into(), e)),
        }
    }
    for (store, e) in &view.last_errors {
        rows.push((format!("error[store={store}]"), e.get_error_code().to_string()));
        rows.push((format!("error-happen-at[store={store}]"), clock.date_and_gap(compose_ts(e.get_happen_at(), 0))));
        rows.push((format!("error-message[store={store}]"), e.get_error_message().to_string()));
    }
    rows
}

/// The text `br log status` prints (without its colours and the `speed(est.)` line), plus
/// `checkpoint[storage]`.
pub fn render_text(views: &[StatusView], now: SystemTime, offset_secs: i64) -> String {
    let clock = Clock { now, offset_secs };
    if views.is_empty() {
        return "○ No Task Yet.\n".into();
    }
    let mut out = format!("● Total {} Tasks.\n", views.len());
    for (i, view) in views.iter().enumerate() {
        out.push_str(&format!("> #{} <\n", i + 1));
        out.push_str(&table(&rows_of(view, &clock)));
    }
    out
}

#[derive(Serialize)]
struct StoreProgress {
    store_id: StoreId,
    checkpoint: Ts,
}

/// `backuppb.StreamBackupError` as Go's JSON encoder writes it (gogoproto tags, omitempty).
#[derive(Serialize)]
struct LastError {
    #[serde(skip_serializing_if = "is_zero")]
    happen_at: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    error_code: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error_message: String,
    #[serde(skip_serializing_if = "is_zero")]
    store_id: u64,
}

#[derive(Serialize)]
struct StoreLastError {
    store_id: StoreId,
    last_error: LastError,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// BR's JSON fields, then ours (`checkpoint_time`, `paused`, the storage copy).
#[derive(Serialize)]
struct JsonTask {
    name: String,
    #[serde(skip_serializing_if = "is_zero")]
    start_ts: Ts,
    #[serde(skip_serializing_if = "is_zero")]
    end_ts: Ts,
    status: &'static str,
    table_filter: Vec<String>,
    progress: Vec<StoreProgress>,
    storage: String,
    checkpoint: Ts,
    /// BR scrapes TiKV's metrics for it; we do not. An integer so that it prints `0` as Go does.
    estimate_qps: u64,
    last_errors: Vec<StoreLastError>,
    checkpoint_time: String,
    paused: bool,
    storage_checkpoint: Option<Ts>,
    /// Why `storage_checkpoint` is missing, when it is.
    storage_checkpoint_note: Option<String>,
}

/// The JSON `br log status --json` prints: always an array, on one line.
pub fn render_json(views: &[StatusView], offset_secs: i64) -> String {
    let tasks: Vec<JsonTask> = views
        .iter()
        .map(|v| JsonTask {
            name: v.name.clone(),
            start_ts: v.start_ts,
            end_ts: v.end_ts,
            status: v.status(),
            table_filter: v.table_filter.clone(),
            progress: v
                .store_checkpoints
                .iter()
                .flatten()
                .map(|&(store_id, checkpoint)| StoreProgress { store_id, checkpoint })
                .collect(),
            storage: v.storage.clone(),
            checkpoint: v.checkpoint,
            estimate_qps: 0,
            last_errors: v
                .last_errors
                .iter()
                .map(|(&store_id, e)| StoreLastError {
                    store_id,
                    last_error: LastError {
                        happen_at: e.get_happen_at(),
                        error_code: e.get_error_code().to_string(),
                        error_message: e.get_error_message().to_string(),
                        store_id: e.get_store_id(),
                    },
                })
                .collect(),
            checkpoint_time: format_br_date(system_time_of(v.checkpoint), offset_secs),
            paused: v.pause.is_some(),
            storage_checkpoint: v.storage_copy.clone().ok().flatten(),
            storage_checkpoint_note: match &v.storage_copy {
                Ok(Some(_)) => None,
                Ok(None) => Some("not written yet".into()),
                Err(e) => Some(e.clone()),
            },
        })
        .collect();
    serde_json::to_string(&tasks).expect("JSON output")
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamhelper::meta::PauseV2;
    use streamhelper::ts::ts_from_system_time;

    const CST: i64 = 8 * 3600;

    fn at(text: &str) -> SystemTime {
        streamhelper::format::parse_rfc3339(text).unwrap()
    }

    fn view(name: &str) -> StatusView {
        StatusView {
            name: name.into(),
            start_ts: ts_from_system_time(at("2026-05-11 01:42:23+0800")),
            end_ts: 0,
            storage: "s3://backup-101/log-backup".into(),
            table_filter: vec!["*.*".into()],
            checkpoint: ts_from_system_time(at("2026-05-11 09:31:47.2+0800")),
            store_checkpoints: None,
            pause: None,
            last_errors: BTreeMap::new(),
            storage_copy: Ok(Some(ts_from_system_time(at("2026-05-11 09:30:00+0800")))),
        }
    }

    fn store_error() -> StreamBackupError {
        let mut e = StreamBackupError::new();
        e.set_happen_at(streamhelper::ts::physical_ms(ts_from_system_time(at("2026-05-11 09:30:00+0800"))));
        e.set_error_code("KV:LogBackup:RaftReq".into());
        e.set_error_message("retry time exhausted".into());
        e.set_store_id(3);
        e
    }

    #[test]
    fn status_text_matches_br_log_status() {
        let now = at("2026-05-11 09:36:40+0800");
        let normal = view("pitr");
        let mut paused = view("paused");
        paused.end_ts = ts_from_system_time(at("2035-01-01 00:00:00+0800"));
        let mut pause = PauseV2::now(Severity::Manual).with_message("maintenance");
        pause.operation_hostname = "ops-1".into();
        pause.operation_pid = 4242;
        pause.operation_time = "2026-05-11T01:30:00Z".into();
        paused.pause = Some(PauseState::V2(pause));
        paused.storage_copy = Ok(None);
        let mut failed = view("failed");
        failed.checkpoint = failed.start_ts;
        failed.store_checkpoints = Some(vec![(1, ts_from_system_time(at("2026-05-11 09:00:00+0800")))]);
        failed.pause = Some(PauseState::Legacy);
        failed.last_errors.insert(3, store_error());
        failed.storage_copy = Err("external storage s3://b/p: connection refused".into());
        let text = render_text(&[normal, paused, failed], now, CST);
        let golden = "\
● Total 3 Tasks.
> #1 <
               name: pitr
             status: ● NORMAL
              start: 2026-05-11 01:42:23 +0800
            storage: s3://backup-101/log-backup
 checkpoint[global]: 2026-05-11 09:31:47.2 +0800; gap=4m53s
checkpoint[storage]: 2026-05-11 09:30:00 +0800; gap=6m40s
> #2 <
               name: paused
             status: ● PAUSE
              start: 2026-05-11 01:42:23 +0800
                end: 2035-01-01 00:00:00 +0800
            storage: s3://backup-101/log-backup
 checkpoint[global]: 2026-05-11 09:31:47.2 +0800; gap=4m53s
checkpoint[storage]: not written yet
         pause-time: 2026-05-11 09:30:00 +0800
     pause-operator: ops-1
 pause-operator-pid: 4242
      pause-payload: maintenance
> #3 <
                    name: failed
                  status: ○ ERROR
                   start: 2026-05-11 01:42:23 +0800
                 storage: s3://backup-101/log-backup
      checkpoint[global]: 2026-05-11 01:42:23 +0800; gap=7h54m17s
     checkpoint[storage]: external storage s3://b/p: connection refused
     checkpoint[store=1]: 2026-05-11 09:00:00 +0800; gap=36m40s
          error[store=3]: KV:LogBackup:RaftReq
error-happen-at[store=3]: 2026-05-11 09:30:00 +0800; gap=6m40s
  error-message[store=3]: retry time exhausted
";
        assert_eq!(text, golden);
        assert_eq!(render_text(&[], now, CST), "○ No Task Yet.\n");
    }

    #[test]
    fn status_json_has_brs_field_set() {
        let mut failed = view("failed");
        failed.store_checkpoints = Some(vec![(1, 449_000_000_000_000_000)]);
        failed.pause = Some(PauseState::V2(PauseV2::now(Severity::Error)));
        failed.last_errors.insert(3, store_error());
        failed.storage_copy = Err("connection refused".into());
        let json = render_json(&[view("pitr"), failed], CST);
        let start = view("pitr").start_ts;
        let checkpoint = view("pitr").checkpoint;
        let golden = format!(
            concat!(
                r#"[{{"name":"pitr","start_ts":{start},"status":"NORMAL","table_filter":["*.*"],"progress":[],"#,
                r#""storage":"s3://backup-101/log-backup","checkpoint":{cp},"estimate_qps":0,"last_errors":[],"#,
                r#""checkpoint_time":"2026-05-11 09:31:47.2 +0800","paused":false,"storage_checkpoint":{copy},"#,
                r#""storage_checkpoint_note":null}},"#,
                r#"{{"name":"failed","start_ts":{start},"status":"ERROR","table_filter":["*.*"],"#,
                r#""progress":[{{"store_id":1,"checkpoint":449000000000000000}}],"#,
                r#""storage":"s3://backup-101/log-backup","checkpoint":{cp},"estimate_qps":0,"#,
                r#""last_errors":[{{"store_id":3,"last_error":{{"happen_at":{happen},"error_code":"KV:LogBackup:RaftReq","#,
                r#""error_message":"retry time exhausted","store_id":3}}}}],"#,
                r#""checkpoint_time":"2026-05-11 09:31:47.2 +0800","paused":true,"storage_checkpoint":null,"#,
                r#""storage_checkpoint_note":"connection refused"}}]"#
            ),
            start = start,
            cp = checkpoint,
            happen = store_error().get_happen_at(),
            copy = view("pitr").storage_copy.unwrap().unwrap(),
        );
        assert_eq!(json, golden);
        assert_eq!(render_json(&[], CST), "[]");
    }
}
