//! A small Prometheus text-format registry: gauges, counters and histograms keyed by name and
//! labels, with upstream's metric names where they exist (`tidb_log_backup_*`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use parking_lot::Mutex;

pub const LAST_CHECKPOINT: &str = "tidb_log_backup_last_checkpoint";
pub const OWNER: &str = "tidb_log_backup_advancer_owner";
pub const TICK_DURATION: &str = "tidb_log_backup_advancer_tick_duration_sec";
pub const REGION_REQUEST: &str = "tidb_log_backup_region_request";
pub const REGION_REQUEST_FAILURE: &str = "tidb_log_backup_region_request_failure";
pub const CHECKPOINT_LAG: &str = "streamhelper_checkpoint_lag_seconds";
pub const STORE_RPC_ERRORS: &str = "streamhelper_store_rpc_errors_total";
pub const REGIONS_POLLED: &str = "streamhelper_regions_polled_total";
pub const EXTERNAL_STORAGE_CHECKPOINT: &str = "tidb_log_backup_external_storage_checkpoint";
pub const STORAGE_WRITE_FAILURES: &str = "streamhelper_external_storage_write_failures_total";
pub const FUTURE_CHECKPOINTS: &str = "streamhelper_future_checkpoints_total";

/// Upstream's tick histogram buckets: exponential from 10 ms, factor 3, 8 buckets.
const BUCKETS: [f64; 8] = [0.01, 0.03, 0.09, 0.27, 0.81, 2.43, 7.29, 21.87];

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    gauges: BTreeMap<(&'static str, Labels), f64>,
    counters: BTreeMap<(&'static str, Labels), u64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Metrics {
    pub fn set_gauge(&self, name: &'static str, pairs: &[(&'static str, &str)], value: f64) {
        self.inner.lock().gauges.insert((name, labels(pairs)), value);
    }

    /// Drops a gauge series, e.g. the checkpoint of a deleted task.
    pub fn remove_gauge(&self, name: &'static str, pairs: &[(&'static str, &str)]) {
        self.inner.lock().gauges.remove(&(name, labels(pairs)));
    }

    pub fn inc_counter(&self, name: &'static str, pairs: &[(&'static str, &str)], by: u64) {
        *self.inner.lock().counters.entry((name, labels(pairs))).or_default() += by;
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], value: Duration) {
        let secs = value.as_secs_f64();
        let mut inner = self.inner.lock();
        let h = inner.histograms.entry((name, labels(pairs))).or_default();
        for (bucket, count) in BUCKETS.iter().zip(h.counts.iter_mut()) {
            if secs <= *bucket {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn counter(&self, name: &'static str, pairs: &[(&'static str, &str)]) -> u64 {
        self.inner.lock().counters.get(&(name, labels(pairs))).copied().unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        fn series(out: &mut String, name: &str, labels: &Labels, extra: Option<(&str, String)>, value: String) {
            let mut parts: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('"', "\\\""))).collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            let labels = if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) };
            let _ = writeln!(out, "{name}{labels} {value}");
        }
        let inner = self.inner.lock();
        let mut out = String::new();
        let typed = |out: &mut String, name: &str, kind: &str, last: &mut Option<String>| {
            if last.as_deref() != Some(name) {
                let _ = writeln!(out, "# TYPE {name} {kind}");
                *last = Some(name.to_string());
            }
        };
        let mut last = None;
        for ((name, l), v) in &inner.gauges {
            typed(&mut out, name, "gauge", &mut last);
            series(&mut out, name, l, None, v.to_string());
        }
        for ((name, l), v) in &inner.counters {
            typed(&mut out, name, "counter", &mut last);
            series(&mut out, name, l, None, v.to_string());
        }
        for ((name, l), h) in &inner.histograms {
            typed(&mut out, name, "histogram", &mut last);
            let bucket = format!("{name}_bucket");
            for (le, count) in BUCKETS.iter().zip(h.counts.iter()) {
                series(&mut out, &bucket, l, Some(("le", le.to_string())), count.to_string());
            }
            series(&mut out, &bucket, l, Some(("le", "+Inf".into())), h.count.to_string());
            series(&mut out, &format!("{name}_sum"), l, None, h.sum.to_string());
            series(&mut out, &format!("{name}_count"), l, None, h.count.to_string());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.set_gauge(LAST_CHECKPOINT, &[("task", "t1")], 42.0);
        m.inc_counter(REGION_REQUEST, &[("result", "success")], 3);
        m.observe(TICK_DURATION, &[("step", "tick")], Duration::from_millis(50));
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE tidb_log_backup_last_checkpoint gauge\ntidb_log_backup_last_checkpoint{task=\"t1\"} 42"
            ),
            "{text}"
        );
        assert!(text.contains("tidb_log_backup_region_request{result=\"success\"} 3"));
        assert!(text.contains("tidb_log_backup_advancer_tick_duration_sec_bucket{step=\"tick\",le=\"0.03\"} 0"));
        assert!(text.contains("tidb_log_backup_advancer_tick_duration_sec_bucket{step=\"tick\",le=\"0.09\"} 1"));
        assert!(text.contains("tidb_log_backup_advancer_tick_duration_sec_count{step=\"tick\"} 1"));
        m.remove_gauge(LAST_CHECKPOINT, &[("task", "t1")]);
        assert!(!m.render().contains("last_checkpoint{"));
    }
}
