//! Handing the memory a big poll (or a tick's flush batches) freed back to the system.
//!
//! A poll of 10^6 regions allocates a few hundred MB for a moment (the regions of its scan,
//! its requests and answers, gRPC's buffers) on the threads that ran it. glibc keeps what
//! they free in those threads' arenas for reuse, so the process stayed that large between
//! polls (measured in docs/benchmarks.md, "Memory at 10^6 regions").

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A poll of at least this many regions (or a merge of as many flush events) is followed
/// by a trim: smaller ones free too little to matter, and a trim walks every arena's free
/// lists (milliseconds at 10^6 regions).
pub(crate) const TRIM_AFTER_REGIONS: usize = 100_000;

/// A tick's flush batches are trimmed away at most this often. At 10^6 regions every tick
/// merges ~400 000 events (~30 MB of batches, freed in the stream threads' arenas, which
/// the next messages reuse); trimming them each tick made the stream threads fault those
/// pages in again, a few percent of the process's CPU (docs/benchmarks.md, "The
/// flush-event path at 10^6", session 6).
pub(crate) const FLUSH_TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// When memory was last given back, process-wide as `malloc_trim` is.
static LAST_TRIM: Mutex<Option<Instant>> = Mutex::new(None);

/// Returns the free pages of every malloc arena to the system (glibc's `malloc_trim`); what
/// is still in use stays where it is. Elsewhere a no-op.
pub(crate) fn give_back_freed_memory() {
    *LAST_TRIM.lock() = Some(Instant::now());
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only takes glibc's arena locks and releases free pages.
        let released = unsafe { libc::malloc_trim(0) };
        log::debug!("gave freed memory back to the system ({released}) in {:?}", started.elapsed());
    }
}

/// [`give_back_freed_memory`] unless memory was given back less than `interval` ago;
/// returns whether it was.
pub(crate) fn give_back_freed_memory_unless_within(interval: Duration) -> bool {
    let recent = LAST_TRIM.lock().is_some_and(|last| last.elapsed() < interval);
    if !recent {
        give_back_freed_memory();
    }
    !recent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_skipped_only_within_the_interval_of_the_last_one() {
        give_back_freed_memory();
        assert!(!give_back_freed_memory_unless_within(Duration::from_secs(3600)));
        assert!(give_back_freed_memory_unless_within(Duration::ZERO));
        assert!(!give_back_freed_memory_unless_within(Duration::from_secs(3600)));
    }
}
