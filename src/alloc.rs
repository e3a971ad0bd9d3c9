//! The binary's global allocator: mimalloc, asked for plain blocks whenever plain blocks are
//! aligned enough.
//!
//! The `mimalloc` crate's allocator passes every request to `mi_malloc_aligned`. That call's
//! fast path serves only blocks up to 1 KiB whose next free block happens to be aligned;
//! anything larger (hyper's read and write buffers, the boxed request futures, header maps)
//! takes mimalloc's generic aligned path, about 200 instructions each, six times on a 2 KiB
//! request. Most Rust allocations ask for an alignment of 8 or less, and every mimalloc block
//! has it, so those go to `mi_malloc`, `mi_zalloc` and `mi_realloc` directly; larger
//! alignments still go to the aligned calls. `benches/hot_paths.rs` (`alloc/…`) compares the
//! two allocators on the sizes a request allocates.

// The one module besides the trim scanner's SIMD code that needs `unsafe`: `GlobalAlloc` is an
// unsafe trait, and mimalloc is a C library. Each block says why it is sound.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// The largest alignment every mimalloc block has without asking: blocks are whole machine
/// words (the size classes are counted in words: 8, 16, 24, ... bytes) and start at
/// word-aligned offsets of word-aligned pages. 16 is not guaranteed: a 24-byte block may start
/// 8 bytes past a 16-byte boundary.
const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc, with plain (unaligned) calls where the alignment allows them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mimalloc;

// SAFETY: each method forwards to the mimalloc call that meets `GlobalAlloc`'s contract for the
// given layout:
// - `mi_malloc`, `mi_zalloc` and `mi_realloc` return blocks aligned to at least `PLAIN_ALIGN`
//   (see its comment), so they are used only when `layout.align() <= PLAIN_ALIGN`; the
//   `*_aligned` calls, which take the alignment, are used otherwise;
// - every call returns null on failure, as `GlobalAlloc` requires, and never unwinds;
// - `mi_free` frees a block from any of these calls (mimalloc finds the block's page from the
//   pointer; aligned blocks are ordinary blocks with an offset it records);
// - `mi_realloc` / `mi_realloc_aligned` keep the first `min(old, new)` bytes and free the old
//   block only on success, as `GlobalAlloc::realloc` requires.
// The mimalloc crate's own `MiMalloc` makes the same calls, always in their aligned form.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment; the size is non-zero (the caller's contract).
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc.
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract); the
        // alignment is kept, and chosen between the plain and aligned calls as in `alloc`.
        unsafe {
            if layout.align() <= PLAIN_ALIGN {
                ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class up to 64 KiB, at every alignment from 1 to 4 KiB: each block is
    /// aligned, writable to its end, and keeps its bytes through a `realloc`.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let alloc = Mimalloc;
        let mut sizes: Vec<usize> = (1..=256).collect();
        sizes.extend((9..=16).map(|shift| 1usize << shift));
        sizes.extend([24, 40, 1000, 1025, 3000, 5000, 12_345, 65_537]);
        for &size in &sizes {
            for align in (0..=12).map(|shift| 1usize << shift) {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // Several at once, so that blocks after the first in a page are checked too.
                let blocks: Vec<*mut u8> = (0..4)
                    .map(|i| {
                        // SAFETY: the layout's size is non-zero.
                        let p = unsafe {
                            if i % 2 == 0 {
                                alloc.alloc(layout)
                            } else {
                                alloc.alloc_zeroed(layout)
                            }
                        };
                        assert!(!p.is_null(), "size {size} align {align}");
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        if i % 2 == 1 {
                            // SAFETY: `p` points to `size` bytes just allocated.
                            let zeroed = unsafe { std::slice::from_raw_parts(p, size) };
                            assert!(zeroed.iter().all(|&b| b == 0), "size {size}");
                        }
                        // SAFETY: `p` points to `size` writable bytes.
                        unsafe { std::ptr::write_bytes(p, 0xA5, size) };
                        p
                    })
                    .collect();
                for p in blocks {
                    let grown = size * 3 + 7;
                    // SAFETY: `p` came from `alloc` with `layout`; the new size is non-zero.
                    let q = unsafe { alloc.realloc(p, layout, grown) };
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                    // SAFETY: the first `size` bytes were kept; `q` has `grown` bytes.
                    let kept = unsafe { std::slice::from_raw_parts(q, size) };
                    assert!(kept.iter().all(|&b| b == 0xA5), "size {size} align {align}");
                    let grown_layout = Layout::from_size_align(grown, align).expect("layout");
                    // SAFETY: `q` came from this allocator with `grown_layout`.
                    unsafe { alloc.dealloc(q, grown_layout) };
                }
            }
        }
    }
}
