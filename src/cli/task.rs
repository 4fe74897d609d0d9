//! `streamhelper task ...`: add, list, status, pause, resume, delete, clean-error.

use std::time::SystemTime;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::ClusterArgs;
use crate::error::{Error, Result};
use crate::meta::{
    check_task_name, describe_storage, parse_storage_url, MetaDataClient, PauseState, PauseV2, Severity, Task, TaskInfo,
};
use crate::timefmt::{format_duration, format_rfc3339, parse_rfc3339};
use crate::types::{local_now_ts, system_time_of, ts_distance, ts_from_system_time, KeyRange, Ts};

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

#[derive(Subcommand, Debug)]
enum TaskAction {
    /// Create a task.
    Add {
        name: String,
        /// Where the log files go: noop://, local:///path, s3://bucket/prefix, gcs://..., azure://..., hdfs://...
        #[arg(long)]
        storage: String,
        /// Start timestamp: a TSO or an RFC 3339 time. Default: now.
        #[arg(long)]
        start_ts: Option<String>,
        /// End timestamp: a TSO or an RFC 3339 time. Default: none.
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
    },
    /// List every task.
    List,
    /// Show one task in detail.
    Status { name: String },
    /// Pause a task.
    Pause {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused task.
    Resume { name: String },
    /// Delete a task and all of its metadata.
    Delete { name: String },
    /// Remove the last errors stores reported for a task.
    CleanError { name: String },
}

/// A timestamp given as a TSO number or an RFC 3339 time.
pub fn parse_ts(text: &str) -> Result<Ts> {
    if let Ok(ts) = text.parse::<u64>() {
        return Ok(ts);
    }
    parse_rfc3339(text).map(ts_from_system_time).map_err(|e| Error::Config(format!("{e}; or give a TSO number")))
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

#[derive(Serialize)]
struct TaskDetail {
    #[serde(flatten)]
    row: TaskRow,
    table_filter: Vec<String>,
    ranges: Vec<String>,
    last_errors: Vec<String>,
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

pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
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
        TaskAction::Add { name, storage, start_ts, end_ts, ranges, filters, paused } => {
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
            for e in errors {
                eprintln!("warning: {e}");
            }
        }
        TaskAction::Status { name } => {
            let task = client.get_task(&name)?;
            let detail = TaskDetail {
                row: row_of(&task)?,
                table_filter: task.info.get_table_filter().to_vec(),
                ranges: task.ranges()?.iter().map(ToString::to_string).collect(),
                last_errors: task
                    .last_error()?
                    .into_iter()
                    .map(|(store, e)| format!("store {store}: [{}] {}", e.get_error_code(), e.get_error_message()))
                    .collect(),
            };
            if args.json {
                print_json(&detail);
            } else {
                let r = &detail.row;
                println!("name:         {}", r.name);
                println!("state:        {}", r.pause.as_deref().unwrap_or("running"));
                println!("checkpoint:   {} ({}), lag {}", r.checkpoint, r.checkpoint_time, r.lag);
                println!("start ts:     {}", r.start_ts);
                println!("end ts:       {}", if r.end_ts == 0 { "none".to_string() } else { r.end_ts.to_string() });
                println!("storage:      {}", r.storage);
                println!("table filter: {}", detail.table_filter.join(", "));
                println!("ranges:       {}", detail.ranges.join(" "));
                for e in &detail.last_errors {
                    println!("last error:   {e}");
                }
            }
        }
        TaskAction::Pause { name, reason } => {
            client.get_task(&name)?;
            let mut pause = PauseV2::now(Severity::Manual);
            if let Some(reason) = &reason {
                pause = pause.with_message(reason);
            }
            client.pause_task(&name, &pause)?;
            println!("task {name} paused");
        }
        TaskAction::Resume { name } => {
            client.get_task(&name)?;
            client.resume_task(&name)?;
            println!("task {name} resumed");
        }
        TaskAction::Delete { name } => {
            client.get_task(&name)?;
            client.delete_task(&name)?;
            println!("task {name} deleted");
        }
        TaskAction::CleanError { name } => {
            client.clean_last_error_of_task(&name)?;
            println!("last errors of task {name} cleaned");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_keys_parse() {
        assert_eq!(parse_ts("449842954436739073").unwrap(), 449842954436739073);
        assert_eq!(crate::types::physical_ms(parse_ts("2024-05-01T12:00:00Z").unwrap()), 1_714_564_800_000);
        assert!(parse_ts("yesterday").unwrap_err().to_string().contains("yesterday"));
        assert_eq!(parse_key("t\\x00\\xffa").unwrap(), b"t\x00\xffa");
        assert!(parse_key("\\xZZ").is_err());
        assert_eq!(crate::types::DisplayKey(&parse_key("a\\x01").unwrap()).to_string(), "a\\x01");
    }
}
