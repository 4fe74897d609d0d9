//! What the unit tests, integration tests, benches and the binary's `sim` command share beyond
//! the API (raft-engine's `internals` habit): waiting on a condition with a deadline, free
//! loopback ports, a minimal HTTP client for the status server, and raw clients of the
//! simulated cluster's services. Not for host programs.

use std::time::{Duration, Instant};

pub use crate::daemon::status::{http_get, http_request};
#[cfg(feature = "sim")]
pub use crate::etcd::process::free_port;
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
