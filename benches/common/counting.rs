//! A global allocator that counts allocations and live bytes, for benches that report
//! allocations per operation and bytes per item.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

pub static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Bytes asked for and not freed yet.
pub static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// What those cost in glibc's heap: each chunk has an 8-byte header, 16-byte alignment and
/// a 32-byte minimum.
pub static LIVE_CHUNK_BYTES: AtomicUsize = AtomicUsize::new(0);

fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

// SAFETY: forwards every call to the system allocator unchanged; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        LIVE_CHUNK_BYTES.fetch_add(chunk(layout.size()), Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        LIVE_CHUNK_BYTES.fetch_sub(chunk(layout.size()), Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        LIVE_BYTES.fetch_add(new_size, Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        LIVE_CHUNK_BYTES.fetch_add(chunk(new_size), Relaxed);
        LIVE_CHUNK_BYTES.fetch_sub(chunk(layout.size()), Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}
