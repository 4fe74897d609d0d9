//! `streamhelper task ...`: add, list, status, pause, resume, delete, clean-error, with
//! BR's GC-safepoint protocol (`<task>_pause_safepoint`, `br-<uuid>`) so that `br log` and
//! this command can undo each other's work.

use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::status::{render_json, render_text, StatusView};
use super::ClusterArgs;
use streamhelper::cluster::PdClient;
use streamhelper::format::printable;
use streamhelper::format::{format_duration, format_rfc3339, local_offset_secs, parse_duration, parse_rfc3339};
use streamhelper::meta::{
    check_task_name, describe_storage, parse_storage_url, MetaDataClient, PauseState, PauseV2, Severity, Task, TaskInfo,
};
use streamhelper::ts::{local_now_ts, system_time_of, ts_distance, ts_from_system_time};
use streamhelper::{Error, Result};
use streamhelper::{KeyRange, Ts};

/// BR's `DefaultStreamStartSafePointTTL`: the start safe point's TTL, and the pause safe
/// point's after a resume.
const START_SAFE_POINT_TTL: &str = "30m";

#[derive(Args, Debug)]
pub struct TaskArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: TaskAction,
}

/// A task name, positional or as BR's `--task-name`.
#[derive(Args, Debug)]
struct TaskName {
    /// The task name.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// The task name (as in `br log ... --task-name`).
    #[arg(long = "task-name", conflicts_with = "name")]
    task_name: Option<String>,
}

impl TaskName {
    fn get(&self) -> Option<&str> {
        self.name.as_deref().or(self.task_name.as_deref())
    }

    fn required(&self) -> Result<String> {
        self.get()
            .map(String::from)
            .ok_or_else(|| Error::Config("a task name is required (NAME or --task-name)".into()))
    }
}

#[derive(Subcommand, Debug)]
enum TaskAction {
    /// Create a task: its etcd metadata and BR's start GC safe point, nothing else.
    ///
    /// Unlike `br log start`, this writes no lock file and no schema snapshot (backupmeta)
    /// to the storage and does not check TiKV's `log-backup.enable`: the logs of such a task
    /// alone are not a backup `br restore point` can use. For real backups use `br log
    /// start`; this is for tests, development and re-creating metadata.
    #[command(visible_alias = "start")]
    Add {
        #[command(flatten)]
        name: TaskName,
        /// Where the log files go: noop://, local:///path, s3://bucket/prefix, gcs://..., azure://..., hdfs://...
        #[arg(long)]
        storage: String,
        /// Start timestamp: a TSO or a date-time with a zone (2026-05-11 01:42:23+0800). Default: now.
        #[arg(long)]
        start_ts: Option<String>,
        /// End timestamp: a TSO or a date-time with a zone. Default: none.
        #[arg(long)]
        end_ts: Option<String>,
        /// A key range START END (raw keys, `\xNN` escapes allowed; an empty END means to the end).
        /// Repeatable. Default: the whole key space.
        #[arg(long = "range", num_args = 2, value_names = ["START", "END"])]
        ranges: Vec<String>,
        /// Table filter patterns (display only, as in BR).
        #[arg(long = "filter", default_values_t = ["*.*".to_string()])]
        filters: Vec<String>,
        /// Create the task paused.
        #[arg(long)]
        paused: bool,
        /// Allow a task while others exist (BR allows one task per cluster).
        #[arg(long)]
        allow_multiple: bool,
        /// TTL of the start GC safe point `br-<uuid>` (BR's default: 30m).
        #[arg(long, default_value = START_SAFE_POINT_TTL, value_parser = parse_duration)]
        gc_ttl: Duration,
    },
    /// List every task.
    List,
    /// Show tasks as `br log status` does (no name: every task).
    Status {
        #[command(flatten)]
        name: TaskName,
    },
    /// Pause a task and hold GC at its checkpoint (service safe point `<task>_pause_safepoint`).
    Pause {
        #[command(flatten)]
        name: TaskName,
        /// Why (stored in the pause record as text).
        #[arg(long, visible_alias = "message")]
        reason: Option<String>,
        /// How long PD keeps the pause safe point (BR: --gc-ttl, 24h).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        gc_ttl: Duration,
    },
    /// Resume a paused task: checks its data was not garbage-collected, clears the stores'
    /// last errors, and shortens the pause safe point to 30m as BR does.
    Resume {
        #[command(flatten)]
        name: TaskName,
    },
    /// Delete a task and all of its metadata, and remove its pause safe point.
    #[command(visible_alias = "stop")]
    Delete {
        #[command(flatten)]
        name: TaskName,
    },
    /// Remove the last errors stores reported for a task.
    CleanError {
        #[command(flatten)]
        name: TaskName,
    },
}

/// A timestamp given as a TSO number or a date-time with a zone (RFC 3339 or BR's forms).
pub fn parse_ts(text: &str) -> Result<Ts> {
    if let Ok(ts) = text.parse::<u64>() {
        return Ok(ts);
    }
    parse_rfc3339(text).map(ts_from_system_time).map_err(|e| Error::Config(format!("{e}; or give a TSO number")))
}

/// BR's service safe point id for a paused task.
pub fn pause_safe_point_id(task: &str) -> String {
    format!("{task}_pause_safepoint")
}

/// BR's `UpdateServiceSafePoint`: GC keeps everything from `ts` on (PD gets `ts − 1`).
fn hold_gc_at(pd: &PdClient, service_id: &str, ttl: Duration, ts: Ts) -> Result<()> {
    let min = pd.update_service_safe_point(service_id, ttl.as_secs().max(1) as i64, ts.saturating_sub(1))?;
    if min > ts.saturating_sub(1) {
        log::warn!("service GC safe point {service_id} did not take: PD's minimum {min} is already past {ts}");
    }
    Ok(())
}

/// BR's `CheckGCSafePoint`: data at `ts` is gone once the GC safe point reached it.
fn check_not_collected(pd: &PdClient, task: &str, what: &str, ts: Ts) -> Result<()> {
    let gc = pd.gc_safe_point()?;
    if ts <= gc {
        return Err(Error::InvalidTask {
            task: task.into(),
            reason: format!(
                "its {what} {ts} ({}) has been garbage-collected: PD's GC safe point is {gc} ({}); the logs from \
                 there on cannot be produced any more",
                format_rfc3339(system_time_of(ts)),
                format_rfc3339(system_time_of(gc))
            ),
        });
    }
    Ok(())
}

/// Raw key text with `\xNN` escapes.
fn parse_key(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            let hex = text.get(i + 2..i + 4).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(
                hex.ok_or_else(|| Error::Config(format!("key {text:?}: \\x must be followed by two hex digits")))?,
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct TaskRow {
    name: String,
    start_ts: Ts,
    end_ts: Ts,
    checkpoint: Ts,
    checkpoint_time: String,
    lag: String,
    paused: bool,
    pause: Option<String>,
    storage: String,
}

fn row_of(task: &Task) -> Result<TaskRow> {
    let checkpoint = task.get_global_checkpoint_ts()?;
    let pause = task.pause_state()?;
    Ok(TaskRow {
        name: task.name().to_string(),
        start_ts: task.info.get_start_ts(),
        end_ts: task.info.get_end_ts(),
        checkpoint,
        checkpoint_time: format_rfc3339(system_time_of(checkpoint)),
        lag: format_duration(ts_distance(local_now_ts(), checkpoint)),
        paused: pause.is_some(),
        pause: pause.as_ref().map(PauseState::describe),
        storage: describe_storage(task.info.get_storage()),
    })
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON output"));
}

/// Cells come from etcd: control characters are escaped (see `text::printable`).
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| printable(cell).into_owned()).collect()).collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn run(args: TaskArgs) -> Result<()> {
    let client = MetaDataClient::new(args.cluster.etcd_client()?);
    match args.action {
        TaskAction::Add { name, storage, start_ts, end_ts, ranges, filters, paused, allow_multiple, gc_ttl } => {
            let name = name.required()?;
            check_task_name(&name)?;
            let start = match start_ts {
                Some(t) => parse_ts(&t)?,
                None => ts_from_system_time(SystemTime::now()),
            };
            let end = end_ts.map(|t| parse_ts(&t)).transpose()?.unwrap_or(0);
            let mut key_ranges = Vec::new();
            for pair in ranges.chunks(2) {
                key_ranges.push(KeyRange::new(parse_key(&pair[0])?, parse_key(&pair[1])?));
            }
            if key_ranges.is_empty() {
                key_ranges.push(KeyRange::full());
            }
            let info = TaskInfo::new(&name)
                .from_ts(start)
                .until_ts(end)
                .to_storage(parse_storage_url(&storage)?)
                .with_table_filter(filters)
                .with_ranges(key_ranges)
                .pausing(paused)
                .check()?;
            if client.get_task(&name).is_ok() {
                return Err(Error::InvalidTask {
                    task: name,
                    reason: "a task with this name exists; delete it first".into(),
                });
            }
            let existing = client.get_task_count()?;
            if existing > 0 && !allow_multiple {
                return Err(Error::InvalidTask {
                    task: name,
                    reason: format!(
                        "{existing} task(s) exist and BR allows one log backup task per cluster; pass \
                         --allow-multiple to add it anyway"
                    ),
                });
            }
            let pd = args.cluster.pd_client()?;
            check_not_collected(&pd, &name, "start-ts", start)?;
            hold_gc_at(&pd, &format!("br-{}", streamhelper::random_uuid()), gc_ttl, start)?;
            client.put_task(&info)?;
            println!("task {name} added, starting at {start} ({})", format_rfc3339(system_time_of(start)));
        }
        TaskAction::List => {
            let (tasks, errors, _) = client.get_all_tasks_with_revision()?;
            let rows = tasks.iter().map(row_of).collect::<Result<Vec<_>>>()?;
            if args.json {
                print_json(&rows);
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.name.clone(),
                            r.checkpoint.to_string(),
                            r.checkpoint_time.clone(),
                            r.lag.clone(),
                            if r.paused { "paused" } else { "running" }.into(),
                            r.storage.clone(),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "CHECKPOINT", "CHECKPOINT TIME", "LAG", "STATE", "STORAGE"], &cells);
            }
            warn_skipped(errors);
        }
        TaskAction::Status { name } => {
            let tasks = match name.get().filter(|n| *n != "*") {
                Some(name) => vec![client.get_task(name)?],
                None => {
                    let (tasks, errors, _) = client.get_all_tasks_with_revision()?;
                    warn_skipped(errors);
                    tasks
                }
            };
            let views = tasks.iter().map(StatusView::read).collect::<Result<Vec<_>>>()?;
            let now = SystemTime::now();
            if args.json {
                println!("{}", render_json(&views, local_offset_secs(now)));
            } else {
                print!("{}", render_text(&views, now, local_offset_secs(now)));
            }
        }
        TaskAction::Pause { name, reason, gc_ttl } => {
            let name = name.required()?;
            let (task, paused) = client.get_task_with_pause_status(&name)?;
            if paused {
                return Err(Error::InvalidTask { task: name, reason: "it is paused already".into() });
            }
            let checkpoint = task.get_global_checkpoint_ts()?;
            hold_gc_at(&args.cluster.pd_client()?, &pause_safe_point_id(&name), gc_ttl, checkpoint)?;
            let mut pause = PauseV2::now(Severity::Manual);
            if let Some(reason) = &reason {
                pause = pause.with_message(reason);
            }
            client.pause_task(&name, &pause)?;
            println!("task {name} paused; GC holds at its checkpoint {checkpoint} for {}", format_duration(gc_ttl));
        }
        TaskAction::Resume { name } => {
            let name = name.required()?;
            let (task, paused) = client.get_task_with_pause_status(&name)?;
            if !paused {
                return Err(Error::InvalidTask { task: name, reason: "it is not paused".into() });
            }
            let checkpoint = task.get_global_checkpoint_ts()?;
            let pd = args.cluster.pd_client()?;
            check_not_collected(&pd, &name, "checkpoint", checkpoint)?;
            client.resume_task(&name)?;
            client.clean_last_error_of_task(&name)?;
            let ttl = parse_duration(START_SAFE_POINT_TTL).expect("a valid constant");
            if let Err(e) = hold_gc_at(&pd, &pause_safe_point_id(&name), ttl, checkpoint) {
                log::warn!("task {name} resumed, but shortening its pause safe point failed (it expires anyway): {e}");
            }
            println!("task {name} resumed");
        }
        TaskAction::Delete { name } => {
            let name = name.required()?;
            client.get_task(&name)?;
            let pd = args.cluster.pd_client()?;
            client.delete_task(&name)?;
            // tidb#52082: a pause safe point left behind blocks GC for up to its TTL.
            if let Err(e) = pd.update_service_safe_point(&pause_safe_point_id(&name), 0, u64::MAX) {
                log::warn!("task {name} deleted, but removing its pause safe point failed: {e}");
            }
            println!("task {name} deleted");
        }
        TaskAction::CleanError { name } => {
            let name = name.required()?;
            client.clean_last_error_of_task(&name)?;
            println!("last errors of task {name} cleaned");
        }
    }
    Ok(())
}

fn warn_skipped(errors: Vec<Error>) {
    for e in errors {
        eprintln!("warning: {}", printable(&e.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_keys_parse() {
        assert_eq!(parse_ts("449842954436739073").unwrap(), 449842954436739073);
        assert_eq!(streamhelper::ts::physical_ms(parse_ts("2024-05-01T12:00:00Z").unwrap()), 1_714_564_800_000);
        assert_eq!(parse_ts("2024-05-01 20:00:00+0800").unwrap(), parse_ts("2024-05-01T12:00:00Z").unwrap());
        assert!(parse_ts("yesterday").unwrap_err().to_string().contains("yesterday"));
        assert_eq!(parse_key("t\\x00\\xffa").unwrap(), b"t\x00\xffa");
        assert!(parse_key("\\xZZ").is_err());
        assert_eq!(streamhelper::DisplayKey(&parse_key("a\\x01").unwrap()).to_string(), "a\\x01");
    }
}
