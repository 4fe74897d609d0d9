//! The I/O-free heart of the advancer: task events, flush events, poll results and `now` in;
//! polls to make and actions to take out. No threads, sockets or clocks, so every failure
//! story is a plain unit test.
//!
//! Safety lives here: span values only grow (max-merge), updates are clipped to the task's
//! ranges, the in-memory checkpoint never decreases, nothing above the current time is
//! believed, lag is judged from the *stored* checkpoint, and a paused or deleted task is
//! never uploaded.

use std::collections::BTreeMap;
use std::time::Duration;

use super::config::Config;
use crate::meta::{PauseV2, Severity, UploadOutcome};
use crate::proto::brpb::StreamBackupTaskInfo;
use crate::spans::{collapse, SpanFrontier};
use crate::timefmt::{format_duration, format_rfc3339};
use crate::types::{system_time_of, ts_add, ts_distance, ts_sub, KeyRange, Ts};

/// How far above `now` a reported timestamp may be and still be believed. Nothing can be
/// flushed after now; the slack covers the driver's estimate of now between ticks.
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(1);

/// The greatest timestamp a store or etcd may report at `now`.
pub fn latest_believable(now: Ts) -> Ts {
    ts_add(now, FUTURE_TOLERANCE)
}

/// One task's state.
struct TaskState {
    info: StreamBackupTaskInfo,
    /// The create revision of the task's info key; every write for the task is fenced by it.
    incarnation: i64,
    ranges: Vec<KeyRange>,
    frontier: SpanFrontier,
    /// The global checkpoint we believe in; never decreases.
    checkpoint: Ts,
    /// The last value we wrote (or found stored) and when (`now` of that tick).
    uploaded: Option<(Ts, Ts)>,
    paused: bool,
    /// A lag pause was asked for and not confirmed written yet: it is asked for again every
    /// tick (logged once).
    pause_pending: bool,
}

/// Ranges of one task to poll from TiKV this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct PollPlan {
    pub task: String,
    pub ranges: Vec<KeyRange>,
}

/// What the driver must do after a tick, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write the task's global checkpoint (monotonic, fenced by the owner term and the
    /// task's incarnation).
    Upload { task: String, incarnation: i64, ts: Ts },
    /// Hold PD's GC safepoint for `log-backup-coordinator` at `safe_point`.
    BlockGc { safe_point: Ts },
    /// No task: release the GC safepoint (idempotent; asked for every tick until PD confirms).
    UnblockGc,
    /// Pause a task whose checkpoint lags too far behind (fenced like an upload).
    Pause { task: String, incarnation: i64, pause: PauseV2 },
}

/// A task's state for `/status` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStatus {
    pub name: String,
    pub start_ts: Ts,
    pub checkpoint: Ts,
    pub uploaded: Option<Ts>,
    pub paused: bool,
    /// The span holding the checkpoint back, if any.
    pub slowest: Option<(KeyRange, Ts)>,
    pub spans: usize,
}

pub struct Advancer {
    config: Config,
    tasks: BTreeMap<String, TaskState>,
    subscriptions_healthy: bool,
    /// PD confirmed that no `log-backup-coordinator` safepoint is left, and none was set
    /// since. Until then, with no task, every tick asks to remove it: whoever set it (an
    /// earlier owner, an earlier run) and however often the call fails.
    gc_released: bool,
    /// The time at which the clock last could not be trusted (a fallback or a jump): no lag
    /// verdict for a checkpoint below it until one lag limit has passed since.
    lag_hold: Option<Ts>,
}

impl Advancer {
    pub fn new(config: Config) -> Self {
        Advancer { config, tasks: BTreeMap::new(), subscriptions_healthy: true, gc_released: false, lag_hold: None }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces the configuration; takes effect at the next tick (a raised lag limit lets a
    /// resumed task run without a restart).
    pub fn update_config(&mut self, config: Config) {
        self.config = config;
    }

    pub fn update_config_with(&mut self, f: impl FnOnce(&mut Config)) {
        f(&mut self.config);
    }

    /// A task appeared or was redefined: its frontier starts over at its start ts and its
    /// checkpoint at max(stored, start ts). `incarnation` is the create revision of its info
    /// key; `stored` is what etcd holds for that incarnation (0 if none); a value above the
    /// current time is dropped at the next tick. A task without ranges is bad metadata: it
    /// is refused and an earlier definition, if any, stays.
    pub fn add_task(
        &mut self,
        info: StreamBackupTaskInfo,
        incarnation: i64,
        ranges: &[KeyRange],
        paused: bool,
        stored: Ts,
    ) {
        let start_ts = info.get_start_ts();
        let ranges = collapse(ranges);
        if ranges.is_empty() {
            log::error!(
                "task {} has no key ranges: not tracked (bad metadata; its last good state stays)",
                info.get_name()
            );
            return;
        }
        let state = TaskState {
            frontier: SpanFrontier::new(&ranges, start_ts),
            checkpoint: stored.max(start_ts),
            uploaded: None,
            paused,
            pause_pending: false,
            ranges,
            info,
            incarnation,
        };
        log::info!(
            "added task {} with {} ranges, start ts {start_ts}, checkpoint {}{}",
            state.info.get_name(),
            state.ranges.len(),
            state.checkpoint,
            if paused { ", paused" } else { "" }
        );
        self.tasks.insert(state.info.get_name().to_string(), state);
    }

    /// Forgets the named task and only it (its paused flag goes with it).
    pub fn remove_task(&mut self, name: &str) -> bool {
        self.tasks.remove(name).is_some()
    }

    pub fn set_paused(&mut self, name: &str, paused: bool) {
        if let Some(task) = self.tasks.get_mut(name) {
            task.paused = paused;
            task.pause_pending = false;
        }
    }

    /// The lag pause of this incarnation of the task is written: it stops uploading now,
    /// before the watch reports the pause.
    pub fn on_paused(&mut self, name: &str, incarnation: i64) {
        if self.incarnation(name) == Some(incarnation) {
            self.set_paused(name, true);
        }
    }

    /// Resume starts over: stale in-memory state of a long pause must not be trusted more
    /// than what TiKV reports now.
    pub fn resume_task(&mut self, name: &str, stored: Ts) {
        if let Some(task) = self.tasks.remove(name) {
            self.add_task(task.info, task.incarnation, &task.ranges, false, stored.max(task.checkpoint));
        }
    }

    /// The incarnation (info key create revision) of a tracked task.
    pub fn incarnation(&self, name: &str) -> Option<i64> {
        self.tasks.get(name).map(|t| t.incarnation)
    }

    /// This tick's `now` came from a fallback clock or jumped further than the time that
    /// passed: a checkpoint from before it would look lagging without being so. Lag verdicts
    /// wait until the checkpoint passes `now`, or one lag limit after it.
    pub fn hold_lag_verdicts(&mut self, now: Ts) {
        self.lag_hold = Some(self.lag_hold.map_or(now, |held| held.max(now)));
    }

    pub fn set_subscriptions_healthy(&mut self, healthy: bool) {
        if !healthy && self.subscriptions_healthy {
            log::warn!(
                "a flush subscription is broken: polling spans older than {:?}",
                self.config.degraded_threshold()
            );
        }
        self.subscriptions_healthy = healthy;
    }

    fn active(&self) -> impl Iterator<Item = (&String, &TaskState)> {
        self.tasks.iter().filter(|(_, t)| !t.paused)
    }

    /// The key ranges of each running task.
    pub fn running_ranges(&self) -> impl Iterator<Item = (&str, &[KeyRange])> {
        self.active().map(|(name, task)| (name.as_str(), task.ranges.as_slice()))
    }

    /// A flushed range from a subscription: raises every task's spans it covers.
    pub fn on_flush(&mut self, range: &KeyRange, ts: Ts, now: Ts) -> usize {
        self.on_flushes([(range.start.as_slice(), range.end.as_slice(), ts)], now)
    }

    /// Flushed ranges (raw start key, raw end key, ts) from subscriptions, merged as one
    /// batch per task (the frontier hides memory latency across a batch). Flushes above
    /// `now` (the driver's best estimate of PD's time) are impossible and dropped; returns
    /// how many.
    pub fn on_flushes<'a, I>(&mut self, flushes: I, now: Ts) -> usize
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8], Ts)>,
        I::IntoIter: Clone,
    {
        let latest = latest_believable(now);
        let flushes = flushes.into_iter();
        let expected = flushes.size_hint().0;
        self.merge_flushes(flushes.clone().filter(move |(_, _, ts)| *ts <= latest), expected);
        flushes.filter(|(_, _, ts)| *ts > latest).count()
    }

    /// About `expected` flushed ranges already found believable (see
    /// [`Advancer::on_flushes`]), merged as one batch per task.
    pub fn merge_flushes<'a, I>(&mut self, flushes: I, expected: usize)
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8], Ts)>,
        I::IntoIter: Clone,
    {
        let flushes = flushes.into_iter();
        for task in self.tasks.values_mut() {
            task.frontier.merge_batch_of(expected, flushes.clone());
        }
    }

    /// Region checkpoints polled for `task`.
    pub fn on_poll_result<'a>(&mut self, task: &str, advanced: impl IntoIterator<Item = (&'a KeyRange, Ts)>) {
        if let Some(state) = self.tasks.get_mut(task) {
            state.frontier.merge_batch(advanced.into_iter().map(|(r, ts)| (r.start.as_slice(), r.end.as_slice(), ts)));
        }
    }

    /// Which spans to poll: those of running tasks older than the threshold (tighter while
    /// a subscription is broken), as collapsed ranges.
    pub fn plan_polls(&self, now: Ts) -> Vec<PollPlan> {
        self.plan_polls_below(self.poll_below(now))
    }

    /// Spans valued below this are polled at `now`.
    pub fn poll_below(&self, now: Ts) -> Ts {
        let threshold = if self.subscriptions_healthy {
            self.config.try_advance_threshold
        } else {
            self.config.degraded_threshold()
        };
        ts_sub(now, threshold)
    }

    /// The spans of running tasks older than `below`, as collapsed ranges per task.
    pub fn plan_polls_below(&self, below: Ts) -> Vec<PollPlan> {
        self.active()
            .filter_map(|(name, task)| {
                let lagging: Vec<KeyRange> =
                    task.frontier.below_unordered(below).map(|s| KeyRange::new(s.start, s.end)).collect();
                let ranges = collapse(&lagging);
                (!ranges.is_empty()).then(|| PollPlan { task: name.clone(), ranges })
            })
            .collect()
    }

    /// The `limit` oldest pieces of a running task's frontier valued below `below`, oldest
    /// first: O(limit log limit), whatever the number of pieces. What a bounded poll and a
    /// lock-resolution round look at.
    pub fn oldest_spans(&self, task: &str, below: Ts, limit: usize) -> Vec<(KeyRange, Ts)> {
        let Some(state) = self.tasks.get(task).filter(|t| !t.paused) else { return Vec::new() };
        state.frontier.below(below).take(limit).map(|s| (KeyRange::new(s.start, s.end), s.ts)).collect()
    }

    /// Moves each running task's checkpoint to its frontier's minimum (never down, never
    /// above `now`) and says what to upload, then where the GC safepoint goes. A task not
    /// uploaded this tick has its lag judged from the value etcd holds now (an uploaded one
    /// in [`Advancer::on_uploaded`]), so a frozen checkpoint is paused on time, not at the
    /// next heartbeat.
    pub fn finish_tick(&mut self, now: Ts) -> Vec<Action> {
        let heartbeat = self.config.upload_heartbeat;
        let (limit, lag_hold) = (self.config.lag_limit, self.lag_hold);
        let latest = latest_believable(now);
        let mut actions = Vec::new();
        for (name, task) in self.tasks.iter_mut() {
            if task.checkpoint > latest {
                // Only a stored value adopted at Add or Resume can be here: etcd holds a
                // checkpoint from the future, which must never reach the GC safepoint.
                log::error!(
                    "task {name}: the stored checkpoint {} is above the current time {now}; it is not trusted (fix \
                     checkpoint/{name}/central_global in etcd)",
                    task.checkpoint
                );
                task.checkpoint = task.frontier.min_ts().unwrap_or(task.info.get_start_ts()).min(now);
            }
        }
        for (name, task) in self.tasks.iter_mut().filter(|(_, t)| !t.paused) {
            if let Some(min) = task.frontier.min_ts() {
                let min = min.min(now);
                if min > task.checkpoint {
                    task.checkpoint = min;
                }
            }
            let due = match task.uploaded {
                None => true,
                Some((value, at)) => task.checkpoint > value || ts_distance(now, at) >= heartbeat,
            };
            if due {
                actions.push(Action::Upload { task: name.clone(), incarnation: task.incarnation, ts: task.checkpoint });
            } else if let Some((stored, _)) = task.uploaded {
                actions.extend(judge_lag(name, task, stored, now, limit, lag_hold));
            }
        }
        // One service safepoint covers every task, paused ones included: a resumed task
        // still needs its data.
        match self.tasks.values().map(|t| t.checkpoint).min() {
            Some(min) => {
                self.gc_released = false;
                actions.push(Action::BlockGc { safe_point: min.saturating_sub(1) });
            }
            None if !self.gc_released => actions.push(Action::UnblockGc),
            None => {}
        }
        actions
    }

    /// PD confirmed the removal of the GC safepoint (`UnblockGc` succeeded).
    pub fn on_gc_released(&mut self) {
        self.gc_released = true;
    }

    /// Another owner may have held the safepoint since it was last released (a new term):
    /// with no task, the next tick removes it again.
    pub fn forget_gc_release(&mut self) {
        self.gc_released = false;
    }

    /// Records an upload's outcome and judges lag from the value etcd now holds. Returns a
    /// pause when the lag exceeds the limit; the task stops uploading once the pause is
    /// written ([`Advancer::on_paused`]), and until then the pause is asked for every tick.
    pub fn on_uploaded(&mut self, task: &str, outcome: UploadOutcome, now: Ts) -> Option<Action> {
        let limit = self.config.lag_limit;
        let lag_hold = self.lag_hold;
        let state = self.tasks.get_mut(task)?;
        let stored = match outcome {
            UploadOutcome::Fenced | UploadOutcome::TaskGone => return None,
            UploadOutcome::Written => state.checkpoint,
            UploadOutcome::KeptHigher { stored } if stored > latest_believable(now) => {
                log::error!(
                    "task {task}: etcd keeps checkpoint {stored}, above the current time {now}: not adopted, and no lag \
                     verdict until it is fixed"
                );
                state.uploaded = Some((stored, now));
                return None;
            }
            UploadOutcome::KeptHigher { stored } => {
                // Another writer got further: that value is a true checkpoint too.
                state.checkpoint = state.checkpoint.max(stored);
                stored
            }
        };
        state.uploaded = Some((stored, now));
        judge_lag(task, state, stored, now, limit, lag_hold)
    }

    pub fn status(&self) -> Vec<TaskStatus> {
        self.tasks
            .iter()
            .map(|(name, t)| TaskStatus {
                name: name.clone(),
                start_ts: t.info.get_start_ts(),
                checkpoint: t.checkpoint,
                uploaded: t.uploaded.map(|(v, _)| v),
                paused: t.paused,
                slowest: t.frontier.min().map(|s| (KeyRange::new(s.start, s.end), s.ts)),
                spans: t.frontier.len(),
            })
            .collect()
    }

    /// The checkpoint of `range` within a task as the frontier knows it (upstream's
    /// `GetCheckpointInRange` answer after polling).
    pub fn checkpoint_in_range(&self, task: &str, range: &KeyRange) -> Option<Ts> {
        let state = self.tasks.get(task)?;
        state.frontier.iter().filter(|s| KeyRange::new(s.start, s.end).overlaps(range)).map(|s| s.ts).min()
    }
}

/// A pause when `stored` (the value etcd holds) lags `now` by more than `limit`, unless the
/// clock could not be trusted since (`lag_hold`). Marks the pause pending; the warning is
/// logged once per pending pause.
fn judge_lag(
    task: &str,
    state: &mut TaskState,
    stored: Ts,
    now: Ts,
    limit: Duration,
    lag_hold: Option<Ts>,
) -> Option<Action> {
    if limit.is_zero() || stored < state.info.get_start_ts() {
        return None;
    }
    let lag = ts_distance(now, stored);
    if lag <= limit {
        return None;
    }
    if let Some(held) = lag_hold.filter(|held| stored < *held && ts_distance(now, *held) < limit) {
        log::warn!(
            "task {task} lags {} by a clock that jumped or fell back at {held}: no pause until its checkpoint passes \
             that or the lag limit has passed since",
            format_duration(lag)
        );
        return None;
    }
    if !std::mem::replace(&mut state.pause_pending, true) {
        log::warn!(
            "checkpoint lag is too large: task {task} lags {} (limit {})",
            format_duration(lag),
            format_duration(limit)
        );
    }
    let message = format!(
        "The checkpoint is at {}, now it is {}, the lag is too huge ({}) hence pause the task to avoid impaction to the cluster",
        format_rfc3339(system_time_of(stored)),
        format_rfc3339(system_time_of(now)),
        format_duration(lag)
    );
    Some(Action::Pause {
        task: task.to_string(),
        incarnation: state.incarnation,
        pause: PauseV2::now(Severity::Error).with_message(&message),
    })
}
