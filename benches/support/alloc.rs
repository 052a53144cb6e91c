//! A global allocator that counts live heap bytes and allocations, for the benches' memory
//! figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// Counts live heap bytes.
struct Counting;

pub(crate) static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Counts allocations (and reallocations), for "allocations per frame".
#[allow(dead_code)]
pub(crate) static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// While set, each allocation's size (and each free's, negated) is noted in `NOTED`: what one
/// stream's allocations are, for the liveness bench's `LIVENESS_SIZES=1`.
#[allow(dead_code)]
pub(crate) static NOTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
#[allow(dead_code)]
pub(crate) static NOTED: [AtomicIsize; 64] = [const { AtomicIsize::new(0) }; 64];
#[allow(dead_code)]
pub(crate) static NOTED_LEN: AtomicUsize = AtomicUsize::new(0);

fn note(size: isize) {
    if NOTING.load(Ordering::Relaxed) {
        let at = NOTED_LEN.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = NOTED.get(at) {
            slot.store(size, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        note(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        note(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        note(-(layout.size() as isize));
        note(new_size as isize);
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;
