//! `CheckpointAdvancer`: the core plus the I/O of a tick, driven by its caller (upstream's
//! `CheckpointAdvancer` in `br/pkg/streamhelper/advancer.go`). A host program calls
//! [`CheckpointAdvancer::on_start`], [`CheckpointAdvancer::on_become_owner`] and
//! [`CheckpointAdvancer::on_tick`] on a thread of its own; the daemon's ticker is one such
//! caller. Everything it touches goes through the three traits of [`Env`], so each effect of
//! a tick is unit-tested with in-memory fakes (`daemon/tests.rs`).
//!
//! A tick while owner: TSO → subscriptions → poll lagging spans → task events that came
//! meanwhile → the core decides → upload (fenced by the owner term) / pause / GC safepoint.
//! Every PD and TiKV call of a tick shares one deadline, the tick interval from its start,
//! and one interrupt, [`CheckpointAdvancer::tick_interrupt`] ([`deadline`]): what they cut
//! short counts as failed (a range not polled keeps its old value), and the uploads, to
//! etcd, still run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, Receiver, Sender};

use super::memory;
use super::metrics::Metrics;
use crate::advancer::{latest_believable, Action, Advancer, Config, PollPlan, TaskStatus};
use crate::cluster::deadline::{self, Scope};
use crate::cluster::{
    collect_checkpoints, collect_checkpoints_cached, most_lagging_within, plan_listing, ClusterMeta, CollectResult,
    CollectorConfig, FailReason, FailedRange, FlushBatch, FlushSubscriber, KvClients, LogBackupService, RegionCache,
    RegionWarmup, RegionWithLeader, SubscriberConfig, WarmupConfig,
};
use crate::error::{Error, Result};
use crate::etcd::Leadership;
use crate::locks::{LockResolver, ResolverSettings};
use crate::meta::{Fence, MetaStore, TaskEvent, TaskWatcher, UploadOutcome};
use crate::spans::collapse;
use crate::storage::CheckpointCopier;
use crate::timefmt::format_duration;
use crate::types::{local_now_ts, ts_add, ts_distance, ts_sub, KeyRange, RegionId, StoreId, Ts};
use crate::worker::Interrupt;

/// Flush events kept for one merge at most (~70 bytes each as decoded batches, ~37 MB in
/// all): a 2 s tick's worth at 10^6 regions flushing every 5 s.
const MAX_PENDING_FLUSH_EVENTS: usize = 1 << 19;

/// How much further than the elapsed time PD's clock may move between two readings before
/// it counts as a jump.
const CLOCK_JUMP_MARGIN: Duration = Duration::from_secs(30);
/// What a tick keeps for its writes at most (a fifth of the interval below 5 s): polls that
/// run out of time, a hung store's or a poll too big for one tick, would otherwise leave
/// the GC safepoint update, a PD call after them, with no time at all.
const WRITES_RESERVE: Duration = Duration::from_secs(1);

/// What the advancer talks to (upstream's `Env`): region and store metadata, the stores'
/// log-backup service, their transactional service (lock resolution, upstream's
/// `GCLockResolver`) and the metadata store.
#[derive(Clone)]
pub struct Env {
    pub cluster: Arc<dyn ClusterMeta>,
    pub service: Arc<dyn LogBackupService>,
    pub kv: Arc<dyn KvClients>,
    pub meta: Arc<dyn MetaStore>,
}

pub struct CheckpointAdvancer {
    env: Env,
    core: Advancer,
    pool: rayon::ThreadPool,
    metrics: Arc<Metrics>,
    task_tx: Sender<TaskEvent>,
    task_rx: Receiver<TaskEvent>,
    listener: Option<TaskWatcher>,
    /// The owner term uploads are fenced by; `None` while standing by.
    owner: Option<Leadership>,
    subscriber: Option<FlushSubscriber>,
    /// PD's last TSO and when it came, to bound flush events between ticks.
    last_tso: Option<(Ts, Instant)>,
    /// Stores already reported for flushing from the future (logged once each).
    future_stores: HashSet<StoreId>,
    /// Flush batches received since the frontiers last took them in, each with the latest
    /// ts believable when it came (see [`CheckpointAdvancer::on_flush_events`]).
    pending_flushes: Vec<(FlushBatch, Ts)>,
    /// Their events, counted against [`MAX_PENDING_FLUSH_EVENTS`].
    pending_flush_events: usize,
    /// Copies each uploaded checkpoint into the task's external storage.
    storage: CheckpointCopier,
    /// Resolves locks on stuck tasks' lagging ranges on its own thread.
    locks: LockResolver,
    /// The regions polls saw, so that a poll asks PD only about regions not seen or failed;
    /// kept while owner.
    regions: RegionCache,
    /// Lists the tasks' ranges into `regions` in the background (`cluster::warmup`).
    warmup: Option<RegionWarmup>,
    /// Set on becoming owner: the first tick may poll only what the flush snapshots left
    /// lagging, and then what it left uncached of every task's ranges is warmed up.
    warm_up_after_first_tick: bool,
    /// How many regions a tick polls, learnt from the polls before.
    poll_budget: PollBudget,
    /// The regions that failed in each task's last poll: a blocker is shown with its reason.
    last_failures: HashMap<String, Vec<FailedRange>>,
    /// The subscription failure reported every tick while it lasts: logged once.
    subscription_warning: RepeatedWarning,
    /// Every store whose subscription failed since they last were all healthy.
    subscription_failures: FailingStores,
    tso_warning: RepeatedWarning,
    gc_warning: RepeatedWarning,
    poll_warning: RepeatedWarning,
    /// Lag pauses whose write failed, by task, and how often in a row: retried every tick,
    /// warned about once, summarised when written.
    failed_pauses: BTreeMap<String, u64>,
    /// Ends the PD and TiKV waits of the tick in flight, and of every later one.
    interrupt: Interrupt,
    /// Told of a deletion as it is applied, which may be mid-tick: the daemon's published
    /// status drops the task then, with its gauges, not after the tick's writes.
    on_task_removed: Option<TaskRemovedHook>,
}

/// Called with the name of a task whose deletion was just applied.
pub(crate) type TaskRemovedHook = Box<dyn Fn(&str) + Send + Sync>;

impl CheckpointAdvancer {
    /// An advancer with the default configuration, standing by with no task.
    pub fn new(env: Env) -> Result<Self> {
        Self::with_config(env, Config::default())
    }

    /// An advancer standing by with no task; its worker threads start here.
    pub fn with_config(env: Env, config: Config) -> Result<Self> {
        config.validate()?;
        let (task_tx, task_rx) = crossbeam_channel::bounded(1024);
        let metrics = Arc::new(Metrics::default());
        let storage = {
            let metrics = metrics.clone();
            CheckpointCopier::start(move |task, outcome| outcome.record(&metrics, task))?
        };
        let resolver_settings = ResolverSettings { rpc_timeout: config.rpc_timeout, ..ResolverSettings::default() };
        let locks = LockResolver::start(env.cluster.clone(), env.kv.clone(), resolver_settings)?;
        Ok(CheckpointAdvancer {
            env,
            core: Advancer::new(config),
            pool: fan_out_pool()?,
            metrics,
            storage,
            locks,
            task_tx,
            task_rx,
            listener: None,
            owner: None,
            subscriber: None,
            last_tso: None,
            future_stores: HashSet::new(),
            pending_flushes: Vec::new(),
            pending_flush_events: 0,
            regions: RegionCache::default(),
            warmup: None,
            warm_up_after_first_tick: false,
            poll_budget: PollBudget::default(),
            last_failures: HashMap::new(),
            subscription_warning: RepeatedWarning::default(),
            subscription_failures: FailingStores::default(),
            tso_warning: RepeatedWarning::default(),
            gc_warning: RepeatedWarning::default(),
            poll_warning: RepeatedWarning::default(),
            failed_pauses: BTreeMap::new(),
            interrupt: Interrupt::default(),
            on_task_removed: None,
        })
    }

    pub(crate) fn set_on_task_removed(&mut self, hook: TaskRemovedHook) {
        self.on_task_removed = Some(hook);
    }

    pub fn config(&self) -> &Config {
        self.core.config()
    }

    /// Replaces the configuration; it takes effect at the next tick.
    pub fn update_config(&mut self, config: Config) -> Result<()> {
        config.validate()?;
        self.core.update_config(config);
        Ok(())
    }

    pub fn update_config_with(&mut self, f: impl FnOnce(&mut Config)) -> Result<()> {
        let mut config = self.config().clone();
        f(&mut config);
        self.update_config(config)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn is_owner(&self) -> bool {
        self.owner.is_some()
    }

    /// For shutting down from another thread: fired, it ends at once every PD and TiKV wait
    /// of the tick in flight and of later ones (their work counts as failed), so the thread
    /// ticking is free to see its stop. Uploads to etcd are not affected.
    pub fn tick_interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    /// What bounds a tick's PD and TiKV calls: the tick interval from now, and the interrupt.
    fn tick_scope(&self) -> Scope {
        Scope { deadline: Some(Instant::now() + self.config().tick_interval), interrupt: Some(self.interrupt.clone()) }
    }

    /// Starts the task listener (upstream's `OnStart` and `StartTaskListener`): task events
    /// arrive on [`CheckpointAdvancer::task_events`] and are applied by
    /// [`CheckpointAdvancer::on_task_event`], or at the start of the next tick.
    pub fn on_start(&mut self) -> Result<()> {
        self.listener = Some(self.env.meta.begin(self.task_tx.clone(), self.config().backoff)?);
        Ok(())
    }

    /// For `select!`: the task events not applied yet.
    pub fn task_events(&self) -> &Receiver<TaskEvent> {
        &self.task_rx
    }

    /// For `select!`: the flush events of the subscriptions (none while standing by).
    pub fn flush_events(&self) -> Receiver<FlushBatch> {
        self.subscriber.as_ref().map(|s| s.events().clone()).unwrap_or_else(never)
    }

    fn stored_checkpoint(&self, task: &str, incarnation: i64) -> Ts {
        self.env.meta.global_checkpoint(task, incarnation).unwrap_or_else(|e| {
            log::warn!("failed to get the global checkpoint of task {task}, using its start ts: {e}");
            0
        })
    }

    pub fn on_task_event(&mut self, event: TaskEvent) {
        log::info!("meet task event {event}");
        // Flushes that came before the event are the old task's, never a new one's.
        self.merge_received_flushes();
        match event {
            TaskEvent::Add { info, incarnation, ranges, paused } => {
                let stored = self.stored_checkpoint(info.get_name(), incarnation);
                self.storage.register(info.get_name(), info.get_storage());
                self.core.add_task(info, incarnation, &ranges, paused, stored);
            }
            TaskEvent::Del { name } => {
                self.core.remove_task(&name);
                if let Some(removed) = &self.on_task_removed {
                    removed(&name);
                }
                // Forgotten first, so that no late write brings the storage gauge back.
                self.storage.forget(&name);
                self.metrics.external_storage_checkpoint.remove([&name]);
                self.metrics.last_checkpoint.remove([&name]);
                self.metrics.checkpoint_lag.remove([&name]);
                self.metrics.task_blocker.remove_prefixed(&name);
                self.last_failures.remove(&name);
            }
            TaskEvent::Pause { name } => self.core.set_paused(&name, true),
            TaskEvent::Resume { name } => {
                let Some(incarnation) = self.core.incarnation(&name) else { return };
                let stored = self.stored_checkpoint(&name, incarnation);
                self.core.resume_task(&name, stored);
            }
            TaskEvent::Err { name, error } => {
                log::warn!("task listener: {}{error}", name.map(|n| format!("task {n}: ")).unwrap_or_default());
            }
        }
    }

    /// One store's flushed ranges from its subscription. Events above the current time are
    /// dropped, counted and logged once per store. The rest wait for the next tick (or task
    /// event) to reach the frontiers, all batches as one merge: a merge that raises a large
    /// share of a frontier's pieces orders its heap once instead of at every raise (at 10^6
    /// regions most of the advancer's CPU). They are merged at once past
    /// [`MAX_PENDING_FLUSH_EVENTS`]. Nothing reads a frontier in between but `status`, which
    /// may then show an older (lower) value.
    pub fn on_flush_events(&mut self, batch: FlushBatch) {
        let now = self.estimated_now();
        let latest = latest_believable(now);
        let refused = batch.count_above(latest);
        if refused > 0 {
            self.metrics.future_checkpoints.inc_by(["flush"], refused as u64);
            let store = batch.store;
            if self.future_stores.insert(store) {
                let max = batch.iter().map(|(_, _, ts)| ts).max().unwrap_or_default();
                log::warn!(
                    "store {store} sent {refused} flush events above the current time {now} (up to {max}); they are \
                     ignored, and so are later ones (counted in streamhelper_future_checkpoints_total)"
                );
            }
        }
        self.pending_flush_events += batch.len();
        self.pending_flushes.push((batch, latest));
        if self.pending_flush_events >= MAX_PENDING_FLUSH_EVENTS {
            self.merge_received_flushes();
        }
    }

    /// Merges every kept flush batch into the frontiers, as one batch per task (the next
    /// tick does it anyway; a caller that times ticks calls it first).
    pub fn merge_received_flushes(&mut self) {
        if self.pending_flushes.is_empty() {
            return;
        }
        let believable = self
            .pending_flushes
            .iter()
            .flat_map(|(batch, latest)| batch.iter().filter(move |&(_, _, ts)| ts <= *latest));
        self.core.merge_flushes(believable, self.pending_flush_events);
        self.pending_flushes.clear();
        // A tick's flushes at 10^5 regions and more are tens of MB of batches, freed here:
        // given back after a burst (a new owner's snapshots), not after every tick.
        if self.pending_flush_events >= memory::TRIM_AFTER_REGIONS {
            memory::give_back_freed_memory_unless_within(memory::FLUSH_TRIM_INTERVAL);
        }
        self.pending_flush_events = 0;
    }

    /// PD's time as last seen plus the time since; the local clock before PD answered.
    fn estimated_now(&self) -> Ts {
        match self.last_tso {
            Some((tso, at)) => ts_add(tso, at.elapsed()),
            None => local_now_ts(),
        }
    }

    /// Ownership gained: uploads are fenced by `leadership` from now on, and the flush
    /// subscriptions open.
    pub fn on_become_owner(&mut self, leadership: Leadership) {
        self.owner = Some(leadership);
        self.core.forget_gc_release();
        self.metrics.owner.set([], 1.0);
        let mut subscriber =
            FlushSubscriber::new(self.env.cluster.clone(), self.env.service.clone(), SubscriberConfig::default());
        if let Err(e) = self.tick_scope().run(|| subscriber.update_store_topology()) {
            log::warn!("Error when updating store topology: {e}");
        }
        self.subscriber = Some(subscriber);
        self.warm_up_after_first_tick = true;
        log::info!("became owner: ticking every {:?}", self.config().tick_interval);
    }

    /// The stores whose flush subscription is up (or still connecting).
    pub fn subscriptions_up(&self) -> Vec<StoreId> {
        let states = self.subscriber.as_ref().map(|s| s.store_states()).unwrap_or_default();
        states.into_iter().filter(|&(_, up)| up).map(|(store, _)| store).collect()
    }

    /// For `select!`: the pages of the region-cache warm-up; disconnected when it is done.
    pub fn region_pages(&self) -> Receiver<Vec<RegionWithLeader>> {
        self.warmup.as_ref().map(|w| w.pages().clone()).unwrap_or_else(never)
    }

    /// One page of the warm-up into the region cache (PD's answer is newer than what the
    /// cache holds, but for what a tick in between looked up again: such a region fails its
    /// next poll on its epoch and is looked up once more); `None`: the warm-up is over.
    pub fn on_region_page(&mut self, page: Option<Vec<RegionWithLeader>>) {
        match page {
            Some(page) => self.regions.insert(&page),
            None => self.warmup = None,
        }
    }

    /// Ownership lost (or given up): uploads stop at once and the subscriber's threads are
    /// joined.
    pub fn on_lose_owner(&mut self) {
        if self.owner.take().is_some() {
            log::info!("no longer owner: uploads stop");
        }
        self.subscriber = None;
        self.warmup = None;
        self.warm_up_after_first_tick = false;
        self.regions = RegionCache::default();
        self.poll_budget = PollBudget::default();
        self.storage.clear();
        self.last_failures.clear();
        // A standby's values would go stale next to the new owner's (upstream resets too).
        let m = &self.metrics;
        m.owner.set([], 0.0);
        for gauge in [&m.last_checkpoint, &m.checkpoint_lag, &m.external_storage_checkpoint, &m.subscription_up] {
            gauge.clear();
        }
        m.last_region_id.clear();
        m.last_region_leader_store_id.clear();
        m.task_blocker.clear();
    }

    pub fn status(&self) -> Vec<TaskStatus> {
        self.core.status()
    }

    /// Applies pending task and flush events, then, while owner, runs one tick and returns
    /// the `now` it used. It returns only after the tick's writes are done; its PD and TiKV
    /// calls end by the tick interval from its start.
    pub fn on_tick(&mut self) -> Option<Ts> {
        self.apply_pending_events();
        self.owner.as_ref()?;
        Some(self.tick_scope().run(|| self.tick()))
    }

    fn tick(&mut self) -> Ts {
        let metrics = self.metrics.clone();
        let _timer = metrics.tick_duration.start_timer(["tick"]);
        let now = self.now();
        self.refresh_subscriptions();
        let plans = self.planned_polls(now);
        let reserve = (self.config().tick_interval / 5).min(WRITES_RESERVE);
        let polls_due = Scope::current().deadline.map(|due| due - reserve);
        let poll = deadline::within(polls_due, || self.poll_lagging(&plans, now));
        self.poll_budget.after_poll(&poll);
        // A tick with nothing to poll says nothing of the stores.
        if poll.asked > 0 {
            self.warn_repeated(Warning::Poll, poll.store_warning());
        }
        // A deletion (or pause) that came while PD or the stores were slow applies before
        // this tick decides what to write.
        self.apply_pending_events();
        let actions = self.core.finish_tick(now);
        self.apply(actions, now);
        self.show_blockers(now);
        // Starts a round for tasks stuck past the resolve interval; never waits for one.
        self.locks.after_tick(now, &mut self.core, &self.regions, &self.metrics);
        // After the GC step, as upstream; the writes run on the copier's thread.
        self.storage.submit(self.core.config().tick_interval);
        self.warm_up_region_cache();
        now
    }

    /// Starts listing into the region cache, unless a listing is under way: after a new
    /// owner's first tick, what of every running task's ranges that tick left uncached (it
    /// may have polled only what the flush snapshots left lagging, so listed next to
    /// nothing; a walk of the cache, once per ownership); at later ticks, the ranges of tasks
    /// no cached region overlaps (a task added since; a cheap check).
    fn warm_up_region_cache(&mut self) {
        let first_tick = std::mem::take(&mut self.warm_up_after_first_tick);
        if self.warmup.is_some() {
            return;
        }
        let regions = &self.regions;
        let ranges: Vec<KeyRange> = self
            .core
            .running_ranges()
            .filter(|(_, ranges)| first_tick || !ranges.iter().any(|range| regions.holds_region_in(range)))
            .flat_map(|(_, ranges)| ranges.iter().cloned())
            .collect();
        let config = WarmupConfig::default();
        let (_, scans) = plan_listing(&self.regions, &collapse(&ranges), config.page_size, false);
        if scans.is_empty() {
            return;
        }
        log::info!("warming up the region cache: listing {} ranges from PD in the background", scans.len());
        match RegionWarmup::start(self.env.cluster.clone(), scans, config) {
            Ok(warmup) => self.warmup = Some(warmup),
            Err(e) => log::warn!("cannot warm up the region cache (polls list what they need): {e}"),
        }
    }

    /// Polls every running task's spans older than `threshold` and returns each task's
    /// frontier minimum: the checkpoint the next tick would move to (upstream's
    /// `CalculateGlobalCheckpointLight`). Uploads nothing.
    pub fn calculate_global_checkpoint_light(&mut self, threshold: Duration) -> Vec<(String, Ts)> {
        self.apply_pending_events();
        let now = self.now();
        let plans = self.core.plan_polls_below(ts_sub(now, threshold));
        self.poll_lagging(&plans, now);
        self.core.status().into_iter().filter(|s| !s.paused).filter_map(|s| Some((s.name, s.slowest?.1))).collect()
    }

    /// The last flushed ts of every region in `range`, as TiKV reports it now (upstream's
    /// `GetCheckpointInRange`).
    pub fn get_checkpoint_in_range(&mut self, range: &KeyRange) -> Result<CollectResult> {
        let now = self.now();
        let collector = self.collector_config(now);
        collect_checkpoints(
            self.env.cluster.as_ref(),
            self.env.service.as_ref(),
            &self.pool,
            std::slice::from_ref(range),
            &collector,
        )
    }

    fn apply_pending_events(&mut self) {
        while let Ok(event) = self.task_rx.try_recv() {
            self.on_task_event(event);
        }
        let flushes = self.flush_events();
        while let Ok(batch) = flushes.try_recv() {
            self.on_flush_events(batch);
        }
        self.merge_received_flushes();
        // A caller other than the ticker (which takes pages as they come) gets them here.
        if let Ok(page) = self.region_pages().try_recv() {
            self.on_region_page(Some(page));
        }
    }

    /// PD's TSO, or the local clock when PD does not answer. A fallback reading, or a TSO
    /// further ahead than the time that passed since the last one (at the first, than the
    /// local clock), holds lag verdicts back: it would make a healthy task look lagging.
    fn now(&mut self) -> Ts {
        let expected = self.estimated_now();
        let now = match self.env.cluster.fetch_current_ts() {
            Ok(tso) => {
                self.warn_repeated(Warning::Tso, None);
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
                let warning = format!("PD TSO unavailable, using the local clock (no lag-limit pause meanwhile): {e}");
                self.warn_repeated(Warning::Tso, Some((String::new(), warning)));
                local_now_ts()
            }
        };
        self.core.hold_lag_verdicts(now);
        now
    }

    fn refresh_subscriptions(&mut self) {
        let Some(subscriber) = self.subscriber.as_mut() else { return };
        match subscriber.update_store_topology() {
            Ok(()) => {
                // Stores that left (or ids PD never listed) keep no metric series.
                let live: HashSet<String> = subscriber.stores().map(|s| s.to_string()).collect();
                self.metrics.store_failures.retain(|[store]| live.contains(store));
                self.metrics.subscription_up.retain(|[store]| live.contains(store));
                self.metrics.region_checkpoint_event.retain(|[store]| live.contains(store));
            }
            Err(e) => log::warn!("Error when updating store topology: {e}"),
        }
        subscriber.handle_errors();
        for (store, up) in subscriber.store_states() {
            self.metrics.subscription_up.set([&store.to_string()], if up { 1.0 } else { 0.0 });
        }
        for (store, sizes) in subscriber.take_message_sizes() {
            let store = store.to_string();
            for size in sizes {
                self.metrics.region_checkpoint_event.observe_value([&store], size as f64);
            }
        }
        let pending = subscriber.pending_errors();
        let failing = self.subscription_failures.observe(subscriber.store_errors().iter().map(|(store, _)| *store));
        let warning =
            pending.as_ref().map(|e| (failing, format!("Subscriber meet error, would polling the checkpoint: {e}")));
        self.core.set_subscriptions_healthy(pending.is_none());
        self.warn_repeated(Warning::Subscription, warning);
    }

    /// Answers above `latest_believable(now)` fail their region instead of advancing it.
    fn collector_config(&self, now: Ts) -> CollectorConfig {
        let config = self.config();
        CollectorConfig {
            rpc_timeout: config.rpc_timeout.min(config.tick_interval),
            max_ts: latest_believable(now),
            ..CollectorConfig::default()
        }
    }

    /// What this tick polls: every span older than the poll threshold, or, when the polls
    /// before showed that they do not all fit in a tick, the most lagging of them across
    /// tasks, as many regions as the budget allows.
    pub(super) fn planned_polls(&self, now: Ts) -> Vec<PollPlan> {
        let below = self.core.poll_below(now);
        let plans = self.core.plan_polls_below(below);
        // A budget over every region cached limits nothing known, and choosing the most lagging
        // costs a cache look-up per span: at 10^5 regions on a loaded machine that took the
        // tick's whole time before any poll, tick after tick.
        let Some(budget) = self.poll_budget.regions.filter(|&budget| budget < self.regions.len()) else {
            return plans;
        };
        let mut lagging: Vec<(String, Vec<(KeyRange, Ts)>)> = plans
            .into_iter()
            .map(|plan| {
                // Each span holds a region at least: no more spans than that can fit.
                let spans = self.core.oldest_spans(&plan.task, below, budget);
                (plan.task, spans)
            })
            .collect();
        // The task lagging most goes first.
        lagging.sort_by_key(|(_, spans)| spans.iter().map(|(_, ts)| *ts).min());
        let mut left = budget;
        let mut planned = Vec::new();
        for (task, spans) in lagging {
            if left == 0 {
                break;
            }
            let (taken, known) = most_lagging_within(&self.regions, spans, left);
            left = left.saturating_sub(known.len().max(taken.len()));
            let ranges: Vec<KeyRange> = taken.into_iter().map(|(range, _)| range).collect();
            planned.push(PollPlan { task, ranges: collapse(&ranges) });
        }
        planned
    }

    /// Polls the planned spans by the tick's deadline: one hung store costs one RPC
    /// deadline, not the tick, and a task not polled in time waits for the next tick.
    fn poll_lagging(&mut self, plans: &[PollPlan], now: Ts) -> PollSummary {
        let mut summary = PollSummary::default();
        let collector = self.collector_config(now);
        for (i, plan) in plans.iter().enumerate() {
            if deadline::passed() {
                log::warn!("tick interval used up; polling of task {} waits for the next tick", plan.task);
                summary.never_started = i == 0;
                break;
            }
            let metrics = self.metrics.clone();
            let _timer = metrics.tick_duration.start_timer(["try-advance"]);
            let result = collect_checkpoints_cached(
                self.env.cluster.as_ref(),
                self.env.service.as_ref(),
                &self.pool,
                &mut self.regions,
                &plan.ranges,
                &collector,
            );
            self.count_poll(&result);
            summary.asked += result.advanced.len() + result.failed.len();
            summary.answered += result.advanced.len();
            summary.out_of_time |= !result.out_of_time.is_empty();
            summary.cut_short |= result.unlisted.is_some();
            let failures = result.failed.iter().filter(|f| f.region.is_some()).cloned().collect();
            self.last_failures.insert(plan.task.clone(), failures);
            summary.failing_stores.extend(&result.failed_stores);
            if summary.first_store_error.is_none() {
                summary.first_store_error = result.store_errors.first().map(|e| format!("task {}: {e}", plan.task));
            }
            if let Some(e) = &result.unlisted {
                // What was listed before still counts: at 10^6 regions a cold start's listing
                // may take more than one tick, and each tick merges what it got.
                log::warn!(
                    "polling task {} stopped part way ({} regions answered): {e}",
                    plan.task,
                    result.advanced.len()
                );
            }
            self.core.on_poll_result(&plan.task, result.advanced.iter().map(|(r, ts)| (r, *ts)));
        }
        if summary.asked >= memory::TRIM_AFTER_REGIONS {
            memory::give_back_freed_memory();
        }
        summary
    }

    fn count_poll(&self, result: &CollectResult) {
        let m = &self.metrics;
        for &size in &result.batch_sizes {
            m.batch_size.observe_value(["checkpoint"], size as f64);
        }
        for &scan in &result.range_scans {
            m.tick_duration.observe(["get-regions-in-range"], scan);
        }
        m.regions_polled.inc_by([], (result.advanced.len() + result.failed.len()) as u64);
        m.region_request.inc_by(["success"], result.advanced.len() as u64);
        m.region_request.inc_by(["fail"], result.failed.len() as u64);
        let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut failed_stores = BTreeSet::new();
        for failed in &result.failed {
            *reasons.entry(failed.reason.label()).or_default() += 1;
            if failed.reason == FailReason::StoreFailed {
                failed_stores.extend(failed.store);
            }
        }
        if let Some(&future) = reasons.get(FailReason::FromFuture(0).label()) {
            m.future_checkpoints.inc_by(["poll"], future);
        }
        for (reason, regions) in reasons {
            m.region_request_failure.inc_by([reason], regions);
        }
        for store in failed_stores {
            m.store_failures.inc_by([&store.to_string()], 1);
        }
    }

    /// Shows, per running task, the region its slowest span starts in, that region's leader
    /// store and why it lags (its failure in the task's last poll, else `slow-flush`); and,
    /// as upstream's region hint, the region of the most lagging task.
    fn show_blockers(&mut self, now: Ts) {
        let m = self.metrics.clone();
        let mut most_lagging: Option<(Ts, RegionId, StoreId)> = None;
        for status in self.core.status().into_iter().filter(|s| !s.paused) {
            m.task_blocker.remove_prefixed(&status.name);
            let Some((span, ts)) = status.slowest else { continue };
            let Some((region, store, reason)) = self.region_holding(&status.name, &span) else { continue };
            let lag = ts_distance(now, ts).as_secs_f64();
            m.task_blocker.set([&status.name, &region.to_string(), &store.to_string(), reason], lag);
            if most_lagging.map_or(true, |(lowest, ..)| ts < lowest) {
                most_lagging = Some((ts, region, store));
            }
        }
        if let Some((_, region, store)) = most_lagging {
            m.last_region_id.set([], region as f64);
            m.last_region_leader_store_id.set([], store as f64);
        }
    }

    /// The region `span` starts in, its leader store and why it lags: a region that failed in
    /// the task's last poll, else one earlier polls saw, else PD's answer within what is left
    /// of the tick (kept for the next ticks).
    fn region_holding(&mut self, task: &str, span: &KeyRange) -> Option<(RegionId, StoreId, &'static str)> {
        let failed = self.last_failures.get(task).and_then(|f| f.iter().find(|f| f.range.contains(&span.start)));
        if let Some(failed) = failed {
            return Some((failed.region?, failed.store.unwrap_or(0), failed.reason.label()));
        }
        let region = match self.regions.region_at(&span.start) {
            Some(region) => region,
            None => match self.env.cluster.region_scan(&span.start, &span.end, 1) {
                Ok(regions) => {
                    let region = regions.into_iter().next()?;
                    self.regions.insert(std::slice::from_ref(&region));
                    region
                }
                Err(e) => {
                    log::debug!("cannot find the region of task {task}'s slowest span {span}: {e}");
                    return None;
                }
            },
        };
        Some((region.id, region.leader_store.unwrap_or(0), "slow-flush"))
    }

    /// Carries out the core's actions in order. A fenced upload means another advancer owns
    /// the tasks: the rest of the list (the GC safepoint included) is dropped.
    fn apply(&mut self, actions: Vec<Action>, now: Ts) {
        for action in actions {
            if matches!(action, Action::BlockGc { .. } | Action::UnblockGc) {
                fail::fail_point!("before-gc-safepoint");
            }
            match action {
                Action::Upload { task, incarnation, ts } => {
                    if !self.upload(&task, incarnation, ts, now) {
                        return;
                    }
                }
                Action::BlockGc { safe_point } => match self.env.cluster.block_gc_until(safe_point) {
                    Ok(_) => {
                        log::debug!("updated log backup GC safe point to {safe_point}");
                        self.warn_repeated(Warning::Gc, None);
                    }
                    Err(e) => {
                        // The safepoint moves with the checkpoint: only the error makes the warning.
                        log::debug!("failed to update service GC safe point to {safe_point}");
                        let line = format!("failed to update service GC safe point: {e}");
                        self.warn_repeated(Warning::Gc, Some((String::new(), line)));
                    }
                },
                Action::UnblockGc => match self.env.cluster.unblock_gc() {
                    Ok(()) => {
                        log::info!("no task left: removed the log backup service GC safe point");
                        self.core.on_gc_released();
                    }
                    Err(e) => log::warn!("failed to remove service GC safepoint, retrying at the next tick: {e}"),
                },
                Action::Pause { task, incarnation, pause } => {
                    if !self.pause(&task, incarnation, &pause) {
                        return;
                    }
                }
            }
        }
    }

    /// Writes a lag pause; the core stops the task only once it is written (a failed write
    /// is asked for again at the next tick). False when we are no longer the owner.
    fn pause(&mut self, task: &str, incarnation: i64, pause: &crate::meta::PauseV2) -> bool {
        let Some(owner) = self.owner.clone() else { return false };
        fail::fail_point!("before-pause-write");
        let outcome = self.env.meta.pause_task(task, pause, &Fence::owner_of(owner, incarnation));
        let failures = self.failed_pauses.remove(task).unwrap_or(0);
        match outcome {
            Ok(UploadOutcome::Fenced) => {
                log::warn!("pause of task {task} fenced off: another advancer owns the tasks now");
                self.on_lose_owner();
                return false;
            }
            Ok(UploadOutcome::TaskGone) => {
                log::info!("task {task} was deleted or re-created before its pause was written: not paused")
            }
            Ok(_) => {
                if failures > 0 {
                    log::info!("task {task} paused after {failures} failed attempts");
                }
                self.core.on_paused(task, incarnation);
            }
            Err(e) => {
                if failures == 0 {
                    log::warn!("failed to pause task {task}, retrying every tick: {e}");
                }
                self.failed_pauses.insert(task.to_string(), failures + 1);
            }
        }
        true
    }

    /// Uploads one checkpoint of one incarnation of the task and hands the outcome to the
    /// core (which may pause the task for lag). False when we are no longer the owner.
    fn upload(&mut self, task: &str, incarnation: i64, ts: Ts, now: Ts) -> bool {
        let Some(owner) = self.owner.clone() else { return false };
        // A task event (a deletion, a re-creation) may land here: the incarnation fence
        // makes the write miss rather than resurrect the task's keys.
        fail::fail_point!("before-upload-checkpoint");
        let fence = Fence::owner_of(owner, incarnation);
        let outcome = match self.env.meta.upload_global_checkpoint(task, ts, &fence) {
            Ok(outcome) => outcome,
            Err(e) => {
                log::warn!("failed to upload global checkpoint of task {task}: {e}");
                self.metrics.upload_failures.inc_by([task], 1);
                return true;
            }
        };
        let stored = match outcome {
            UploadOutcome::Fenced => {
                log::warn!("upload of task {task} fenced off: another advancer owns the tasks now");
                self.on_lose_owner();
                return false;
            }
            UploadOutcome::TaskGone => {
                log::info!("task {task} was deleted or re-created while its upload was in flight: nothing written");
                return true;
            }
            UploadOutcome::Written => ts,
            UploadOutcome::KeptHigher { stored } => {
                log::warn!("skipping upload global checkpoint of task {task}: stored {stored} > {ts}");
                stored
            }
        };
        self.metrics.last_checkpoint.set([task], stored as f64);
        // The storage gets what etcd holds, unless that is from the future.
        match outcome {
            UploadOutcome::KeptHigher { stored } if stored > latest_believable(now) => {}
            _ => self.storage.stage(task, stored),
        }
        if let Some(pause) = self.core.on_uploaded(task, outcome, now) {
            self.apply(vec![pause], now);
        }
        true
    }
}

/// What a tick's polls asked and got, for the next tick's budget.
#[derive(Debug, Default)]
pub(crate) struct PollSummary {
    pub asked: usize,
    pub answered: usize,
    /// Some store ran out of time.
    pub out_of_time: bool,
    /// Some listing of regions was cut short (PD, not the stores, ran out of time).
    pub cut_short: bool,
    /// The tick's time was gone before the first poll could begin.
    pub never_started: bool,
    /// The stores that failed to answer, and the first such failure.
    pub failing_stores: BTreeSet<StoreId>,
    pub first_store_error: Option<String>,
}

impl PollSummary {
    /// The failing stores as a repeated warning: a store out of time fails every poll, and
    /// a line for each (the collector's and the advancer's) made two a tick per store.
    fn store_warning(&self) -> Option<(String, String)> {
        let first = self.first_store_error.as_ref()?;
        let stores = &self.failing_stores;
        Some((format!("{stores:?}"), format!("stores {stores:?} failed to report checkpoints, the first: {first}")))
    }

    /// Most of what was asked ran out of time.
    fn outgrew_its_tick(&self) -> bool {
        self.out_of_time && self.answered * 2 < self.asked
    }
}

/// A tick may always poll this many regions, most lagging first.
pub(crate) const MIN_POLL_REGIONS: usize = 1024;

/// How many regions a tick polls: all that lag, until a poll of more than
/// [`MIN_POLL_REGIONS`] outgrows its tick (most of what it asked ran out of time: 10^6
/// regions in a 2 s tick, or a starved machine); then half of what such a poll asked, most
/// lagging first, halved again while polls outgrow it, doubled after each poll that did not
/// outgrow its tick while the budget held it back, and no limit again once a poll under it
/// kept up (or it covers every cached region); halved too by a tick whose time was gone
/// before its first poll began. Polling everything
/// every tick got nothing answered at 10^6 regions on a loaded machine, so the checkpoint
/// never moved. A poll whose region listing was cut short says PD was slow, not the stores:
/// it sets no limit. When every region lags together (they all flushed at once), a limit
/// below their number holds the checkpoint until it has doubled past it: set by a fault's
/// passing slow poll and kept, that cost the polling-only fault bench most of its lag.
#[derive(Debug, Default)]
pub(crate) struct PollBudget {
    /// `None`: no limit.
    pub regions: Option<usize>,
}

impl PollBudget {
    pub(crate) fn after_poll(&mut self, poll: &PollSummary) {
        if poll.never_started {
            // Choosing the most lagging costs a cache look-up per span: a budget whose choice
            // takes the whole tick lets no poll start, and so would never change.
            if let Some(regions) = self.regions {
                let halved = (regions / 2).max(MIN_POLL_REGIONS);
                log::debug!("no poll began in time: polling up to {halved} regions next");
                self.regions = Some(halved);
            }
            return;
        }
        if poll.outgrew_its_tick() {
            if poll.cut_short || poll.asked <= MIN_POLL_REGIONS {
                return;
            }
            // Halved: a stalled machine answers nothing whatever the size, and a budget that
            // fell to what one such poll got answered took ten polls to double back.
            let regions = (poll.asked / 2).max(MIN_POLL_REGIONS);
            let level = if self.regions.is_none() { log::Level::Info } else { log::Level::Debug };
            log::log!(
                level,
                "a poll of {} regions ran out of time with {} answered: the next polls ask about the {regions} most \
                 lagging regions, more while they keep up",
                poll.asked,
                poll.answered
            );
            self.regions = Some(regions);
        } else if let Some(regions) = self.regions.filter(|_| poll.asked > 0) {
            if poll.asked >= regions {
                log::debug!("a poll of {} regions kept up: polling up to {} next", poll.asked, regions * 2);
                self.regions = Some(regions.saturating_mul(2));
            } else {
                log::debug!("a poll of {} regions, all that lagged, kept up: no limit on the next polls", poll.asked);
                self.regions = None;
            }
        }
    }
}

/// Keeps the rayon pool for the per-store fan-out small: two threads per core at most.
fn fan_out_pool() -> Result<rayon::ThreadPool> {
    let threads = std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(4).clamp(4, 32);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("sh-fanout-{i}"))
        .build()
        .map_err(|e| Error::Io { what: "building the fan-out pool".into(), source: std::io::Error::other(e) })
}

/// The warnings a failing peer would otherwise repeat every tick.
enum Warning {
    Subscription,
    Tso,
    Gc,
    Poll,
}

impl CheckpointAdvancer {
    /// `warning` as (what stays the same while it repeats, the line to log).
    fn warn_repeated(&mut self, which: Warning, warning: Option<(String, String)>) {
        let slot = match which {
            Warning::Subscription => &mut self.subscription_warning,
            Warning::Tso => &mut self.tso_warning,
            Warning::Gc => &mut self.gc_warning,
            Warning::Poll => &mut self.poll_warning,
        };
        if let Some(line) = slot.observe(warning) {
            log::warn!("{line}");
        }
    }
}

/// The stores whose subscriptions failed since they last were all healthy, as the key of
/// the repeated subscription warning: streams retrying drop out of the failing set and come
/// back tick after tick (19 and 20 of 20 stores while a sim streams nothing), which is not a
/// new warning; a store that starts failing is.
#[derive(Default)]
pub(crate) struct FailingStores(BTreeSet<StoreId>);

impl FailingStores {
    /// This tick's failing stores; returns the key (empty once none fails).
    pub(crate) fn observe(&mut self, failing: impl IntoIterator<Item = StoreId>) -> String {
        let failing: BTreeSet<StoreId> = failing.into_iter().collect();
        if failing.is_empty() {
            self.0.clear();
        }
        self.0.extend(failing);
        format!("{:?}", self.0)
    }
}

/// A warning that would repeat every tick: logged when it first appears, and when it changes
/// or ends with how many ticks it lasted. What counts as the same warning is its key (e.g.
/// which stores fail), so an error text that varies from tick to tick is not logged anew.
#[derive(Default)]
pub(crate) struct RepeatedWarning {
    /// Key, the line logged when it appeared, ticks seen.
    current: Option<(String, String, u64)>,
}

impl RepeatedWarning {
    /// This tick's warning as (key, line), `None` when all is well; returns the line to log,
    /// if any.
    pub(crate) fn observe(&mut self, warning: Option<(String, String)>) -> Option<String> {
        if let (Some((key, _, repeats)), Some((new_key, _))) = (&mut self.current, &warning) {
            if key == new_key {
                *repeats += 1;
                return None;
            }
        }
        let ended = self.current.take().map(|(_, old, repeats)| format!("{old} (seen in {repeats} ticks)"));
        self.current = warning.clone().map(|(key, line)| (key, line, 1));
        match (ended, warning) {
            (Some(ended), Some((_, new))) => Some(format!("{new}; before: {ended}")),
            (Some(ended), None) => Some(format!("resolved: {ended}")),
            (None, new) => new.map(|(_, line)| line),
        }
    }
}
