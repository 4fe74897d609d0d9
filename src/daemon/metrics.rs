//! The daemon's metrics, declared once with help text, label names and bucket layout, and
//! rendered in the Prometheus text format. Upstream's names (`tidb_log_backup_*`) where
//! they exist. Each daemon has its own set, so two daemons in one process keep separate
//! numbers; each metric family has its own lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Upstream's tick histogram buckets: exponential from 10 ms, factor 3, 8 buckets.
const TICK_BUCKETS: &[f64] = &[0.01, 0.03, 0.09, 0.27, 0.81, 2.43, 7.29, 21.87];
/// Upstream's batch-size buckets: 1 × 2ⁿ, 12 buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
/// Upstream's subscription-event buckets: 8 × 2ⁿ, 12 buckets.
const EVENT_BUCKETS: &[f64] = &[8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
/// Handling one message: from 100 µs (a flush batch) to tens of seconds (a tick with a hung
/// store), factor 4.
const MESSAGE_BUCKETS: &[f64] = &[0.0001, 0.0004, 0.0016, 0.0064, 0.0256, 0.1024, 0.4096, 1.6384, 6.5536, 26.2144];

pub struct Metrics {
    /// The last global checkpoint written (or found higher) per task.
    pub last_checkpoint: GaugeVec<1>,
    pub owner: GaugeVec<0>,
    pub tick_duration: HistogramVec<1>,
    /// Regions per GetLastFlushTSOfRegion request.
    pub batch_size: HistogramVec<1>,
    /// Flush events per subscription message, by store.
    pub region_checkpoint_event: HistogramVec<1>,
    /// The region (and its leader's store) holding back the most lagging task.
    pub last_region_id: GaugeVec<0>,
    pub last_region_leader_store_id: GaugeVec<0>,
    /// Per task: the region, its leader's store and why it is the slowest; the value is its
    /// lag in seconds.
    pub task_blocker: GaugeVec<4>,
    pub upload_failures: CounterVec<1>,
    pub subscription_up: GaugeVec<1>,
    pub region_request: CounterVec<1>,
    pub region_request_failure: CounterVec<1>,
    pub checkpoint_lag: GaugeVec<1>,
    pub store_failures: CounterVec<1>,
    pub regions_polled: CounterVec<0>,
    /// Checkpoints refused for being above the current time, by where they came from.
    pub future_checkpoints: CounterVec<1>,
    /// The checkpoint last written to the task's external storage.
    pub external_storage_checkpoint: GaugeVec<1>,
    pub storage_write_failures: CounterVec<1>,
    pub resolve_lock_rounds: CounterVec<1>,
    pub resolve_lock_locks_found: CounterVec<0>,
    pub resolve_lock_locks: CounterVec<1>,
    pub resolve_lock_regions_scanned: CounterVec<0>,
    pub message_duration: HistogramVec<1>,
    /// The ticker thread's own CPU per message: the tick's cost apart from the flush merges
    /// (the scale bench's steady-tick figure).
    pub message_cpu: HistogramVec<1>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            last_checkpoint: GaugeVec::new(
                "tidb_log_backup_last_checkpoint",
                "The last global checkpoint uploaded for the task (TSO).",
                ["task"],
            ),
            owner: GaugeVec::new("tidb_log_backup_advancer_owner", "1 while this advancer is the owner.", []),
            tick_duration: HistogramVec::new(
                "tidb_log_backup_advancer_tick_duration_sec",
                "Duration of a tick, of each task's polling within it and of lock-resolution rounds, in seconds.",
                ["step"],
                TICK_BUCKETS,
            ),
            batch_size: HistogramVec::new(
                "tidb_log_backup_advancer_batch_size",
                "Regions per checkpoint request sent to a store.",
                ["type"],
                BATCH_BUCKETS,
            ),
            region_checkpoint_event: HistogramVec::new(
                "tidb_log_backup_region_checkpoint_event",
                "Flush events per subscription message, by store.",
                ["store"],
                EVENT_BUCKETS,
            ),
            last_region_id: GaugeVec::new(
                "tidb_log_backup_current_last_region_id",
                "The region whose checkpoint is the lowest of the most lagging task.",
                [],
            ),
            last_region_leader_store_id: GaugeVec::new(
                "tidb_log_backup_current_last_region_leader_store_id",
                "The store leading the region whose checkpoint is the lowest of the most lagging task.",
                [],
            ),
            task_blocker: GaugeVec::new(
                "streamhelper_task_blocker_lag_seconds",
                "The region holding each task back, its leader's store and why (its last poll failure, or slow-flush), with its lag in seconds.",
                ["task", "region", "store", "reason"],
            ),
            upload_failures: CounterVec::new(
                "streamhelper_checkpoint_upload_failures_total",
                "Failed uploads of a task's global checkpoint to etcd.",
                ["task"],
            ),
            subscription_up: GaugeVec::new(
                "streamhelper_subscription_up",
                "1 while the flush subscription to the store is up, 0 while it is down (its regions are polled).",
                ["store"],
            ),
            region_request: CounterVec::new(
                "tidb_log_backup_region_request",
                "Regions asked for their checkpoint, by result.",
                ["result"],
            ),
            region_request_failure: CounterVec::new(
                "tidb_log_backup_region_request_failure",
                "Regions whose checkpoint could not be advanced, by reason.",
                ["reason"],
            ),
            checkpoint_lag: GaugeVec::new(
                "streamhelper_checkpoint_lag_seconds",
                "How far the task's stored checkpoint is behind now, in seconds.",
                ["task"],
            ),
            store_failures: CounterVec::new(
                "streamhelper_store_failures_total",
                "Polls in which a store failed as a whole (dial, RPC or deadline).",
                ["store"],
            ),
            regions_polled: CounterVec::new(
                "streamhelper_regions_polled_total",
                "Regions polled, leaderless ones included.",
                [],
            ),
            future_checkpoints: CounterVec::new(
                "streamhelper_future_checkpoints_total",
                "Region checkpoints above the current time, refused, by source (poll, flush).",
                ["source"],
            ),
            external_storage_checkpoint: GaugeVec::new(
                "tidb_log_backup_external_storage_checkpoint",
                "The global checkpoint last written to the task's external storage (TSO).",
                ["task"],
            ),
            storage_write_failures: CounterVec::new(
                "streamhelper_external_storage_write_failures_total",
                "Failed writes of the checkpoint copy to the task's external storage.",
                ["task"],
            ),
            resolve_lock_rounds: CounterVec::new(
                "streamhelper_resolve_lock_rounds_total",
                "Lock-resolution rounds on stuck tasks' lagging ranges, by result.",
                ["result"],
            ),
            resolve_lock_locks_found: CounterVec::new(
                "streamhelper_resolve_lock_locks_found_total",
                "Locks found on lagging ranges.",
                [],
            ),
            resolve_lock_locks: CounterVec::new(
                "streamhelper_resolve_lock_locks_total",
                "Locks settled, by how their transaction ended.",
                ["outcome"],
            ),
            resolve_lock_regions_scanned: CounterVec::new(
                "streamhelper_resolve_lock_regions_scanned_total",
                "Regions scanned for locks.",
                [],
            ),
            message_duration: HistogramVec::new(
                "streamhelper_advancer_message_duration_seconds",
                "Time the ticker spent on one message, by kind, in seconds.",
                ["message"],
                MESSAGE_BUCKETS,
            ),
            message_cpu: HistogramVec::new(
                "streamhelper_advancer_message_cpu_seconds",
                "CPU the ticker thread spent on one message, by kind, in seconds (work it hands to other threads not included).",
                ["message"],
                MESSAGE_BUCKETS,
            ),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.last_checkpoint.0.render(&mut out);
        self.owner.0.render(&mut out);
        self.tick_duration.0.render(&mut out);
        self.batch_size.0.render(&mut out);
        self.region_checkpoint_event.0.render(&mut out);
        self.last_region_id.0.render(&mut out);
        self.last_region_leader_store_id.0.render(&mut out);
        self.task_blocker.0.render(&mut out);
        self.upload_failures.0.render(&mut out);
        self.subscription_up.0.render(&mut out);
        self.region_request.0.render(&mut out);
        self.region_request_failure.0.render(&mut out);
        self.checkpoint_lag.0.render(&mut out);
        self.store_failures.0.render(&mut out);
        self.regions_polled.0.render(&mut out);
        self.future_checkpoints.0.render(&mut out);
        self.external_storage_checkpoint.0.render(&mut out);
        self.storage_write_failures.0.render(&mut out);
        self.resolve_lock_rounds.0.render(&mut out);
        self.resolve_lock_locks_found.0.render(&mut out);
        self.resolve_lock_locks.0.render(&mut out);
        self.resolve_lock_regions_scanned.0.render(&mut out);
        self.message_duration.0.render(&mut out);
        self.message_cpu.0.render(&mut out);
        out
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
pub fn escape_label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

enum Series {
    Counter(u64),
    Gauge(f64),
    Histogram { counts: Vec<u64>, count: u64, sum: f64 },
}

/// One metric with `N` labels: its declaration and its series.
struct Family<const N: usize> {
    name: &'static str,
    help: &'static str,
    labels: [&'static str; N],
    kind: Kind,
    series: Mutex<BTreeMap<[String; N], Series>>,
}

impl<const N: usize> Family<N> {
    fn retain(&self, keep: impl Fn(&[String; N]) -> bool) {
        self.series.lock().retain(|values, _| keep(values));
    }

    fn new(name: &'static str, help: &'static str, labels: [&'static str; N], kind: Kind) -> Self {
        Family { name, help, labels, kind, series: Mutex::default() }
    }

    fn update(&self, values: [&str; N], f: impl FnOnce(&mut Series)) {
        let mut series = self.series.lock();
        let entry = series.entry(values.map(String::from)).or_insert_with(|| match self.kind {
            Kind::Counter => Series::Counter(0),
            Kind::Gauge => Series::Gauge(0.0),
            Kind::Histogram(buckets) => Series::Histogram { counts: vec![0; buckets.len()], count: 0, sum: 0.0 },
        });
        f(entry);
    }

    fn render(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {kind}", self.name, self.help, self.name);
        for (values, series) in self.series.lock().iter() {
            let labels = |extra: Option<String>| {
                let mut parts: Vec<String> =
                    self.labels.iter().zip(values).map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v))).collect();
                parts.extend(extra);
                if parts.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", parts.join(","))
                }
            };
            let name = self.name;
            match series {
                Series::Counter(v) => {
                    let _ = writeln!(out, "{name}{} {v}", labels(None));
                }
                Series::Gauge(v) => {
                    let _ = writeln!(out, "{name}{} {v}", labels(None));
                }
                Series::Histogram { counts, count, sum } => {
                    let Kind::Histogram(buckets) = self.kind else { continue };
                    for (le, n) in buckets.iter().zip(counts) {
                        let _ = writeln!(out, "{name}_bucket{} {n}", labels(Some(format!("le=\"{le}\""))));
                    }
                    let _ = writeln!(out, "{name}_bucket{} {count}", labels(Some("le=\"+Inf\"".into())));
                    let _ = writeln!(out, "{name}_sum{} {sum}", labels(None));
                    let _ = writeln!(out, "{name}_count{} {count}", labels(None));
                }
            }
        }
    }
}

pub struct CounterVec<const N: usize>(Family<N>);

impl<const N: usize> CounterVec<N> {
    fn new(name: &'static str, help: &'static str, labels: [&'static str; N]) -> Self {
        CounterVec(Family::new(name, help, labels, Kind::Counter))
    }

    pub fn inc_by(&self, values: [&str; N], by: u64) {
        self.0.update(values, |s| {
            if let Series::Counter(v) = s {
                *v += by;
            }
        });
    }

    pub fn get(&self, values: [&str; N]) -> u64 {
        match self.0.series.lock().get(&values.map(String::from)) {
            Some(Series::Counter(v)) => *v,
            _ => 0,
        }
    }

    /// Keeps only the series whose label values `keep` accepts, e.g. those of stores that
    /// are still in the cluster.
    pub fn retain(&self, keep: impl Fn(&[String; N]) -> bool) {
        self.0.retain(keep);
    }
}

pub struct GaugeVec<const N: usize>(Family<N>);

impl<const N: usize> GaugeVec<N> {
    fn new(name: &'static str, help: &'static str, labels: [&'static str; N]) -> Self {
        GaugeVec(Family::new(name, help, labels, Kind::Gauge))
    }

    /// Keeps only the series whose label values `keep` accepts.
    pub fn retain(&self, keep: impl Fn(&[String; N]) -> bool) {
        self.0.retain(keep);
    }

    pub fn set(&self, values: [&str; N], value: f64) {
        self.0.update(values, |s| *s = Series::Gauge(value));
    }

    /// Drops a series, e.g. the checkpoint of a deleted task.
    pub fn remove(&self, values: [&str; N]) {
        self.0.series.lock().remove(&values.map(String::from));
    }

    /// Drops every series, e.g. when ownership is lost.
    pub fn clear(&self) {
        self.0.series.lock().clear();
    }

    /// Drops the series whose first label is `first` (a task's series of a multi-label gauge).
    pub fn remove_prefixed(&self, first: &str) {
        self.0.series.lock().retain(|values, _| values.first().map_or(true, |v| v != first));
    }

    pub fn get(&self, values: [&str; N]) -> Option<f64> {
        match self.0.series.lock().get(&values.map(String::from)) {
            Some(Series::Gauge(v)) => Some(*v),
            _ => None,
        }
    }

    /// Every series with its label values.
    pub fn series(&self) -> Vec<([String; N], f64)> {
        let series = self.0.series.lock();
        series
            .iter()
            .filter_map(|(k, s)| match s {
                Series::Gauge(v) => Some((k.clone(), *v)),
                _ => None,
            })
            .collect()
    }
}

pub struct HistogramVec<const N: usize>(Family<N>);

impl<const N: usize> HistogramVec<N> {
    fn new(name: &'static str, help: &'static str, labels: [&'static str; N], buckets: &'static [f64]) -> Self {
        HistogramVec(Family::new(name, help, labels, Kind::Histogram(buckets)))
    }

    /// Keeps only the series whose label values `keep` accepts.
    pub fn retain(&self, keep: impl Fn(&[String; N]) -> bool) {
        self.0.retain(keep);
    }

    pub fn observe(&self, values: [&str; N], value: Duration) {
        self.observe_value(values, value.as_secs_f64());
    }

    pub fn observe_value(&self, values: [&str; N], value: f64) {
        let Kind::Histogram(buckets) = self.0.kind else { return };
        self.0.update(values, |s| {
            if let Series::Histogram { counts, count, sum } = s {
                for (bucket, n) in buckets.iter().zip(counts.iter_mut()) {
                    if value <= *bucket {
                        *n += 1;
                    }
                }
                *count += 1;
                *sum += value;
            }
        });
    }

    /// The sum of every observation of every series (e.g. all flush events received).
    pub fn total(&self) -> f64 {
        self.0.series.lock().values().map(|s| if let Series::Histogram { sum, .. } = s { *sum } else { 0.0 }).sum()
    }

    /// How many observations the series has.
    pub fn count(&self, values: [&str; N]) -> u64 {
        match self.0.series.lock().get(&values.map(String::from)) {
            Some(Series::Histogram { count, .. }) => *count,
            _ => 0,
        }
    }

    /// Observes the time until the returned guard is dropped.
    pub fn start_timer(&self, values: [&'static str; N]) -> Timer<'_, N> {
        Timer { histogram: self, values, started: Since::Wall(Instant::now()) }
    }

    /// Observes the CPU this thread uses until the returned guard is dropped.
    pub fn start_cpu_timer(&self, values: [&'static str; N]) -> Timer<'_, N> {
        Timer { histogram: self, values, started: Since::ThreadCpu(thread_cpu_time()) }
    }
}

/// Observes its lifetime (wall clock or the thread's CPU) into a histogram when dropped.
pub struct Timer<'a, const N: usize> {
    histogram: &'a HistogramVec<N>,
    values: [&'static str; N],
    started: Since,
}

enum Since {
    Wall(Instant),
    ThreadCpu(Duration),
}

impl<const N: usize> Drop for Timer<'_, N> {
    fn drop(&mut self) {
        let elapsed = match self.started {
            Since::Wall(started) => started.elapsed(),
            Since::ThreadCpu(started) => thread_cpu_time().saturating_sub(started),
        };
        self.histogram.observe(self.values, elapsed);
    }
}

/// The CPU time (user and system) the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `time` is a valid timespec for the call to write; the clock id is a constant
    // every Linux supports.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    if status != 0 {
        return Duration::ZERO;
    }
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.last_checkpoint.set(["t1"], 42.0);
        m.region_request.inc_by(["success"], 3);
        m.tick_duration.observe(["tick"], Duration::from_millis(50));
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE tidb_log_backup_last_checkpoint gauge\ntidb_log_backup_last_checkpoint{task=\"t1\"} 42"
            ),
            "{text}"
        );
        assert!(text.contains("# HELP tidb_log_backup_region_request Regions asked"), "{text}");
        assert!(text.contains("tidb_log_backup_region_request{result=\"success\"} 3"));
        assert!(text.contains("tidb_log_backup_advancer_tick_duration_sec_bucket{step=\"tick\",le=\"0.03\"} 0"));
        assert!(text.contains("tidb_log_backup_advancer_tick_duration_sec_bucket{step=\"tick\",le=\"0.09\"} 1"));
        assert!(text.contains("tidb_log_backup_advancer_tick_duration_sec_count{step=\"tick\"} 1"));
        // A task name from etcd cannot end the label value or the line (text format: `\\`,
        // `\"` and `\n` escaped).
        m.last_checkpoint.set(["a\\\"} 1\nforged_metric{x=\"y"], 7.0);
        let text = m.render();
        assert!(
            text.contains("tidb_log_backup_last_checkpoint{task=\"a\\\\\\\"} 1\\nforged_metric{x=\\\"y\"} 7\n"),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("forged_metric")), "{text}");
        m.last_checkpoint.remove(["a\\\"} 1\nforged_metric{x=\"y"]);
        m.batch_size.observe_value(["checkpoint"], 1024.0);
        let text = m.render();
        assert!(text.contains("tidb_log_backup_advancer_batch_size_bucket{type=\"checkpoint\",le=\"512\"} 0"));
        assert!(text.contains("tidb_log_backup_advancer_batch_size_bucket{type=\"checkpoint\",le=\"1024\"} 1"));
        assert!(text.contains("tidb_log_backup_advancer_batch_size_bucket{type=\"checkpoint\",le=\"2048\"} 1"));
        assert!(text.contains("# TYPE tidb_log_backup_region_checkpoint_event histogram"));
        m.last_checkpoint.remove(["t1"]);
        assert!(!m.render().contains("last_checkpoint{"));
    }

    #[test]
    fn a_cpu_timer_counts_this_threads_work_and_not_its_waits() {
        let m = Metrics::default();
        {
            let _wall = m.message_duration.start_timer(["tick"]);
            let _cpu = m.message_cpu.start_cpu_timer(["tick"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        let cpu = m.message_cpu.total();
        assert!(m.message_duration.total() >= 0.05);
        assert!(cpu < 0.025, "a sleeping thread was charged {cpu} s of CPU");
        {
            let _cpu = m.message_cpu.start_cpu_timer(["tick"]);
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_millis(20) {
                std::hint::black_box(spin.elapsed());
            }
        }
        assert!(m.message_cpu.total() > cpu, "a busy thread was charged no CPU");
        assert_eq!(m.message_cpu.count(["tick"]), 2);
    }

    #[test]
    fn the_architecture_doc_lists_every_metric() {
        let doc = include_str!("../../docs/architecture.md");
        let text = Metrics::default().render();
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        assert_eq!(names.len(), 24);
        for name in names {
            assert!(doc.contains(&format!("| `{name}` |")), "docs/architecture.md does not list {name}");
        }
    }
}
