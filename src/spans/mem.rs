//! The frontier's memory helpers, apart from the algorithm: arrays that grow by little and
//! sit on transparent huge pages, and cache-line prefetches.

/// Pushes onto a large, long-lived array growing it by 1/8 rather than doubling, so at most
/// 1/9 of it is slack. Growing moves the items into a fresh [`huge_vec`] rather than
/// `realloc`ing: a remapped block keeps the small pages it was faulted in with.
pub(super) fn grow_push<T>(v: &mut Vec<T>, item: T) {
    if v.len() == v.capacity() {
        let mut grown = huge_vec(v.len() + v.len() / 8 + 4);
        grown.append(v);
        *v = grown;
    }
    v.push(item);
}

/// An empty vector with room for exactly `capacity` items, backed by transparent huge pages
/// where the kernel allows them (it must be asked before the memory is first touched). At
/// 10^6 spans every update misses the caches twice, and with 4 KiB pages each miss also
/// walks the page tables, which huge pages make shorter and rarer (docs/benchmarks.md).
pub(super) fn huge_vec<T>(capacity: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(capacity);
    advise_huge_pages(v.as_mut_ptr().cast(), v.capacity() * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    const PAGE: usize = 4096;
    if len < HUGE_PAGE {
        return;
    }
    // madvise takes whole pages; the block's partial first and last pages are left alone.
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) / PAGE * PAGE;
    // SAFETY: the pages lie inside an allocation this process owns, and MADV_HUGEPAGE is
    // only advice: it changes no contents, and failure (e.g. THP disabled) is harmless.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

/// Asks for the cache line holding the start of `item` and the one holding its end (a
/// 48-byte record may straddle two), without waiting for them.
pub(super) fn prefetch<T: ?Sized>(item: &T) {
    let ptr: *const T = item;
    prefetch_line(ptr.cast());
    prefetch_line(ptr.cast::<u8>().wrapping_add(std::mem::size_of_val(item).saturating_sub(1)));
}

#[cfg(target_arch = "x86_64")]
pub(super) fn prefetch_line(ptr: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: SSE, which `_mm_prefetch` requires, is part of every x86-64 CPU. A prefetch
    // reads nothing into the program and never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn prefetch_line(_ptr: *const u8) {}
