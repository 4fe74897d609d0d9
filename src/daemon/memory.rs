//! Handing the memory a big poll (or a tick's flush batches) freed back to the system.
//!
//! A poll of 10^6 regions allocates a few hundred MB for a moment (the regions of its scan,
//! its requests and answers, gRPC's buffers) on the threads that ran it. glibc keeps what
//! they free in those threads' arenas for reuse, so the process stayed that large between
//! polls (measured in docs/benchmarks.md, "Memory at 10^6 regions").

/// A poll of at least this many regions (or a merge of as many flush events) is followed
/// by a trim: smaller ones free too little to matter, and a trim walks every arena's free
/// lists (milliseconds at 10^6 regions).
pub(crate) const TRIM_AFTER_REGIONS: usize = 100_000;

/// Returns the free pages of every malloc arena to the system (glibc's `malloc_trim`); what
/// is still in use stays where it is. Elsewhere a no-op.
pub(crate) fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only takes glibc's arena locks and releases free pages.
        let released = unsafe { libc::malloc_trim(0) };
        log::debug!("gave freed memory back to the system ({released}) in {:?}", started.elapsed());
    }
}
