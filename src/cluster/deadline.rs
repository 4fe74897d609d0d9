//! The tick's deadline and stop, for every PD and TiKV call made on the tick's behalf
//! (upstream hands the tick a `context.Context` with `TickTimeout()`); a status read has a
//! deadline too. The advancer runs a tick inside a [`Scope`]; each call on that thread takes
//! [`bounded`] as its timeout (the time left at most, and none at all once the deadline has
//! passed or the scope was interrupted) and waits through [`block_on`], which the scope's
//! [`Interrupt`] ends. So a black-holed PD or a hung store costs a tick its budget, not an
//! RPC deadline per call plus a leader re-discovery each, and stopping costs nothing.
//!
//! The scope belongs to the thread, as a context would be passed down: it reaches the PD
//! calls of the subscriber's topology update and of dialing a store without widening every
//! trait. The collector carries it onto its fan-out threads.

use std::cell::RefCell;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::worker::Interrupt;

thread_local! {
    static SCOPE: RefCell<Scope> = RefCell::default();
}

/// What bounds the calls made on a thread: a deadline, and an interrupt that ends them.
#[derive(Clone, Default)]
pub struct Scope {
    pub deadline: Option<Instant>,
    pub interrupt: Option<Interrupt>,
}

impl Scope {
    /// The scope in force on this thread.
    pub fn current() -> Scope {
        SCOPE.with(|scope| scope.borrow().clone())
    }

    /// Runs `f` within this scope, then puts the outer one back however `f` ends.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<Scope>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(outer) = self.0.take() {
                    SCOPE.with(|scope| *scope.borrow_mut() = outer);
                }
            }
        }
        let outer = SCOPE.with(|scope| std::mem::replace(&mut *scope.borrow_mut(), self));
        let _restore = Restore(Some(outer));
        f()
    }

    fn interrupted(&self) -> bool {
        self.interrupt.as_ref().is_some_and(Interrupt::is_fired)
    }
}

/// Runs `f` with every bounded call on this thread due by `deadline` (`None`: no new bound);
/// inside an outer deadline, the earlier one holds.
pub fn within<T>(deadline: Option<Instant>, f: impl FnOnce() -> T) -> T {
    let outer = Scope::current();
    let deadline = match (outer.deadline, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Scope { deadline, ..outer }.run(f)
}

/// True once the deadline in force has passed, or the scope was interrupted.
pub fn passed() -> bool {
    let scope = Scope::current();
    scope.interrupted() || scope.deadline.is_some_and(|deadline| Instant::now() >= deadline)
}

/// `timeout`, shortened to the time left before the deadline in force; once it has passed
/// (or the scope was interrupted), an error naming `what`, so that the call is not even
/// started.
pub fn bounded(timeout: Duration, what: &str) -> Result<Duration> {
    let scope = Scope::current();
    if scope.interrupted() {
        return Err(Error::Stopped(what.to_string()));
    }
    let Some(deadline) = scope.deadline else { return Ok(timeout) };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout(format!("{what} (its deadline has passed)")));
    }
    Ok(timeout.min(left))
}

/// A retry's backoff: `duration`, ended early by the scope's interrupt (then `Err`).
pub fn sleep(duration: Duration, what: &str) -> Result<()> {
    match Scope::current().interrupt {
        Some(interrupt) if interrupt.sleep(duration) => Err(Error::Stopped(what.to_string())),
        Some(_) => Ok(()),
        None => {
            std::thread::sleep(duration);
            Ok(())
        }
    }
}

/// Waits for `future` (a call already bounded in time) on this thread, unless the scope's
/// interrupt fires first: then the future is dropped (a gRPC call with it is cancelled).
pub fn block_on<F: Future>(future: F, what: &str) -> Result<F::Output> {
    match Scope::current().interrupt {
        Some(interrupt) => interrupt.block_on(future).ok_or_else(|| Error::Stopped(what.to_string())),
        None => Ok(futures_executor::block_on(future)),
    }
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
            within(Some(soon + hour), || {
                assert_eq!(Scope::current().deadline, Some(soon), "a later inner deadline does not extend")
            });
            within(None, || assert_eq!(Scope::current().deadline, Some(soon)));
            let past = Instant::now();
            within(Some(past), || {
                assert!(passed());
                let err = bounded(hour, "ScanRegions").unwrap_err().to_string();
                assert!(err.contains("ScanRegions") && err.contains("deadline"), "{err}");
            });
            assert_eq!(Scope::current().deadline, Some(soon));
        });
        assert_eq!(Scope::current().deadline, None);
        let unwound = std::panic::catch_unwind(|| within(Some(soon), || panic!("in a tick")));
        assert!(unwound.is_err());
        assert_eq!(Scope::current().deadline, None, "a panic does not leave the deadline behind");
    }

    #[test]
    fn an_interrupted_scope_starts_no_call_and_ends_waits() {
        let interrupt = Interrupt::default();
        let scope = Scope { deadline: None, interrupt: Some(interrupt.clone()) };
        scope.run(|| {
            assert_eq!(block_on(async { 1 }, "a call").unwrap(), 1);
            interrupt.fire();
            assert!(passed());
            let err = block_on(std::future::pending::<()>(), "GetLastFlushTSOfRegion").unwrap_err();
            assert!(matches!(err, Error::Stopped(ref what) if what == "GetLastFlushTSOfRegion"), "{err}");
            assert!(matches!(bounded(Duration::from_secs(1), "dialing"), Err(Error::Stopped(_))));
            within(Some(Instant::now() + Duration::from_secs(60)), || assert!(passed(), "a deadline keeps the stop"));
            let began = Instant::now();
            assert!(matches!(sleep(Duration::from_secs(60), "a backoff"), Err(Error::Stopped(_))));
            assert!(began.elapsed() < Duration::from_secs(60), "a fired interrupt ends a backoff at once");
        });
        assert!(!passed(), "outside the scope nothing is stopped");
    }
}
