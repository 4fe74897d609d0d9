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
/// Handling one message: from 100 µs (a flush batch) to tens of seconds (a tick with a hung
/// store), factor 4.
const MESSAGE_BUCKETS: &[f64] = &[0.0001, 0.0004, 0.0016, 0.0064, 0.0256, 0.1024, 0.4096, 1.6384, 6.5536, 26.2144];

pub struct Metrics {
    /// The last global checkpoint written (or found higher) per task.
    pub last_checkpoint: GaugeVec<1>,
    pub owner: GaugeVec<0>,
    pub tick_duration: HistogramVec<1>,
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
        out
    }
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
                let mut parts: Vec<String> = self
                    .labels
                    .iter()
                    .zip(values)
                    .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                    .collect();
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
}

pub struct GaugeVec<const N: usize>(Family<N>);

impl<const N: usize> GaugeVec<N> {
    fn new(name: &'static str, help: &'static str, labels: [&'static str; N]) -> Self {
        GaugeVec(Family::new(name, help, labels, Kind::Gauge))
    }

    pub fn set(&self, values: [&str; N], value: f64) {
        self.0.update(values, |s| *s = Series::Gauge(value));
    }

    /// Drops a series, e.g. the checkpoint of a deleted task.
    pub fn remove(&self, values: [&str; N]) {
        self.0.series.lock().remove(&values.map(String::from));
    }

    pub fn get(&self, values: [&str; N]) -> Option<f64> {
        match self.0.series.lock().get(&values.map(String::from)) {
            Some(Series::Gauge(v)) => Some(*v),
            _ => None,
        }
    }
}

pub struct HistogramVec<const N: usize>(Family<N>);

impl<const N: usize> HistogramVec<N> {
    fn new(name: &'static str, help: &'static str, labels: [&'static str; N], buckets: &'static [f64]) -> Self {
        HistogramVec(Family::new(name, help, labels, Kind::Histogram(buckets)))
    }

    pub fn observe(&self, values: [&str; N], value: Duration) {
        let secs = value.as_secs_f64();
        let Kind::Histogram(buckets) = self.0.kind else { return };
        self.0.update(values, |s| {
            if let Series::Histogram { counts, count, sum } = s {
                for (bucket, n) in buckets.iter().zip(counts.iter_mut()) {
                    if secs <= *bucket {
                        *n += 1;
                    }
                }
                *count += 1;
                *sum += secs;
            }
        });
    }

    /// Observes the time until the returned guard is dropped.
    pub fn start_timer(&self, values: [&'static str; N]) -> Timer<'_, N> {
        Timer { histogram: self, values, started: Instant::now() }
    }
}

/// Observes its lifetime into a histogram when dropped.
pub struct Timer<'a, const N: usize> {
    histogram: &'a HistogramVec<N>,
    values: [&'static str; N],
    started: Instant,
}

impl<const N: usize> Drop for Timer<'_, N> {
    fn drop(&mut self) {
        self.histogram.observe(self.values, self.started.elapsed());
    }
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
        m.last_checkpoint.remove(["t1"]);
        assert!(!m.render().contains("last_checkpoint{"));
    }

    #[test]
    fn the_architecture_doc_lists_every_metric() {
        let doc = include_str!("../../docs/architecture.md");
        let text = Metrics::default().render();
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        assert_eq!(names.len(), 16);
        for name in names {
            assert!(doc.contains(&format!("| `{name}` |")), "docs/architecture.md does not list {name}");
        }
    }
}
