//! `streamhelper demo` and `streamhelper sim` as a user runs them: the demo's full-screen
//! view in a real terminal (tmux, reading the screen), its line output when piped, and both
//! commands ending cleanly on SIGTERM (the private etcd killed, its data directory removed).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn streamhelper(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_streamhelper"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

/// stdout lines on a channel, so that reading them has a deadline.
fn lines(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads lines until one satisfies `f`; returns every line read.
fn read_until(rx: &Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no {what} in time; output: {seen:#?}"));
        let done = f(&line);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

fn terminate_and_wait(child: &mut Child) -> std::process::ExitStatus {
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit within {WAIT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The etcd at `endpoint` is gone and its data directory with it.
fn assert_etcd_cleaned_up(endpoint: &str, data_dir: &str) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(endpoint).is_ok() {
        assert!(Instant::now() < deadline, "etcd still serves {endpoint}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!PathBuf::from(data_dir).exists(), "etcd's data directory {data_dir} is left behind");
}

#[test]
fn sim_ends_cleanly_on_sigterm() {
    let mut child = streamhelper(&["sim", "--regions", "16"]);
    let rx = lines(child.stdout.take().unwrap());
    let out = read_until(&rx, "ready", |l| l == "ready");
    let endpoint = out.iter().find_map(|l| l.strip_prefix("etcd: ")).unwrap().to_string();
    let data_dir = out.iter().find_map(|l| l.strip_prefix("etcd data: ")).unwrap().to_string();
    assert!(terminate_and_wait(&mut child).success());
    assert_etcd_cleaned_up(&endpoint, &data_dir);
}

#[test]
fn piped_demo_prints_lines_and_a_summary_and_ends_cleanly_on_sigterm() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let log_path = log.path().to_str().unwrap();
    let mut child = streamhelper(&["demo", "--regions", "300", "--duration", "60s", "--log-file", log_path]);
    let rx = lines(child.stdout.take().unwrap());
    let mut out = read_until(&rx, "the fault script to start", |l| l.contains("split three regions"));
    out.extend(read_until(&rx, "a line with the lag", |l| l.contains(" lag ")));
    let etcd = out.iter().find_map(|l| l.strip_prefix("etcd: ")).unwrap().to_string();
    let (endpoint, data_dir) = etcd.split_once(" (data in ").unwrap();
    let data_dir = data_dir.trim_end_matches(')').to_string();
    assert!(terminate_and_wait(&mut child).success());
    out.extend(rx.try_iter());
    let text = out.join("\n");
    assert!(!text.contains('\x1b'), "piped output is plain lines: {text}");
    assert!(text.contains(&format!("logs: {log_path}")));
    assert!(text.contains("safety violations 0"), "{text}");
    assert!(text.contains("lag min"), "{text}");
    assert!(std::fs::metadata(log.path()).unwrap().len() > 0, "the logs went to the file");
    assert_etcd_cleaned_up(endpoint, &data_dir);
}

/// A tmux server of its own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("tmux: scripts/deps.sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for_screen(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.run(&["capture-pane", "-p", "-t", "demo"]);
            if f(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the screen never showed {what}:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn the_demo_draws_a_full_screen_view_in_a_terminal_then_its_summary() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let tmux = Tmux { socket: format!("streamhelper-test-{}", std::process::id()) };
    let command = format!(
        "{} demo --regions 300 --duration 12s --log-file {}; sleep 60",
        env!("CARGO_BIN_EXE_streamhelper"),
        log.path().display()
    );
    tmux.run(&["new-session", "-d", "-s", "demo", "-x", "110", "-y", "32", &command]);
    let view = tmux.wait_for_screen("the live view with an owner", |s| {
        s.contains("advancers") && s.contains("OWNER") && s.contains("standby") && s.contains("lag ")
    });
    for part in ["truth", "cluster", "regions; stores: 1 up", "last tick", "slowest", "events"] {
        assert!(view.contains(part), "the view lacks {part:?}:\n{view}");
    }
    let summary = tmux.wait_for_screen("the summary", |s| s.contains("safety violations"));
    assert!(summary.contains("safety violations 0"), "{summary}");
    assert!(!summary.contains("advancers "), "the view is gone once the demo ends:\n{summary}");
}
