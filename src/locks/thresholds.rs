//! Thresholds taken from TiKV: every store's `log-backup.max-flush-interval`, read from its
//! status server's `/config` (JSON) through PD's store list. When known, the resolve
//! interval is the largest flush interval and the poll threshold 4/3 of it (upstream's
//! 2026 rule; the degraded threshold follows at 9/20 of that). Options set explicitly win.

use std::net::ToSocketAddrs;
use std::time::Duration;

use crate::advancer::Config;
use crate::cluster::ClusterMeta;
use crate::daemon::status::http_get;
use crate::error::{Error, Result};
use crate::timefmt::{format_duration, parse_duration};
use crate::types::StoreId;

pub const RESOLVE_INTERVAL_OPTION: &str = "resolve-lock-interval";
const POLL_THRESHOLD_OPTION: &str = "try-advance-threshold";

/// `log-backup.max-flush-interval` out of a TiKV `/config` page.
pub fn flush_interval_from_config(json: &str) -> std::result::Result<Duration, String> {
    let config: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let value = config
        .get("log-backup")
        .and_then(|section| section.get("max-flush-interval"))
        .ok_or("log-backup.max-flush-interval is not found in TiKV config")?;
    let text = value.as_str().ok_or_else(|| format!("log-backup.max-flush-interval is {value}, not a duration"))?;
    parse_duration(text).map_err(|e| format!("log-backup.max-flush-interval: {e}"))
}

/// The interval to use from every store's: the largest (a store flushing that rarely holds
/// its regions back that long), and a note when they differ.
pub fn combine(intervals: &[(StoreId, Duration)]) -> Result<(Duration, Option<String>)> {
    let largest = intervals
        .iter()
        .map(|(_, d)| *d)
        .max()
        .ok_or_else(|| Error::Config("no TiKV config found for log-backup.max-flush-interval".into()))?;
    let disagreement = intervals.iter().any(|(_, d)| *d != largest).then(|| {
        let listed: Vec<String> =
            intervals.iter().map(|(s, d)| format!("store {s}: {}", format_duration(*d))).collect();
        format!(
            "TiKV stores disagree on log-backup.max-flush-interval ({}); using the largest, {}",
            listed.join(", "),
            format_duration(largest)
        )
    });
    Ok((largest, disagreement))
}

/// Reads every store's flush interval. Stores that do not answer are skipped; the error
/// when none answered keeps the caller on its last good values. Also returns what is worth
/// a warning (stores that did not answer, stores that disagree), for the caller to log
/// when it changes.
pub fn fetch_flush_interval(meta: &dyn ClusterMeta) -> Result<(Duration, Vec<String>)> {
    let mut intervals = Vec::new();
    let mut notes = Vec::new();
    for (store, address) in meta.store_status_addresses()? {
        match fetch_one(&address) {
            Ok(interval) => intervals.push((store, interval)),
            Err(e) => notes.push(format!("cannot read the config of store {store} at http://{address}/config: {e}")),
        }
    }
    let (largest, disagreement) = combine(&intervals).map_err(|e| e.context(notes.join("; ")))?;
    notes.extend(disagreement);
    Ok((largest, notes))
}

fn fetch_one(address: &str) -> std::result::Result<Duration, String> {
    let addr = address
        .to_socket_addrs()
        .map_err(|e| format!("bad status address: {e}"))?
        .next()
        .ok_or("the status address resolves to nothing")?;
    let (code, body) = http_get(addr, "/config").map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("HTTP {code}"));
    }
    flush_interval_from_config(&body)
}

/// Applies a known TiKV flush interval to `config` (options in `config.explicit` are left
/// alone). Returns whether anything changed.
pub fn apply(config: &mut Config, flush_interval: Duration) -> bool {
    let before = config.clone();
    if !config.explicit.contains(RESOLVE_INTERVAL_OPTION) {
        config.resolve_lock_interval = flush_interval;
    }
    if !config.explicit.contains(POLL_THRESHOLD_OPTION) {
        config.try_advance_threshold = flush_interval * 4 / 3;
    }
    *config != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tikv_durations_and_names_what_is_missing() {
        let page = r#"{"log-backup":{"enable":true,"max-flush-interval":"1m30s"},"server":{}}"#;
        assert_eq!(flush_interval_from_config(page), Ok(Duration::from_secs(90)));
        assert_eq!(
            flush_interval_from_config(r#"{"log-backup":{"max-flush-interval":"180ms"}}"#),
            Ok(Duration::from_millis(180))
        );
        let missing = flush_interval_from_config(r#"{"log-backup":{}}"#).unwrap_err();
        assert!(missing.contains("log-backup.max-flush-interval is not found"), "{missing}");
        assert!(flush_interval_from_config("<html>").unwrap_err().contains("not JSON"));
        assert!(flush_interval_from_config(r#"{"log-backup":{"max-flush-interval":5}}"#).unwrap_err().contains("is 5"));
    }

    #[test]
    fn the_largest_interval_wins_and_none_is_an_error() {
        let secs = Duration::from_secs;
        let (largest, note) = combine(&[(1, secs(60)), (2, secs(180)), (3, secs(60))]).unwrap();
        assert_eq!(largest, secs(180));
        assert!(note.unwrap().contains("store 1: 1m"));
        assert_eq!(combine(&[(1, secs(60)), (2, secs(60))]).unwrap(), (secs(60), None));
        assert!(combine(&[]).unwrap_err().to_string().contains("no TiKV config found"));
    }

    #[test]
    fn upstream_rule_with_explicit_options_winning() {
        let mut config = Config::default();
        assert!(apply(&mut config, Duration::from_millis(180)));
        assert_eq!(config.resolve_lock_interval, Duration::from_millis(180));
        assert_eq!(config.try_advance_threshold, Duration::from_millis(240));
        assert_eq!(config.degraded_threshold(), Duration::from_millis(108));
        assert!(!apply(&mut config, Duration::from_millis(180)), "unchanged");

        let mut settings = crate::Settings::default();
        settings.set_by_key("try-advance-threshold", "10m").unwrap();
        settings.set_by_key(RESOLVE_INTERVAL_OPTION, "5m").unwrap();
        let mut config = settings.advancer;
        assert!(!apply(&mut config, Duration::from_secs(60)));
        assert_eq!(config.try_advance_threshold, Duration::from_secs(600));
        assert_eq!(config.resolve_lock_interval, Duration::from_secs(300));
    }
}
