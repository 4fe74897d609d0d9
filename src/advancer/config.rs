//! Advancer configuration: defaults are upstream's, values come from flags or a TOML-like
//! file and can be changed on a running advancer.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::timefmt::{parse_duration, MAX_DURATION};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Period of the ticker; also bounds the optional (polling) part of a tick.
    pub tick_interval: Duration,
    /// Delay before re-opening a failed task listener or subscription.
    pub backoff: Duration,
    /// Spans older than now − this are polled from TiKV.
    pub try_advance_threshold: Duration,
    /// A task whose stored checkpoint lags more than this is paused; zero disables.
    pub lag_limit: Duration,
    /// TTL of the owner lease.
    pub owner_ttl: Duration,
    /// Dial deadline for TiKV stores.
    pub dial_timeout: Duration,
    /// Deadline of one RPC (PD, TiKV, etcd).
    pub rpc_timeout: Duration,
    /// Upload the unchanged checkpoint at least this often, so readers see a live owner.
    pub upload_heartbeat: Duration,
    /// A task whose checkpoint has not moved for this long gets its lagging ranges' locks
    /// resolved. Taken from TiKV's flush interval unless set explicitly.
    pub resolve_lock_interval: Duration,
    /// Options set by a flag or the config file: values learned from TiKV never override them.
    pub explicit: BTreeSet<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tick_interval: Duration::from_secs(12),
            backoff: Duration::from_secs(5),
            try_advance_threshold: Duration::from_secs(4 * 60),
            lag_limit: Duration::from_secs(48 * 3600),
            owner_ttl: Duration::from_secs(60),
            dial_timeout: Duration::from_secs(8),
            rpc_timeout: Duration::from_secs(10),
            upload_heartbeat: Duration::from_secs(60),
            resolve_lock_interval: Duration::from_secs(3 * 60),
            explicit: BTreeSet::new(),
        }
    }
}

impl Config {
    /// The polling threshold while some subscription is broken (upstream: 9/20 of the normal one).
    pub fn degraded_threshold(&self) -> Duration {
        self.try_advance_threshold * 9 / 20
    }

    /// Sets one option by its flag name (`tick-interval = "12s"`).
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let duration = parse_duration(value).map_err(|e| Error::Config(format!("{name}: {e}")))?;
        // Checked on a copy: a refused value leaves the configuration as it was.
        let mut next = self.clone();
        let slot = match name {
            "tick-interval" => &mut next.tick_interval,
            "backoff-time" => &mut next.backoff,
            "try-advance-threshold" => &mut next.try_advance_threshold,
            "check-point-lag-limit" => &mut next.lag_limit,
            "owner-ttl" => &mut next.owner_ttl,
            "dial-timeout" => &mut next.dial_timeout,
            "rpc-timeout" => &mut next.rpc_timeout,
            "upload-heartbeat" => &mut next.upload_heartbeat,
            "resolve-lock-interval" => &mut next.resolve_lock_interval,
            other => return Err(Error::Config(format!("unknown option {other:?}"))),
        };
        *slot = duration;
        next.explicit.insert(name.to_string());
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Reads `name = value` lines (TOML subset: comments with `#`, optional quotes).
    pub fn apply_file_text(&mut self, text: &str, origin: &str) -> Result<()> {
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() || line.starts_with('[') {
                continue;
            }
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("{origin}:{}: expected `name = value`", number + 1)))?;
            let name = name.trim().replace('_', "-");
            let value = value.trim().trim_matches('"').trim_matches('\'');
            self.set(&name, value).map_err(|e| Error::Config(format!("{origin}:{}: {e}", number + 1)))?;
        }
        Ok(())
    }

    /// Every duration within its bounds: at least its minimum (a shorter tick, backoff or
    /// deadline turns the threads into busy loops; a lease under a second expires between two
    /// keep-alives) and at most [`MAX_DURATION`] (so that deadline arithmetic never overflows).
    pub fn validate(&self) -> Result<()> {
        let short = Duration::from_millis(100);
        let bounded = [
            ("tick-interval", self.tick_interval, short),
            ("backoff-time", self.backoff, short),
            ("try-advance-threshold", self.try_advance_threshold, Duration::ZERO),
            ("check-point-lag-limit", self.lag_limit, Duration::ZERO),
            ("owner-ttl", self.owner_ttl, Duration::from_secs(1)),
            ("dial-timeout", self.dial_timeout, short),
            ("rpc-timeout", self.rpc_timeout, short),
            ("upload-heartbeat", self.upload_heartbeat, short),
            ("resolve-lock-interval", self.resolve_lock_interval, short),
        ];
        for (name, value, min) in bounded {
            if value < min || value > MAX_DURATION {
                return Err(Error::Config(format!("{name} is {value:?}, out of its bounds [{min:?}, 365d]")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_flags_override_defaults() {
        let mut config = Config::default();
        assert_eq!(config.degraded_threshold(), Duration::from_secs(108));
        config
            .apply_file_text(
                "# advancer\n[log-backup]\ntick_interval = \"3s\"\ncheck-point-lag-limit = '1h'\n",
                "test.toml",
            )
            .unwrap();
        assert_eq!(config.tick_interval, Duration::from_secs(3));
        assert_eq!(config.lag_limit, Duration::from_secs(3600));
        let err = config.apply_file_text("nonsense", "f.toml").unwrap_err().to_string();
        assert!(err.contains("f.toml:1"), "{err}");
        assert!(config.set("tick-interval", "0s").is_err());
        assert!(config.set("flux", "1s").unwrap_err().to_string().contains("flux"));
    }

    #[test]
    fn durations_are_bounded_with_the_option_named() {
        let mut config = Config::default();
        // Each of these panicked (in the parser or in deadline arithmetic) or busy-looped.
        for (name, value, says) in [
            ("owner-ttl", "99999999999h", "maximum"),
            ("dial-timeout", "1e400s", "not a duration"),
            ("rpc-timeout", "18446744073709551615", "maximum"),
            ("check-point-lag-limit", "9999999999999999999999d", "maximum"),
            ("tick-interval", "1ms", "tick-interval is 1ms, out of its bounds [100ms, 365d]"),
            ("backoff-time", "0s", "backoff-time"),
            ("owner-ttl", "500ms", "owner-ttl"),
        ] {
            let err = config.set(name, value).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(says), "{name} = {value}: {err}");
        }
        assert_eq!(config, Config::default(), "a refused value changes nothing");
        let huge = Config { upload_heartbeat: Duration::from_secs(u64::MAX), ..Config::default() };
        assert!(huge.validate().unwrap_err().to_string().contains("upload-heartbeat"));
        config.set("check-point-lag-limit", "365d").unwrap();
        config.set("check-point-lag-limit", "0").unwrap();
    }
}
