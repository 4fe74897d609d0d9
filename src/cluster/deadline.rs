//! The tick's deadline, for every PD and TiKV call made on the tick's behalf (upstream hands
//! the tick a `context.Context` with `TickTimeout()`). The advancer runs a tick inside
//! [`within`]; each call on that thread takes [`bounded`] as its timeout: the time left at
//! most, and none at all once the deadline has passed. So a black-holed PD costs a tick its
//! budget, not an RPC deadline per call plus a leader re-discovery each.
//!
//! The deadline is scoped to the thread, as a context would be passed down: it reaches the
//! PD calls of the subscriber's topology update and of dialing a store without widening
//! every trait. The collector carries it onto its fan-out threads.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with every bounded call on this thread due by `deadline` (`None`: no new bound);
/// inside an outer deadline, the earlier one holds.
pub fn within<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    /// Puts the outer deadline back however `f` ends.
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.set(self.0);
        }
    }
    let outer = DEADLINE.get();
    let _restore = Restore(outer);
    DEADLINE.set(match (outer, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    });
    f()
}

/// The deadline in force on this thread, if any.
pub fn current() -> Option<Instant> {
    DEADLINE.get()
}

/// True once the deadline in force has passed.
pub fn passed() -> bool {
    current().is_some_and(|deadline| Instant::now() >= deadline)
}

/// `timeout`, shortened to the time left before the deadline in force; once it has passed,
/// an error naming `what`, so that the call is not even started.
pub fn bounded(timeout: Duration, what: &str) -> Result<Duration> {
    let Some(deadline) = current() else { return Ok(timeout) };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout(format!("{what} (its deadline has passed)")));
    }
    Ok(timeout.min(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_deadline_holds_and_the_outer_one_comes_back() {
        let hour = Duration::from_secs(3600);
        assert_eq!(bounded(hour, "a call").unwrap(), hour, "no deadline, no bound");
        let soon = Instant::now() + Duration::from_secs(5);
        within(Some(soon), || {
            assert!(bounded(hour, "a call").unwrap() <= Duration::from_secs(5));
            within(Some(soon + hour), || assert_eq!(current(), Some(soon), "a later inner deadline does not extend"));
            within(None, || assert_eq!(current(), Some(soon)));
            let past = Instant::now();
            within(Some(past), || {
                assert!(passed());
                let err = bounded(hour, "ScanRegions").unwrap_err().to_string();
                assert!(err.contains("ScanRegions") && err.contains("deadline"), "{err}");
            });
            assert_eq!(current(), Some(soon));
        });
        assert_eq!(current(), None);
        let unwound = std::panic::catch_unwind(|| within(Some(soon), || panic!("in a tick")));
        assert!(unwound.is_err());
        assert_eq!(current(), None, "a panic does not leave the deadline behind");
    }
}
