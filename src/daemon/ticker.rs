//! The ticker: the endpoint that owns the [`CheckpointAdvancer`]. Every input reaches it as
//! one [`Message`] (a task event, an owner change, a batch of flush events, a tick, or a
//! request from the handle), handled one at a time on this thread and timed under the
//! message's label, so no lock guards the advancer.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, tick, Receiver, Sender};

use super::checkpoint_advancer::CheckpointAdvancer;
use super::owner::OwnerEvent;
use super::{PublishedTask, Shared, SlowestSpan, TaskView};
use crate::advancer::Config;
use crate::cluster::{FlushBatch, RegionWithLeader, EVENTS_PER_MESSAGE};
use crate::error::Result;
use crate::meta::TaskEvent;
use crate::timefmt::format_rfc3339;
use crate::types::{local_now_ts, system_time_of, ts_distance, Ts};
use crate::worker::StopToken;

/// What a new owner waits, at most, for its stores' flush snapshots (never beyond one tick
/// interval), and for more once every store was heard from.
const SNAPSHOT_WAIT_LIMIT: Duration = Duration::from_secs(3);
const SNAPSHOT_QUIET_GAP: Duration = Duration::from_millis(200);
/// How often that wait checks which subscriptions are up.
const SUBSCRIPTION_CHECK: Duration = Duration::from_millis(50);

/// What the handle asks of the running advancer; each carries where the answer goes.
pub enum Request {
    UpdateConfig(Config, Sender<Result<()>>),
    Config(Sender<Config>),
}

/// One input of the endpoint.
enum Message {
    Task(TaskEvent),
    Owner(OwnerEvent),
    Flushes(FlushBatch),
    /// The kept flush batches merged into the frontiers, before a tick (not an input: the
    /// ticker sends it itself, so that the merge is timed apart from the tick).
    MergeFlushes,
    /// A page of the region-cache warm-up; `None` when it is over.
    RegionPage(Option<Vec<RegionWithLeader>>),
    Tick,
    Request(Request),
}

impl Message {
    /// The label its handling time is recorded under.
    fn label(&self) -> &'static str {
        match self {
            Message::Task(_) => "task-event",
            Message::Owner(_) => "owner-event",
            Message::Flushes(_) => "flush-events",
            Message::MergeFlushes => "flush-merge",
            Message::RegionPage(_) => "region-page",
            Message::Tick => "tick",
            Message::Request(Request::UpdateConfig(..)) => "update-config",
            Message::Request(Request::Config(_)) => "config",
        }
    }
}

pub struct Ticker {
    pub advancer: CheckpointAdvancer,
    pub shared: Arc<Shared>,
    pub owner: Receiver<OwnerEvent>,
    pub requests: Receiver<Request>,
    pub stop: StopToken,
}

impl Ticker {
    pub fn run(mut self) {
        let mut interval = self.advancer.config().tick_interval;
        let mut ticks = tick(interval);
        loop {
            let flushes = self.advancer.flush_events();
            let region_pages = self.advancer.region_pages();
            let message = crossbeam_channel::select! {
                recv(self.stop.receiver()) -> _ => break,
                recv(self.advancer.task_events()) -> event => match event {
                    Ok(event) => Message::Task(event),
                    Err(_) => break,
                },
                recv(self.owner) -> event => match event {
                    Ok(event) => Message::Owner(event),
                    Err(_) => break,
                },
                recv(flushes) -> batch => match batch {
                    Ok(batch) => Message::Flushes(batch),
                    Err(_) => continue,
                },
                recv(region_pages) -> page => Message::RegionPage(page.ok()),
                recv(ticks) -> _ => Message::Tick,
                recv(self.requests) -> request => match request {
                    Ok(request) => Message::Request(request),
                    Err(_) => break,
                },
            };
            if matches!(message, Message::Tick) {
                self.drain_flushes();
            }
            self.handle(message);
            // A new interval applies at once, not after the next tick.
            let configured = self.advancer.config().tick_interval;
            if configured != interval {
                interval = configured;
                ticks = tick(interval);
            }
        }
        self.advancer.on_lose_owner();
        self.shared.owner.store(false, Ordering::SeqCst);
    }

    fn handle(&mut self, message: Message) {
        let metrics = self.shared.metrics.clone();
        let _timer = metrics.message_duration.start_timer([message.label()]);
        let _cpu = metrics.message_cpu.start_cpu_timer([message.label()]);
        match message {
            Message::Task(event) => {
                self.advancer.on_task_event(event);
                self.publish(None);
            }
            Message::Owner(OwnerEvent::Gained(leadership)) => {
                self.advancer.on_become_owner(leadership);
                self.await_subscription_snapshots();
                // A new owner ticks at once: waiting for the interval delayed its first
                // upload by up to a whole tick (the scale bench's cold start).
                self.drain_flushes();
                self.tick();
            }
            Message::Owner(OwnerEvent::Lost { stood_down }) => {
                self.advancer.on_lose_owner();
                let _ = stood_down.send(());
                self.publish(None);
            }
            Message::Flushes(batch) => self.advancer.on_flush_events(batch),
            Message::MergeFlushes => self.advancer.merge_received_flushes(),
            Message::RegionPage(page) => self.advancer.on_region_page(page),
            Message::Tick => self.tick(),
            Message::Request(Request::UpdateConfig(config, reply)) => {
                let _ = reply.send(self.advancer.update_config(config));
            }
            Message::Request(Request::Config(reply)) => {
                let _ = reply.send(self.advancer.config().clone());
            }
        }
    }

    /// Takes the flush batches already queued, and merges every kept batch, as messages of
    /// their own, so that a tick's time and CPU are the tick's and not those of the flushes
    /// that came before it.
    fn drain_flushes(&mut self) {
        let flushes = self.advancer.flush_events();
        while let Ok(batch) = flushes.try_recv() {
            self.handle(Message::Flushes(batch));
        }
        self.handle(Message::MergeFlushes);
    }

    /// Right after subscribing, each store sends the checkpoints of its last flush (TiKV
    /// queues a snapshot for a new subscriber, wire-spec 4.2): a new owner takes them in
    /// before its first tick, which then polls only what they left lagging. Polling every
    /// region first took a whole tick at 10^6 regions (listing them from PD alone is over a
    /// CPU second) while the snapshots waited in the channel for the tick after. It waits
    /// until every store whose subscription is up sent a message less than full (the end of
    /// its snapshot), or sent something and 200 ms passed without a message (a snapshot of
    /// 10^6 regions is a thousand messages, and ones that happen to end full), 3 s and one
    /// tick interval at most: a store that never flushed sends nothing. It ends at once when
    /// no subscription is up (subscriptions off: the first tick polls every region, as
    /// before). Waiting for 200 ms of quiet alone ran to the bound at 10^6 regions, the
    /// stores' regular flushes arriving meanwhile.
    fn await_subscription_snapshots(&mut self) {
        let started = Instant::now();
        let limit = started + self.advancer.config().tick_interval.min(SNAPSHOT_WAIT_LIMIT);
        let flushes = self.advancer.flush_events();
        let (mut heard, mut ended) = (HashSet::new(), HashSet::new());
        let mut quiet_until = Instant::now();
        let mut events = 0;
        loop {
            let up = self.advancer.subscriptions_up();
            let now = Instant::now();
            let quiet = now >= quiet_until && up.iter().all(|s| heard.contains(s));
            let all_ended = up.iter().all(|s| ended.contains(s));
            if up.is_empty() || now >= limit || quiet || all_ended {
                let how = if up.is_empty() {
                    "no subscription up"
                } else if all_ended {
                    "every store's snapshot ended"
                } else if quiet {
                    "quiet"
                } else {
                    "time limit"
                };
                log::info!(
                    "took in {events} snapshot events from {} of {} subscribed stores in {:?} ({how})",
                    heard.len(),
                    up.len(),
                    started.elapsed()
                );
                return;
            }
            crossbeam_channel::select! {
                recv(self.stop.receiver()) -> _ => return,
                // Flushes reach only the tasks known when they are merged: a task loaded
                // during the wait is added before the snapshots that come after it.
                recv(self.advancer.task_events()) -> event => match event {
                    Ok(event) => self.handle(Message::Task(event)),
                    Err(_) => return,
                },
                recv(flushes) -> batch => match batch {
                    Ok(batch) => {
                        events += batch.len();
                        heard.insert(batch.store);
                        if batch.len() < EVENTS_PER_MESSAGE {
                            ended.insert(batch.store);
                        }
                        self.handle(Message::Flushes(batch));
                        quiet_until = Instant::now() + SNAPSHOT_QUIET_GAP;
                    }
                    Err(_) => return,
                },
                recv(after(SUBSCRIPTION_CHECK)) -> _ => {}
            }
        }
    }

    fn tick(&mut self) {
        let now = self.advancer.on_tick();
        self.publish(now);
    }

    /// Refreshes the role, the snapshot `/status` and the handle read, and the lag gauges.
    /// No I/O: the region of each slowest span is looked up when the status is read.
    fn publish(&self, now: Option<Ts>) {
        let owner = self.advancer.is_owner();
        self.shared.owner.store(owner, Ordering::SeqCst);
        let now = now.unwrap_or_else(local_now_ts);
        let tasks = self
            .advancer
            .status()
            .into_iter()
            .map(|s| {
                let lag = ts_distance(now, s.uploaded.unwrap_or(s.checkpoint));
                // Only the owner's lag is a fact; a standby's series would go stale.
                if owner {
                    self.shared.metrics.checkpoint_lag.set([&s.name], lag.as_secs_f64());
                }
                let slowest = s.slowest.map(|(range, ts)| SlowestSpan { range, ts });
                let view = TaskView {
                    name: s.name,
                    checkpoint: s.checkpoint,
                    checkpoint_time: format_rfc3339(system_time_of(s.checkpoint)),
                    uploaded: s.uploaded,
                    lag_seconds: lag.as_secs(),
                    paused: s.paused,
                    slowest: None,
                };
                PublishedTask { view, slowest }
            })
            .collect();
        *self.shared.tasks.lock() = tasks;
    }
}
