//! Lock resolution on lagging ranges (tidb `br/pkg/streamhelper/advancer.go`, client-go
//! `txnkv/txnlock/lock_resolver.go`). A transaction that crashed between
//! prewrite and commit leaves locks that hold its regions' resolved ts, and so the task's
//! checkpoint, back for good. When a task's checkpoint has not moved for the resolve
//! interval, the frontier pieces that hold it back are scanned for locks, and each
//! transaction is settled through its primary as TiKV's clients do.
//!
//! The ticker calls [`LockResolver::after_tick`] with the core after each tick; it decides
//! (`plan`) and hands a round to the resolver's own thread (`round`), never waiting for it.
//! The same thread reads TiKV's flush interval (`thresholds`), which `after_tick` applies
//! to the core's configuration.

mod plan;
mod round;
pub(crate) mod thresholds;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::advancer::core::Advancer;
use crate::cluster::{most_lagging_within, ClusterMeta, KvClients, RegionCache};
use crate::daemon::metrics::Metrics;
use crate::error::{Error, Result};
use crate::timefmt::format_duration;
use crate::types::Ts;
use crate::worker::{catch_panic, StopToken, Worker as Thread};

pub use plan::{target_bound, Schedule, ROUND_REGIONS};
pub use round::{run_round, RoundEnv, RoundReport, RoundRequest};
pub use thresholds::fetch_flush_interval;

/// Upstream's resolve-lock pool size.
pub const CONCURRENCY: usize = 8;

#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// Deadline of one RPC; a round as a whole gets the resolve interval (at least this).
    pub rpc_timeout: Duration,
    /// How often TiKV's configuration is read again.
    pub config_refresh: Duration,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        ResolverSettings { rpc_timeout: Duration::from_secs(10), config_refresh: Duration::from_secs(60) }
    }
}

/// The resolver's side on the ticker thread, and its worker thread.
pub struct LockResolver {
    rounds: Sender<RoundRequest>,
    reports: Receiver<RoundReport>,
    /// The latest flush interval read from TiKV.
    flush_interval: Arc<Mutex<Option<Duration>>>,
    schedule: Schedule,
    rpc_timeout: Duration,
    _thread: Thread,
}

impl LockResolver {
    pub fn start(meta: Arc<dyn ClusterMeta>, kv: Arc<dyn KvClients>, settings: ResolverSettings) -> Result<Self> {
        let (rounds, requests) = bounded::<RoundRequest>(1);
        let (reporter, reports) = bounded::<RoundReport>(1);
        let flush_interval = Arc::new(Mutex::new(None));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(CONCURRENCY)
            .thread_name(|i| format!("sh-resolve-locks-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("building the resolve-lock pool: {e}")))?;
        let worker = Worker { meta, kv, settings: settings.clone(), pool, flush_interval: flush_interval.clone() };
        let thread = Thread::spawn("sh-resolve-locks", move |stop| worker.run(requests, reporter, stop))?;
        Ok(LockResolver {
            rounds,
            reports,
            flush_interval,
            schedule: Schedule::default(),
            rpc_timeout: settings.rpc_timeout,
            _thread: thread,
        })
    }

    /// After each tick while owner: records a finished round, applies TiKV's thresholds,
    /// and starts a round for tasks stuck past the resolve interval, over the most lagging
    /// of their lagging pieces ([`ROUND_REGIONS`] regions), located through `regions`
    /// where it knows them. Never blocks.
    pub fn after_tick(&mut self, now: Ts, core: &mut Advancer, regions: &RegionCache, metrics: &Metrics) {
        if let Ok(report) = self.reports.try_recv() {
            self.schedule.finished(now);
            record(&report, metrics);
        }
        if let Some(interval) = *self.flush_interval.lock() {
            let mut changed = false;
            core.update_config_with(|config| changed = thresholds::apply(config, interval));
            if changed {
                let config = core.config();
                log::info!(
                    "TiKV flushes every {}: resolve interval {}, poll threshold {}",
                    format_duration(interval),
                    format_duration(config.resolve_lock_interval),
                    format_duration(config.try_advance_threshold)
                );
            }
        }
        let running =
            core.status().into_iter().filter(|s| !s.paused).map(|s| (s.name, s.checkpoint)).collect::<Vec<_>>();
        self.schedule.observe(running.iter().map(|(name, cp)| (name.as_str(), *cp)), now);
        let interval = core.config().resolve_lock_interval;
        let due = self.schedule.due(now, interval);
        if due.is_empty() {
            return;
        }
        let mut targets = Vec::new();
        for task in &due {
            let checkpoint = self.schedule.checkpoint(task).unwrap_or_default();
            targets.extend(core.oldest_spans(task, target_bound(checkpoint, interval, now), ROUND_REGIONS));
        }
        self.schedule.started(due.clone());
        if targets.is_empty() {
            // Nothing old enough yet: look again an interval later.
            self.schedule.finished(now);
            return;
        }
        let (targets, known) = most_lagging_within(regions, targets, ROUND_REGIONS);
        let known_regions = known;
        log::info!(
            "Advancer starts to resolve locks: tasks {due:?}, the {} most lagging ranges ({} regions known)",
            targets.len(),
            known_regions.len()
        );
        let deadline = Instant::now() + interval.max(self.rpc_timeout);
        let request =
            RoundRequest { known_regions, max_regions: ROUND_REGIONS, ..RoundRequest::new(due, targets, deadline) };
        if self.rounds.try_send(request).is_err() {
            log::warn!("the lock resolver is still busy; the round waits for the next tick");
            self.schedule.finished(now);
        }
    }
}

fn record(report: &RoundReport, metrics: &Metrics) {
    let result = if report.errors.is_empty() { "ok" } else { "failed" };
    metrics.resolve_lock_rounds.inc_by([result], 1);
    metrics.resolve_lock_locks_found.inc_by([], report.locks_found as u64);
    metrics.resolve_lock_regions_scanned.inc_by([], report.regions_scanned as u64);
    for (outcome, count) in &report.locks {
        metrics.resolve_lock_locks.inc_by([outcome], *count as u64);
    }
    metrics.tick_duration.observe(["resolve-locks"], report.elapsed);
    if let Some(line) = errors_line(&report.errors) {
        log::warn!("{line}");
    }
    log::info!(
        "finish resolve locks for checkpoint: tasks {:?}, {} regions scanned{}, {} locks found, {:?}, {} RPCs in {:?}",
        report.tasks,
        report.regions_scanned,
        if report.regions_capped { " (as many as a round scans; the rest waits for the next)" } else { "" },
        report.locks_found,
        report.locks,
        report.rpcs,
        report.elapsed
    );
}

/// How many of a round's errors are quoted; a round over many regions of a slow store can
/// fail on every one of them (209 000 lines in one bench run at 10^6 regions).
const QUOTED_ERRORS: usize = 3;

/// One line for all of a round's errors: how many, and the first few.
fn errors_line(errors: &[String]) -> Option<String> {
    let first = errors.first()?;
    let quoted = errors.iter().take(QUOTED_ERRORS).cloned().collect::<Vec<_>>().join("; ");
    Some(match errors.len() {
        1 => format!("resolve locks failed, wait for next tick: {first}"),
        n => format!(
            "resolve locks failed in {n} places, wait for next tick; the first {}: {quoted}",
            n.min(QUOTED_ERRORS)
        ),
    })
}

struct Worker {
    meta: Arc<dyn ClusterMeta>,
    kv: Arc<dyn KvClients>,
    settings: ResolverSettings,
    pool: rayon::ThreadPool,
    flush_interval: Arc<Mutex<Option<Duration>>>,
}

impl Worker {
    fn run(self, requests: Receiver<RoundRequest>, reports: Sender<RoundReport>, stop: StopToken) {
        let mut last_notes = Vec::new();
        let mut refresh = after(Duration::ZERO);
        loop {
            crossbeam_channel::select! {
                recv(stop.receiver()) -> _ => return,
                recv(requests) -> request => {
                    let Ok(request) = request else { return };
                    let env = RoundEnv::new(
                        self.meta.as_ref(),
                        self.kv.as_ref(),
                        self.settings.rpc_timeout,
                        request.deadline,
                        &stop,
                    );
                    // A panic (grpcio has unwraps of its own) fails this round only: the
                    // thread lives on, or no round would ever run again.
                    let report = catch_panic(|| run_round(&env, &self.pool, &request)).unwrap_or_else(|panic| {
                        RoundReport {
                            tasks: request.tasks.clone(),
                            errors: vec![format!("the lock-resolution round panicked: {panic}")],
                            ..RoundReport::default()
                        }
                    });
                    if !stop.send(&reports, report) {
                        return;
                    }
                }
                recv(refresh) -> _ => {
                    self.refresh_thresholds(&mut last_notes);
                    refresh = after(self.settings.config_refresh);
                }
            }
        }
    }

    /// A failed read keeps the last good value. Warnings are logged when they change, not at
    /// every refresh.
    fn refresh_thresholds(&self, last_notes: &mut Vec<String>) {
        let notes = match thresholds::fetch_flush_interval(self.meta.as_ref()) {
            Ok((interval, notes)) => {
                *self.flush_interval.lock() = Some(interval);
                notes
            }
            Err(e) => vec![format!("cannot read TiKV's flush interval, keeping the current thresholds: {e}")],
        };
        if notes != *last_notes {
            for note in &notes {
                log::warn!("{note}");
            }
            *last_notes = notes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_failing_everywhere_is_one_line_quoting_the_first_errors() {
        assert_eq!(errors_line(&[]), None);
        assert_eq!(errors_line(&["a".into()]).as_deref(), Some("resolve locks failed, wait for next tick: a"));
        let many: Vec<String> = (0..200_000).map(|i| format!("region {i} timed out")).collect();
        let line = errors_line(&many).unwrap();
        assert!(line.starts_with("resolve locks failed in 200000 places"), "{line}");
        assert!(line.contains("region 2 timed out") && !line.contains("region 3 timed out"), "{line}");
    }
}
