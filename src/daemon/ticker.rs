//! The ticker thread: owns the I/O around the core. It applies task, owner and flush events
//! as they come, and on every tick (while owner) polls lagging spans through the collector,
//! lets the core decide, then uploads, pauses and moves the GC safepoint. The core's lock is
//! never held across any of that I/O.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, tick, Receiver};

use super::owner::OwnerEvent;
use super::{RegionHint, Shared, TaskView};
use crate::advancer::metrics::{self, Metrics};
use crate::advancer::{latest_believable, Action};
use crate::cluster::{
    collect_checkpoints, ClusterMeta, CollectorConfig, FailReason, FlushEvent, FlushSubscriber, LogBackupService,
    SubscriberConfig,
};
use crate::etcd::Leadership;
use crate::locks::LockResolver;
use crate::meta::{AdvancerExt, TaskEvent, UploadOutcome};
use crate::stop::StopToken;
use crate::storage::CheckpointCopier;
use crate::timefmt::{format_duration, format_rfc3339};
use crate::types::{local_now_ts, system_time_of, ts_add, ts_distance, StoreId, Ts};

/// How much further than the elapsed time PD's clock may move between two readings before
/// it counts as a jump.
const CLOCK_JUMP_MARGIN: Duration = Duration::from_secs(30);

pub struct Ticker {
    pub shared: Arc<Shared>,
    pub meta: Arc<dyn ClusterMeta>,
    pub service: Arc<dyn LogBackupService>,
    pub ext: AdvancerExt,
    pub pool: rayon::ThreadPool,
    pub tasks: Receiver<TaskEvent>,
    pub owner: Receiver<OwnerEvent>,
    pub stop: StopToken,
    pub leadership: Option<Leadership>,
    pub subscriber: Option<FlushSubscriber>,
    /// Copies each uploaded checkpoint into the task's external storage.
    pub storage: CheckpointCopier,
    /// PD's last TSO and when it came, to bound flush events between ticks.
    pub last_tso: Option<(Ts, Instant)>,
    /// Stores already reported for flushing from the future (logged once each).
    pub future_stores: HashSet<StoreId>,
    /// Resolves locks on stuck tasks' lagging ranges on its own thread.
    pub locks: LockResolver,
}

impl Ticker {
    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn run(mut self) {
        let mut interval = self.shared.advancer.lock().config().tick_interval;
        let mut ticks = tick(interval);
        loop {
            let flushes = self.subscriber.as_ref().map(|s| s.events().clone()).unwrap_or_else(never);
            crossbeam_channel::select! {
                recv(self.stop.receiver()) -> _ => break,
                recv(self.tasks) -> event => match event {
                    Ok(event) => self.on_task_event(event),
                    Err(_) => break,
                },
                recv(self.owner) -> event => match event {
                    Ok(event) => self.on_owner_event(event),
                    Err(_) => break,
                },
                recv(flushes) -> event => {
                    if let Ok(first) = event {
                        let batch: Vec<_> = std::iter::once(first).chain(flushes.try_iter().take(4095)).collect();
                        self.on_flushes(&batch);
                    }
                }
                recv(ticks) -> _ => {
                    self.tick();
                    let configured = self.shared.advancer.lock().config().tick_interval;
                    if configured != interval {
                        interval = configured;
                        ticks = tick(interval);
                    }
                }
            }
        }
        self.lose_ownership();
    }

    fn on_flushes(&mut self, batch: &[FlushEvent]) {
        let now = self.estimated_now();
        let refused = self.shared.advancer.lock().on_flushes(batch.iter().map(|e| (&e.range, e.ts)), now);
        if refused == 0 {
            return;
        }
        self.metrics().inc_counter(metrics::FUTURE_CHECKPOINTS, &[("source", "flush")], refused as u64);
        let latest = latest_believable(now);
        let mut by_store: BTreeMap<StoreId, (usize, Ts)> = BTreeMap::new();
        for event in batch.iter().filter(|e| e.ts > latest) {
            let entry = by_store.entry(event.store).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(event.ts);
        }
        for (store, (count, max)) in by_store {
            if self.future_stores.insert(store) {
                log::warn!(
                    "store {store} sent {count} flush events above the current time {now} (up to {max}); they are \
                     ignored, and so are later ones (counted in {})",
                    metrics::FUTURE_CHECKPOINTS
                );
            }
        }
    }

    /// PD's time as last seen plus the time since; the local clock before PD answered.
    fn estimated_now(&self) -> Ts {
        match self.last_tso {
            Some((tso, at)) => ts_add(tso, at.elapsed()),
            None => local_now_ts(),
        }
    }

    fn stored_checkpoint(&self, task: &str) -> Ts {
        self.ext.get_global_checkpoint(task).unwrap_or_else(|e| {
            log::warn!("failed to get the global checkpoint of task {task}, using its start ts: {e}");
            0
        })
    }

    fn on_task_event(&mut self, event: TaskEvent) {
        log::info!("meet task event {event}");
        match event {
            TaskEvent::Add { info, ranges, paused } => {
                let stored = self.stored_checkpoint(info.get_name());
                self.storage.register(info.get_name(), info.get_storage());
                self.shared.advancer.lock().add_task(info, &ranges, paused, stored);
            }
            TaskEvent::Del { name } => {
                self.shared.advancer.lock().remove_task(&name);
                // Forgotten first, so that no late write brings the storage gauge back.
                self.storage.forget(&name);
                self.metrics().remove_gauge(metrics::EXTERNAL_STORAGE_CHECKPOINT, &[("task", &name)]);
                self.metrics().remove_gauge(metrics::LAST_CHECKPOINT, &[("task", &name)]);
                self.metrics().remove_gauge(metrics::CHECKPOINT_LAG, &[("task", &name)]);
            }
            TaskEvent::Pause { name } => self.shared.advancer.lock().set_paused(&name, true),
            TaskEvent::Resume { name } => {
                let stored = self.stored_checkpoint(&name);
                self.shared.advancer.lock().resume_task(&name, stored);
            }
            TaskEvent::Err { name, error } => {
                log::warn!("task listener: {}{error}", name.map(|n| format!("task {n}: ")).unwrap_or_default());
            }
        }
        self.publish(None);
    }

    fn on_owner_event(&mut self, event: OwnerEvent) {
        match event {
            OwnerEvent::Gained(leadership) => {
                self.leadership = Some(leadership);
                self.shared.owner.store(true, Ordering::SeqCst);
                self.metrics().set_gauge(metrics::OWNER, &[], 1.0);
                let mut subscriber =
                    FlushSubscriber::new(self.meta.clone(), self.service.clone(), SubscriberConfig::default());
                if let Err(e) = subscriber.update_store_topology() {
                    log::warn!("Error when updating store topology: {e}");
                }
                self.subscriber = Some(subscriber);
                log::info!("became owner: ticking every {:?}", self.shared.advancer.lock().config().tick_interval);
            }
            OwnerEvent::Lost => self.lose_ownership(),
        }
        self.publish(None);
    }

    /// Stops uploading at once; the subscriber's threads are joined.
    fn lose_ownership(&mut self) {
        if self.shared.owner.swap(false, Ordering::SeqCst) {
            log::info!("no longer owner: uploads stop");
        }
        self.leadership = None;
        self.subscriber = None;
        self.storage.clear();
        self.metrics().set_gauge(metrics::OWNER, &[], 0.0);
    }

    /// PD's TSO, or the local clock when PD does not answer. A fallback reading, or a TSO
    /// further ahead than the time that passed since the last one (at the first, than the
    /// local clock), holds lag verdicts back: it would make a healthy task look lagging.
    fn now(&mut self) -> Ts {
        let expected = self.estimated_now();
        let now = match self.meta.fetch_current_ts() {
            Ok(tso) => {
                self.last_tso = Some((tso, Instant::now()));
                if ts_distance(tso, expected) <= CLOCK_JUMP_MARGIN {
                    return tso;
                }
                log::warn!(
                    "PD's clock jumped {} ahead of the time that passed: no lag-limit pause until checkpoints catch up",
                    format_duration(ts_distance(tso, expected))
                );
                tso
            }
            Err(e) => {
                log::warn!("PD TSO unavailable, using the local clock (no lag-limit pause this tick): {e}");
                local_now_ts()
            }
        };
        self.shared.advancer.lock().hold_lag_verdicts(now);
        now
    }

    fn tick(&mut self) {
        if !self.shared.owner.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        let now = self.now();
        self.refresh_subscriptions();
        self.poll_lagging(now, started);
        let actions = self.shared.advancer.lock().finish_tick(now);
        self.apply(actions, now);
        // Starts a round for tasks stuck past the resolve interval; never waits for one.
        self.locks.after_tick(now, &mut self.shared.advancer.lock(), &self.shared.metrics);
        // After the GC step, as upstream; the writes run on the copier's thread.
        let write_timeout = self.shared.advancer.lock().config().tick_interval;
        self.storage.submit(write_timeout);
        self.publish(Some(now));
        self.metrics().observe(metrics::TICK_DURATION, &[("step", "tick")], started.elapsed());
    }

    fn refresh_subscriptions(&mut self) {
        let Some(subscriber) = self.subscriber.as_mut() else { return };
        if let Err(e) = subscriber.update_store_topology() {
            log::warn!("Error when updating store topology: {e}");
        }
        subscriber.handle_errors();
        let pending = subscriber.pending_errors();
        if let Some(e) = &pending {
            log::warn!("Subscriber meet error, would polling the checkpoint: {e}");
        }
        self.shared.advancer.lock().set_subscriptions_healthy(pending.is_none());
    }

    /// Polls the spans older than the threshold, within the tick interval: one hung store
    /// costs one RPC deadline, not the tick.
    fn poll_lagging(&self, now: Ts, started: Instant) {
        let (plans, config) = {
            let advancer = self.shared.advancer.lock();
            (advancer.plan_polls(now), advancer.config().clone())
        };
        let collector = CollectorConfig {
            rpc_timeout: config.rpc_timeout.min(config.tick_interval),
            max_ts: latest_believable(now),
            ..CollectorConfig::default()
        };
        for plan in plans {
            if started.elapsed() >= config.tick_interval {
                log::warn!("tick interval used up; polling of task {} waits for the next tick", plan.task);
                break;
            }
            let poll_started = Instant::now();
            match collect_checkpoints(self.meta.as_ref(), self.service.as_ref(), &self.pool, &plan.ranges, &collector) {
                Ok(result) => {
                    self.metrics().inc_counter(
                        metrics::REGIONS_POLLED,
                        &[],
                        (result.advanced.len() + result.failed.len()) as u64,
                    );
                    self.metrics().inc_counter(
                        metrics::REGION_REQUEST,
                        &[("result", "success")],
                        result.advanced.len() as u64,
                    );
                    self.metrics().inc_counter(
                        metrics::REGION_REQUEST,
                        &[("result", "fail")],
                        result.failed.len() as u64,
                    );
                    for failed in &result.failed {
                        self.metrics().inc_counter(
                            metrics::REGION_REQUEST_FAILURE,
                            &[("reason", failed.reason.label())],
                            1,
                        );
                    }
                    let future = result.failed.iter().filter(|f| matches!(f.reason, FailReason::FromFuture(_))).count();
                    if future > 0 {
                        self.metrics().inc_counter(metrics::FUTURE_CHECKPOINTS, &[("source", "poll")], future as u64);
                    }
                    for error in &result.store_errors {
                        log::warn!("task {}: {error}", plan.task);
                    }
                    for failed in result.failed.iter().filter_map(|f| f.store) {
                        self.metrics().inc_counter(metrics::STORE_RPC_ERRORS, &[("store", &failed.to_string())], 1);
                    }
                    self.shared
                        .advancer
                        .lock()
                        .on_poll_result(&plan.task, result.advanced.iter().map(|(r, ts)| (r, *ts)));
                }
                Err(e) => log::warn!("polling task {} failed: {e}", plan.task),
            }
            self.metrics().observe(metrics::TICK_DURATION, &[("step", "try-advance")], poll_started.elapsed());
        }
    }

    fn apply(&mut self, actions: Vec<Action>, now: Ts) {
        for action in actions {
            match action {
                Action::Upload { task, ts } => {
                    let Some(fence) = self.leadership.as_ref().map(Leadership::fence) else { return };
                    match self.ext.upload_global_checkpoint(&task, ts, Some(fence)) {
                        Ok(UploadOutcome::Fenced) => {
                            log::warn!("upload of task {task} fenced off: another advancer owns the tasks now");
                            self.lose_ownership();
                            return;
                        }
                        Ok(outcome) => {
                            if let UploadOutcome::KeptHigher { stored } = outcome {
                                log::warn!("skipping upload global checkpoint of task {task}: stored {stored} > {ts}");
                            }
                            self.metrics().set_gauge(metrics::LAST_CHECKPOINT, &[("task", &task)], ts as f64);
                            // The storage gets what etcd holds, unless that is from the future.
                            match outcome {
                                UploadOutcome::KeptHigher { stored } if stored > latest_believable(now) => {}
                                UploadOutcome::KeptHigher { stored } => self.storage.stage(&task, stored),
                                _ => self.storage.stage(&task, ts),
                            }
                            let pause = self.shared.advancer.lock().on_uploaded(&task, outcome, now);
                            if let Some(pause) = pause {
                                self.apply(vec![pause], now);
                            }
                        }
                        Err(e) => log::warn!("failed to upload global checkpoint of task {task}: {e}"),
                    }
                }
                Action::BlockGc { safe_point } => match self.meta.block_gc_until(safe_point) {
                    Ok(_) => log::debug!("updated log backup GC safe point to {safe_point}"),
                    Err(e) => log::warn!("failed to update service GC safe point to {safe_point}: {e}"),
                },
                Action::UnblockGc => {
                    if let Err(e) = self.meta.unblock_gc() {
                        log::warn!("failed to remove service GC safepoint: {e}");
                    }
                }
                Action::Pause { task, pause } => {
                    if let Err(e) = self.ext.pause_task(&task, &pause) {
                        log::warn!("failed to pause task {task}: {e}");
                    }
                }
            }
        }
    }

    /// Refreshes the snapshot `/status` and the handle read, and the lag gauges.
    fn publish(&self, now: Option<Ts>) {
        let now = now.unwrap_or_else(local_now_ts);
        let statuses = self.shared.advancer.lock().status();
        let views = statuses
            .into_iter()
            .map(|s| {
                let lag = ts_distance(now, s.uploaded.unwrap_or(s.checkpoint));
                self.metrics().set_gauge(metrics::CHECKPOINT_LAG, &[("task", &s.name)], lag.as_secs_f64());
                let slowest = s.slowest.as_ref().map(|(range, ts)| RegionHint {
                    range: range.to_string(),
                    ts: *ts,
                    region: self.region_at(&range.start),
                });
                TaskView {
                    name: s.name,
                    checkpoint: s.checkpoint,
                    checkpoint_time: format_rfc3339(system_time_of(s.checkpoint)),
                    uploaded: s.uploaded,
                    lag_seconds: lag.as_secs(),
                    paused: s.paused,
                    slowest,
                }
            })
            .collect();
        *self.shared.tasks.lock() = views;
    }

    /// The region holding `key`, for the status page (best effort, one short PD call).
    fn region_at(&self, key: &[u8]) -> Option<super::RegionView> {
        if !self.shared.owner.load(Ordering::SeqCst) {
            return None;
        }
        let mut end = key.to_vec();
        end.push(0);
        let region = self.meta.region_scan(key, &end, 1).ok()?.into_iter().next()?;
        Some(super::RegionView {
            id: region.id,
            leader_store: region.leader_store,
            epoch_version: region.epoch_version,
        })
    }
}

/// Keeps a rayon pool for the per-store fan-out small: two threads per core at most.
pub fn fan_out_pool() -> rayon::ThreadPool {
    let threads = std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(4).clamp(4, 32);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("advancer-fanout-{i}"))
        .build()
        .expect("building the fan-out pool")
}
