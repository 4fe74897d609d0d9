//! `streamhelper sim`: runs a simulated cluster and a metadata store (a real etcd) until
//! `--duration` passes or a `quit` control arrives, applying controls from a file (and
//! from the terminal when stdin is one).
//!
//! Ctrl-C (SIGINT) and SIGTERM end it like `quit`: the private etcd is killed and its
//! temporary data directory removed.

use std::fs::File;
use std::io::{BufRead, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use streamhelper::etcd::EtcdProcess;
use streamhelper::{Error, Result};

use streamhelper::format::parse_duration;
use streamhelper::sim::{parse_line, Control};
use streamhelper::sim::{rss_bytes, SimCluster, SimConfig};

/// How often the control file is checked for new lines.
const CONTROL_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of TiKV stores.
    #[arg(long, default_value_t = 3)]
    pub stores: usize,
    /// Number of regions.
    #[arg(long, default_value_t = 16)]
    pub regions: usize,
    /// Seed of region layout, leaders and scatter.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How often every store flushes (e.g. 500ms, 3s); 0 flushes only on a `flush` control.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// etcd endpoint to use as the metadata store; without it a private etcd is started.
    #[arg(long)]
    pub etcd: Option<String>,
    /// A file of control lines, watched for appended lines (`help` lists the controls).
    #[arg(long)]
    pub control_file: Option<PathBuf>,
    /// Stop after this long (default: run until a `quit` control).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// New complete lines appended to the control file since the last look.
struct ControlFile {
    path: PathBuf,
    offset: u64,
}

impl ControlFile {
    fn new_lines(&mut self) -> Result<Vec<String>> {
        let io = |source| Error::Io { what: format!("reading control file {}", self.path.display()), source };
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        if len < self.offset {
            // Truncated or replaced: read it again from the start.
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset)).map_err(io)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        // A line still being written is read once it ends.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        Ok(text[..complete].lines().map(str::to_string).collect())
    }
}

/// Terminal lines arrive on a channel; the reader thread ends with stdin (or the process).
fn terminal_lines() -> Option<Receiver<String>> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    let (tx, rx) = crossbeam_channel::bounded(16);
    std::thread::Builder::new()
        .name("sim-stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(std::result::Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
            let _ = tx.send("quit".into());
        })
        .ok()?;
    Some(rx)
}

/// Applies one line; true when it asks to quit.
fn run_line(sim: &SimCluster, line: &str, source: &Path) -> bool {
    match parse_line(line) {
        Ok(None) => false,
        Ok(Some(control)) => {
            match control.apply(sim) {
                Ok(outcome) => println!("{outcome}"),
                Err(e) => println!("{line}: {e}"),
            }
            control == Control::Quit
        }
        Err(e) => {
            println!("{}: {e}", source.display());
            false
        }
    }
}

pub fn run_sim_command(args: SimArgs) -> Result<()> {
    let terminate = super::advancer::termination_flag()?;
    let etcd_process = match &args.etcd {
        Some(_) => None,
        None => Some(EtcdProcess::start()?),
    };
    let etcd_endpoint =
        args.etcd.clone().or_else(|| etcd_process.as_ref().map(EtcdProcess::endpoint)).unwrap_or_default();
    let config = SimConfig {
        stores: args.stores,
        regions: args.regions,
        seed: args.seed,
        flush_interval: Some(args.flush_interval).filter(|d| !d.is_zero()),
        ..SimConfig::default()
    };
    let began = Instant::now();
    let sim = SimCluster::start(config)?;
    println!("pd: {}", sim.pd_endpoint());
    println!("etcd: {etcd_endpoint}");
    if let Some(etcd) = &etcd_process {
        println!("etcd data: {}", etcd.data_dir().display());
    }
    for store in sim.store_ids() {
        println!("store {store}: {}", sim.store_address(store));
    }
    let rss = rss_bytes().map_or("unknown".to_string(), |b| format!("{} MiB", b >> 20));
    println!("regions: {} built in {:?}, RSS {rss}", sim.region_count(), began.elapsed());
    println!("ready");
    let _ = std::io::stdout().flush();

    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut control_file = args.control_file.clone().map(|path| ControlFile { path, offset: 0 });
    let terminal = terminal_lines();
    let stdin_path = Path::new("stdin");
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        if terminate.load(Ordering::SeqCst) {
            println!("signal received: stopping");
            return Ok(());
        }
        if let Some(file) = control_file.as_mut() {
            for line in file.new_lines()? {
                if run_line(&sim, &line, &file.path) {
                    return Ok(());
                }
            }
        }
        let wait = deadline.map_or(CONTROL_POLL, |d| d.saturating_duration_since(Instant::now()).min(CONTROL_POLL));
        match terminal.as_ref().map(|rx| rx.recv_timeout(wait)) {
            Some(Ok(line)) => {
                if run_line(&sim, &line, stdin_path) {
                    return Ok(());
                }
            }
            Some(Err(RecvTimeoutError::Disconnected)) | None => std::thread::sleep(wait),
            Some(Err(RecvTimeoutError::Timeout)) => {}
        }
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_command_serves_with_its_own_etcd_until_quit() {
        let dir = tempfile::tempdir().unwrap();
        let controls = dir.path().join("controls");
        std::fs::write(&controls, "split t100_r5\nflush\ntransfer-leader 1000 2\nbogus\nstatus\nquit\n").unwrap();
        let args = SimArgs {
            stores: 2,
            regions: 8,
            seed: 1,
            flush_interval: Duration::ZERO,
            etcd: None,
            control_file: Some(controls),
            duration: Some(Duration::from_secs(60)),
        };
        let began = Instant::now();
        run_sim_command(args).unwrap();
        assert!(began.elapsed() < Duration::from_secs(30), "quit ends it long before --duration");
    }

    #[test]
    fn sim_command_stops_after_its_duration() {
        let args = SimArgs {
            stores: 1,
            regions: 2,
            seed: 0,
            flush_interval: Duration::from_millis(100),
            etcd: Some("127.0.0.1:2379".into()),
            control_file: None,
            duration: Some(Duration::from_millis(300)),
        };
        let began = Instant::now();
        run_sim_command(args).unwrap();
        assert!(began.elapsed() >= Duration::from_millis(300) && began.elapsed() < Duration::from_secs(10));
    }
}
