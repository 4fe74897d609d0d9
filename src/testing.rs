//! What the unit tests, integration tests, benches and the binary's `sim` command share beyond
//! the API (raft-engine's `internals` habit): waiting on a condition with a deadline, free
//! loopback ports, a minimal HTTP client for the status server, and raw clients of the
//! simulated cluster's services. Not for host programs.

use std::time::{Duration, Instant};

pub use crate::daemon::status::{http_get, http_request};
#[cfg(feature = "sim")]
pub use crate::etcd::process::free_port;
pub use crate::rng::Rng;
#[cfg(feature = "sim")]
pub use crate::sim::probe::*;

/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `condition` until it holds, panicking with `what` once `within` has passed.
pub fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// The warnings logged by the calling thread while `f` runs (installs a capturing logger
/// for the whole test binary the first time).
pub fn warnings_of(f: impl FnOnce()) -> Vec<String> {
    struct Capture;
    type Lines = parking_lot::Mutex<Vec<(std::thread::ThreadId, String)>>;
    static LINES: Lines = parking_lot::Mutex::new(Vec::new());
    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                LINES.lock().push((std::thread::current().id(), record.args().to_string()));
            }
        }
        fn flush(&self) {}
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Warn);
    });
    let me = std::thread::current().id();
    f();
    let mut lines = LINES.lock();
    let (mine, others) = lines.drain(..).partition(|(thread, _)| *thread == me);
    *lines = others;
    mine.into_iter().map(|(_, line)| line).collect()
}
