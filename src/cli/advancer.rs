//! `streamhelper advancer`: the daemon in the foreground until SIGINT or SIGTERM. Its
//! options are the rows of [`streamhelper::advancer::SETTINGS`], as flags and as `--config` keys.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use streamhelper::Security;
use streamhelper::SettingKind;
use streamhelper::{Daemon, DaemonConfig, DaemonHandle};
use streamhelper::{Error, Result};
use streamhelper::{Settings, SETTINGS};

const TAKE_OVER_HELP: &str = "Evict the TiDB owner candidates ahead of this advancer (they campaign \
                              again behind it), with backoff, until it leads; other streamhelper \
                              advancers ahead are waited for. Without this flag the advancer waits its \
                              turn, which next to TiDB can be forever";

/// The `advancer` command line: `--config FILE`, `--take-over` and one flag per setting.
#[derive(Debug, Default)]
pub struct AdvancerArgs {
    config: Option<PathBuf>,
    take_over: bool,
    /// `(setting key, value)` for every setting given as a flag.
    flags: Vec<(&'static str, String)>,
}

impl FromArgMatches for AdvancerArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let flags = SETTINGS
            .iter()
            .filter_map(|s| {
                let values = matches.get_many::<String>(s.key)?;
                Some((s.key, values.cloned().collect::<Vec<_>>().join(",")))
            })
            .collect();
        Ok(AdvancerArgs {
            config: matches.get_one::<PathBuf>("config").cloned(),
            take_over: matches.get_flag("take-over"),
            flags,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for AdvancerArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = cmd
            .arg(Arg::new("config").long("config").value_name("FILE").value_parser(clap::value_parser!(PathBuf)).help(
                "A TOML file with the options below as kebab-case keys (flags win); see docs/advancer.example.toml",
            ))
            .arg(Arg::new("take-over").long("take-over").action(ArgAction::SetTrue).help(TAKE_OVER_HELP));
        SETTINGS.iter().fold(cmd, |cmd, s| {
            let help =
                if s.default.is_empty() { s.help.to_string() } else { format!("{} [default: {}]", s.help, s.default) };
            let mut arg = Arg::new(s.key).long(s.flag).help(help).action(ArgAction::Append);
            if let Some(short) = s.short {
                arg = arg.short(short);
            }
            arg = match s.kind {
                SettingKind::Duration(_) => arg.value_name("DURATION").value_parser(check_duration),
                SettingKind::Endpoints(_) => arg.value_name("HOST:PORT").value_delimiter(','),
                SettingKind::Address(_) => arg.value_name("HOST:PORT"),
                SettingKind::Path(_) => arg.value_name("FILE"),
            };
            cmd.arg(arg)
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Rejects a bad duration at parse time, naming the flag (clap adds it).
fn check_duration(text: &str) -> Result<String, String> {
    streamhelper::format::parse_duration(text).map(|_| text.to_string())
}

impl AdvancerArgs {
    /// Defaults, then the file, then the flags.
    pub fn settings(&self) -> Result<Settings> {
        let mut settings = Settings::default();
        if let Some(path) = &self.config {
            settings.load_file(path)?;
        }
        for (key, value) in &self.flags {
            let setting = SETTINGS.iter().find(|s| s.key == *key).expect("flags come from SETTINGS");
            settings.set(setting, value).map_err(|e| Error::Config(format!("--{}: {e}", setting.flag)))?;
        }
        settings.validate()?;
        Ok(settings)
    }
}

/// SIGINT/SIGTERM as a flag the foreground loops poll.
pub fn termination_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone())
            .map_err(|source| Error::Io { what: format!("installing the handler of signal {signal}"), source })?;
    }
    Ok(flag)
}

/// Waits for a signal, then stops the daemon (resigning ownership, joining threads).
/// glibc's malloc arenas for the whole process: by default up to 8 per core. Each thread
/// that allocates (20 subscriptions, the rayon pool, gRPC's completion queues) came to own
/// one, and each kept what a 10^6-region poll freed in it: with its region cache full the
/// advancer sat at 1.1-1.3 GiB, 0.4 GiB with two arenas (docs/benchmarks.md, "Memory at
/// 10^6 regions"). Two, so that the tick and the subscriptions rarely wait for each other's
/// lock. Before any thread starts, as `MALLOC_ARENA_MAX` would; that variable still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a glibc tunable; no allocation is in flight on another thread.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
    }
}

const MALLOC_ARENAS: libc::c_int = 2;

pub fn run_until_signal(handle: DaemonHandle, terminate: &AtomicBool) {
    while !terminate.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("signal received: resigning and stopping");
    handle.stop();
}

pub fn run(args: AdvancerArgs) -> Result<()> {
    limit_malloc_arenas();
    let terminate = termination_flag()?;
    let settings = args.settings()?;
    if args.take_over {
        log::warn!(
            "--take-over: this advancer will evict the TiDB owner candidates ahead of it under {}",
            streamhelper::meta::keys::OWNER_PREFIX
        );
    }
    let config = DaemonConfig {
        pd_endpoints: if settings.pd.is_empty() { settings.etcd.clone() } else { settings.pd.clone() },
        etcd_endpoints: settings.etcd.clone(),
        security: Security::load(&settings.security)?,
        advancer: settings.advancer.clone(),
        status_addr: settings.status_addr.clone(),
        owner_id: None,
        take_over: args.take_over,
    };
    let handle = Daemon::start(config)?;
    if let Some(addr) = handle.status_addr() {
        println!("status: http://{addr}/status  metrics: http://{addr}/metrics");
    }
    run_until_signal(handle, &terminate);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command as Verb};

    fn settings(args: &[&str]) -> Result<Settings> {
        let cli = Cli::try_parse_from(["streamhelper", "advancer"].iter().chain(args))
            .map_err(|e| Error::Config(e.to_string()))?;
        match cli.command {
            Verb::Advancer(args) => args.settings(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "pd = \"127.0.0.1:1\"\ntick-interval = \"3s\"\n[advancer]\nowner-ttl = \"9s\"\n")
            .unwrap();
        let path = file.to_str().unwrap();
        let s = settings(&["--config", path, "--tick-interval", "1.5s", "-u", "127.0.0.2:2,127.0.0.3:3"]).unwrap();
        assert_eq!(s.advancer.tick_interval, Duration::from_millis(1500));
        assert_eq!(s.advancer.owner_ttl, Duration::from_secs(9));
        assert_eq!(s.advancer.backoff, Duration::from_secs(5));
        assert_eq!(s.pd, ["127.0.0.2:2", "127.0.0.3:3"]);
        assert!(settings(&["--config", path, "--owner-ttl", "0s"]).unwrap_err().to_string().contains("owner-ttl"));
        assert!(settings(&["--tick-interval", "1x"]).unwrap_err().to_string().contains("--tick-interval"));
    }
}
