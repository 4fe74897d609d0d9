//! Advancer configuration. [`SETTINGS`] defines every option once (file key, flag, default,
//! help): the `advancer` command builds its flags from it, `--config` reads a TOML file
//! against it, and `docs/operations.md` lists it (a test keeps the page in step). Defaults
//! are upstream's; a running advancer can take a new [`Config`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::security::SecurityConfig;
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

/// The table an option's file key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Top level, or `[advancer]` (alias `[advancer-config]`, BR's struct name).
    Advancer,
    /// `[security]`, as in TiDB's and PD's files.
    Security,
}

/// What an option's value is and where it goes.
#[derive(Clone, Copy)]
pub enum Kind {
    Duration(fn(&mut Config) -> &mut Duration),
    /// Comma-separated `host:port` list (a TOML string or array of strings).
    Endpoints(fn(&mut Settings) -> &mut Vec<String>),
    Address(fn(&mut Settings) -> &mut Option<String>),
    Path(fn(&mut SecurityConfig) -> &mut Option<PathBuf>),
}

pub struct Setting {
    /// The key in the config file (kebab-case).
    pub key: &'static str,
    /// The long flag, without `--`.
    pub flag: &'static str,
    pub short: Option<char>,
    pub section: Section,
    /// As shown in `--help` and the docs; for durations, [`Config::default`] (a test checks).
    pub default: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

macro_rules! duration {
    ($key:literal, $field:ident, $default:literal, $help:literal) => {
        Setting {
            key: $key,
            flag: $key,
            short: None,
            section: Section::Advancer,
            default: $default,
            help: $help,
            kind: Kind::Duration(|c| &mut c.$field),
        }
    };
}

macro_rules! tls_path {
    ($key:literal, $flag:literal, $field:ident, $help:literal) => {
        Setting {
            key: $key,
            flag: $flag,
            short: None,
            section: Section::Security,
            default: "",
            help: $help,
            kind: Kind::Path(|s| &mut s.$field),
        }
    };
}

/// Every option of the advancer, once.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "pd",
        flag: "pd",
        short: Some('u'),
        section: Section::Advancer,
        default: "",
        help: "PD endpoints (host:port, comma separated; http:// accepted). PD serves its etcd on the same ports",
        kind: Kind::Endpoints(|s| &mut s.pd),
    },
    Setting {
        key: "etcd",
        flag: "etcd",
        short: None,
        section: Section::Advancer,
        default: "",
        help: "etcd endpoints of the metadata store, when not PD's own",
        kind: Kind::Endpoints(|s| &mut s.etcd),
    },
    Setting {
        key: "status-addr",
        flag: "status-addr",
        short: None,
        section: Section::Advancer,
        default: "",
        help: "Serve /metrics, /status and POST /owner/resign on this host:port",
        kind: Kind::Address(|s| &mut s.status_addr),
    },
    duration!("tick-interval", tick_interval, "12s", "How often the owner ticks"),
    duration!(
        "try-advance-threshold",
        try_advance_threshold,
        "4m",
        "Poll TiKV for spans older than this; unset: 4/3 of TiKV's log-backup.max-flush-interval once read"
    ),
    duration!(
        "check-point-lag-limit",
        lag_limit,
        "48h",
        "Pause a task whose checkpoint lags more than this; 0s disables"
    ),
    duration!("backoff-time", backoff, "5s", "Wait before retrying a failed listener, subscription or campaign"),
    duration!("owner-ttl", owner_ttl, "60s", "TTL of the owner lease (TiDB: 60s)"),
    duration!("dial-timeout", dial_timeout, "8s", "Deadline for dialing a TiKV store"),
    duration!("rpc-timeout", rpc_timeout, "10s", "Deadline of one PD, TiKV or etcd call"),
    duration!("upload-heartbeat", upload_heartbeat, "60s", "Upload an unchanged checkpoint at least this often"),
    duration!(
        "resolve-lock-interval",
        resolve_lock_interval,
        "3m",
        "Resolve locks on a task's lagging ranges once its checkpoint stood still this long; unset: TiKV's log-backup.max-flush-interval"
    ),
    tls_path!("ca-path", "ca", ca_path, "CA certificate (PEM) for TLS"),
    tls_path!("cert-path", "cert", cert_path, "Client certificate (PEM) for TLS"),
    tls_path!("key-path", "key", key_path, "Client key (PEM) for TLS"),
];

/// Everything the `advancer` command can be told, resolved from defaults, a file and flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub advancer: Config,
    pub pd: Vec<String>,
    pub etcd: Vec<String>,
    pub status_addr: Option<String>,
    pub security: SecurityConfig,
}

impl Settings {
    /// Sets one option from its text form (a flag's value).
    pub fn set(&mut self, setting: &Setting, text: &str) -> Result<()> {
        match setting.kind {
            Kind::Duration(field) => {
                // Checked on a copy: a refused value leaves the configuration as it was.
                let mut next = self.advancer.clone();
                *field(&mut next) = parse_duration(text).map_err(Error::Config)?;
                next.validate()?;
                // Given, so values learned from TiKV do not replace it.
                next.explicit.insert(setting.key.to_string());
                self.advancer = next;
            }
            Kind::Endpoints(field) => {
                *field(self) = text.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect()
            }
            Kind::Address(field) => *field(self) = Some(text.to_string()),
            Kind::Path(field) => *field(&mut self.security) = Some(PathBuf::from(text)),
        }
        Ok(())
    }

    /// Sets the option whose file key is `key` from its text form.
    pub fn set_by_key(&mut self, key: &str, text: &str) -> Result<()> {
        let setting =
            SETTINGS.iter().find(|s| s.key == key).ok_or_else(|| Error::Config(format!("unknown option {key:?}")))?;
        self.set(setting, text)
    }

    /// Reads a TOML config file; every value it sets replaces the current one.
    pub fn load_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { what: format!("reading config file {}", path.display()), source })?;
        self.apply_toml(&text, &path.display().to_string())
    }

    /// Applies TOML text: kebab-case keys at the top level or under `[advancer]`, TLS paths
    /// under `[security]`. Unknown keys and tables are errors naming `origin`, the line and
    /// the key, so a typo never passes silently.
    pub fn apply_toml(&mut self, text: &str, origin: &str) -> Result<()> {
        let root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map(|s| format!(":{}", line_of_offset(text, s.start)));
            Error::Config(format!("{origin}{}: {}", line.unwrap_or_default(), e.message()))
        })?;
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in &root {
            match (key.as_str(), value) {
                ("advancer" | "advancer-config", toml::Value::Table(table)) => {
                    self.apply_table(Section::Advancer, Some(key), table, &mut seen, text, origin)?
                }
                ("security", toml::Value::Table(table)) => {
                    self.apply_table(Section::Security, Some(key), table, &mut seen, text, origin)?
                }
                (_, toml::Value::Table(_)) => {
                    let line = find_line(text, None, &format!("[{key}]")).unwrap_or(0);
                    return Err(Error::Config(format!(
                        "{origin}:{line}: unknown table [{key}]; expected [advancer] or [security]"
                    )));
                }
                _ => self.apply_one(Section::Advancer, None, key, value, &mut seen, text, origin)?,
            }
        }
        Ok(())
    }

    fn apply_table<'k>(
        &mut self,
        section: Section,
        table_name: Option<&str>,
        table: &'k toml::Table,
        seen: &mut Vec<&'k str>,
        text: &str,
        origin: &str,
    ) -> Result<()> {
        for (key, value) in table {
            self.apply_one(section, table_name, key, value, seen, text, origin)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_one<'k>(
        &mut self,
        section: Section,
        table_name: Option<&str>,
        key: &'k str,
        value: &toml::Value,
        seen: &mut Vec<&'k str>,
        text: &str,
        origin: &str,
    ) -> Result<()> {
        let line = find_line(text, table_name, key).unwrap_or(0);
        let fail = |why: String| Error::Config(format!("{origin}:{line}: {key}: {why}"));
        let setting = SETTINGS.iter().find(|s| s.key == key && s.section == section).ok_or_else(|| {
            let place = table_name.map_or("at the top level".to_string(), |t| format!("in [{t}]"));
            let known: Vec<&str> = SETTINGS.iter().filter(|s| s.section == section).map(|s| s.key).collect();
            fail(format!("unknown key {place}; known: {}", known.join(", ")))
        })?;
        if seen.contains(&key) {
            let other = find_line(text, if table_name.is_some() { None } else { Some("advancer") }, key).unwrap_or(0);
            return Err(fail(format!("set both at the top level and in [advancer] (line {other})")));
        }
        seen.push(key);
        let text_value = match (setting.kind, value) {
            (_, toml::Value::String(s)) => s.clone(),
            (Kind::Endpoints(_), toml::Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(String::from).ok_or_else(|| fail("expected strings".into())))
                .collect::<Result<Vec<_>>>()?
                .join(","),
            (Kind::Duration(_), _) => {
                return Err(fail(format!("expected a quoted duration like \"12s\", found {value}")))
            }
            _ => return Err(fail(format!("expected a string, found {value}"))),
        };
        self.set(setting, &text_value).map_err(|e| match e {
            Error::Config(why) => fail(why),
            other => other,
        })
    }

    pub fn validate(&self) -> Result<()> {
        if self.pd.is_empty() && self.etcd.is_empty() {
            return Err(Error::Config("no PD endpoint: give --pd (-u) or `pd` in the config file".into()));
        }
        self.advancer.validate()
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line defining `key` (or the table header `[name]` when `key` is one), inside
/// `table` when given. The file already parsed, so a plain scan is enough.
fn find_line(text: &str, table: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            if line == key {
                return Some(number + 1);
            }
            current = Some(line.trim_matches(|c| c == '[' || c == ']').trim().to_string());
            continue;
        }
        let defined = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches(|c| c == '"' || c == '\''))
            .is_some_and(|k| k == key);
        if defined && current.as_deref() == table {
            return Some(number + 1);
        }
    }
    None
}

/// The options table of `docs/operations.md`, generated from [`SETTINGS`].
pub fn settings_markdown() -> String {
    let mut out = String::from("| file key | flag | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let key = match s.section {
            Section::Advancer => format!("`{}`", s.key),
            Section::Security => format!("`[security] {}`", s.key),
        };
        let flag = match s.short {
            Some(short) => format!("`--{}`, `-{short}`", s.flag),
            None => format!("`--{}`", s.flag),
        };
        let default = if s.default.is_empty() { "–".to_string() } else { format!("`{}`", s.default) };
        out.push_str(&format!("| {key} | {flag} | {default} | {} |\n", s.help));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(key: &str) -> &'static Setting {
        SETTINGS.iter().find(|s| s.key == key).unwrap()
    }

    #[test]
    fn the_table_defaults_are_the_config_defaults() {
        let mut from_table = Settings::default();
        for s in SETTINGS.iter().filter(|s| matches!(s.kind, Kind::Duration(_))) {
            from_table.set(s, "1s").unwrap();
            from_table.set(s, s.default).unwrap();
        }
        assert_eq!(from_table.advancer.explicit.len(), 9, "every duration set is marked explicit");
        from_table.advancer.explicit.clear();
        assert_eq!(from_table.advancer, Config::default());
        let mut keys: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), SETTINGS.len(), "every key once");
    }

    #[test]
    fn toml_top_level_advancer_table_and_security() {
        let mut settings = Settings::default();
        let text = r#"
# comments and a '#' inside a quoted value
pd = ["127.0.0.1:2379", "127.0.0.2:2379"]
status-addr = "127.0.0.1:9090"
tick-interval = "3s"

[advancer]
check-point-lag-limit = "1.5h"
backoff-time = "500ms"

[security]
ca-path = "/etc/tls/#ca.pem"
"#;
        settings.apply_toml(text, "t.toml").unwrap();
        assert_eq!(settings.pd, ["127.0.0.1:2379", "127.0.0.2:2379"]);
        assert_eq!(settings.status_addr.as_deref(), Some("127.0.0.1:9090"));
        assert_eq!(settings.advancer.tick_interval, Duration::from_secs(3));
        assert_eq!(settings.advancer.lag_limit, Duration::from_secs(5400));
        assert_eq!(settings.advancer.backoff, Duration::from_millis(500));
        assert_eq!(settings.security.ca_path, Some(PathBuf::from("/etc/tls/#ca.pem")));
        assert_eq!(settings.advancer.owner_ttl, Duration::from_secs(60), "untouched keys keep defaults");
        settings.set(setting("tick-interval"), "7s").unwrap();
        assert_eq!(settings.advancer.tick_interval, Duration::from_secs(7), "a flag overrides the file");
    }

    #[test]
    fn bad_files_name_the_file_line_and_key() {
        let cases = [
            ("pd = \"a:1\"\nflux = \"1s\"\n", "t.toml:2: flux: unknown key at the top level"),
            ("[advancer]\n\ntick-interval = 12\n", "t.toml:3: tick-interval: expected a quoted duration"),
            ("[tikv]\nx = 1\n", "t.toml:1: unknown table [tikv]"),
            ("[security]\nca = \"x\"\n", "t.toml:2: ca: unknown key in [security]"),
            (
                "tick-interval = \"1s\"\n[advancer]\ntick-interval = \"2s\"\n",
                "tick-interval: set both at the top level and in [advancer]",
            ),
            ("tick-interval = \"soon\"\n", "t.toml:1: tick-interval: \"soon\" is not a duration"),
            ("tick-interval = 12s\n", "t.toml:1:"),
            ("a = 1\na = 2\n", "t.toml:2:"),
        ];
        for (text, expected) in cases {
            let err = Settings::default().apply_toml(text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn invalid_values_are_refused() {
        let mut settings = Settings::default();
        assert!(settings.validate().unwrap_err().to_string().contains("pd"));
        // Each of these panicked (in the parser or in deadline arithmetic) or busy-looped.
        for (key, value, says) in [
            ("owner-ttl", "99999999999h", "maximum"),
            ("dial-timeout", "1e400s", "not a duration"),
            ("rpc-timeout", "18446744073709551615", "maximum"),
            ("check-point-lag-limit", "9999999999999999999999d", "maximum"),
            ("tick-interval", "1ms", "tick-interval is 1ms, out of its bounds [100ms, 365d]"),
            ("tick-interval", "0s", "tick-interval is 0ns"),
            ("backoff-time", "0s", "backoff-time"),
            ("owner-ttl", "500ms", "owner-ttl"),
        ] {
            let err = settings.set_by_key(key, value).unwrap_err().to_string();
            assert!(err.contains(says), "{key} = {value}: {err}");
        }
        assert_eq!(settings, Settings::default(), "a refused value changes nothing");
        let huge = Config { upload_heartbeat: Duration::from_secs(u64::MAX), ..Config::default() };
        assert!(huge.validate().unwrap_err().to_string().contains("upload-heartbeat"));
        settings.set_by_key("check-point-lag-limit", "365d").unwrap();
        settings.set_by_key("check-point-lag-limit", "0").unwrap();
    }

    // Paths are read at run time: a cached test binary may have been built in another clone.
    #[test]
    fn the_example_file_loads() {
        let path = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
            .join("docs/advancer.example.toml");
        let mut settings = Settings::default();
        settings.load_file(&path).unwrap();
        settings.validate().unwrap();
        let explicit: Vec<&str> = settings.advancer.explicit.iter().map(String::as_str).collect();
        assert!(!explicit.contains(&"try-advance-threshold") && !explicit.contains(&"resolve-lock-interval"));
        settings.advancer.explicit.clear();
        assert_eq!(settings.advancer, Config::default(), "the example shows the defaults");
    }

    #[test]
    fn operations_doc_lists_every_option() {
        let doc = std::fs::read_to_string(
            Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("docs/operations.md"),
        )
        .unwrap();
        assert!(
            doc.contains(&settings_markdown()),
            "docs/operations.md is out of date; paste this table into it:\n{}",
            settings_markdown()
        );
    }
}
