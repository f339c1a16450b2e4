//! [`is_zero`]: the zero-page test both ends use (QEMU's `buffer_is_zero`), written so the
//! compiler vectorizes it; and [`is_zero_shared`], the same test for memory that someone
//! else (a running guest) may write while it is read.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// Whether every byte of `buf` is zero.
///
/// Looks at the first, middle and last words first (a page with data usually shows it
/// there), then ORs 64-byte blocks together and tests each block's result once.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits off the
        // unaligned ends.
        unsafe { buf.align_to::<u64>() }
    };
    if head.iter().chain(tail).any(|&b| b != 0) {
        return false;
    }
    if let (Some(&a), Some(&m), Some(&z)) =
        (words.first(), words.get(words.len() / 2), words.last())
    {
        if a | m | z != 0 {
            return false;
        }
    }
    let mut blocks = words.chunks_exact(8);
    for block in &mut blocks {
        if block.iter().fold(0, |acc, &w| acc | w) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&w| w == 0)
}

/// Whether the `len` bytes at `ptr` are all zero, for memory that another party may write
/// meanwhile: the source's guest RAM while the guest runs. No reference to the bytes is
/// made (a `&[u8]` would promise they do not change); each word is read once with a
/// relaxed atomic load, so a concurrent write is never a data race on this side. The
/// answer describes some mix of before and after such a write; the migration saver copes
/// (the write sets the page's dirty bit after the bit was taken, and the page goes again).
///
/// # Safety
/// `ptr` must be 8-byte aligned and valid for reads of `len` bytes, `len` a multiple of
/// 8, for the whole call (the memory stays mapped).
#[inline]
pub unsafe fn is_zero_shared(ptr: *const u8, len: usize) -> bool {
    debug_assert!(ptr.align_offset(8) == 0 && len.is_multiple_of(8));
    let words = ptr.cast::<AtomicU64>();
    let n = len / 8;
    let load = |i: usize| {
        // SAFETY: `i < n`: inside the range the caller vouches for; aligned; AtomicU64
        // has u64's layout, and only atomic loads are made through it.
        unsafe { (*words.add(i)).load(Relaxed) }
    };
    if n > 0 && load(0) | load(n / 2) | load(n - 1) != 0 {
        return false;
    }
    let mut i = 0;
    while i + 8 <= n {
        let acc = (i..i + 8).fold(0, |acc, k| acc | load(k));
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    (i..n).all(|k| load(k) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_test_agrees_with_the_slice_test() {
        let mut buf = vec![0u64; 512 + 3];
        for len in [0usize, 1, 7, 8, 9, 512, 515] {
            let bytes = len * 8;
            let ptr = buf.as_ptr().cast::<u8>();
            // SAFETY: `buf` holds at least `len` aligned words and is not written during
            // the call.
            assert!(unsafe { is_zero_shared(ptr, bytes) });
            for i in 0..len {
                buf[i] = 1 << (i % 64);
                let ptr = buf.as_ptr().cast::<u8>();
                // SAFETY: as above.
                assert!(!unsafe { is_zero_shared(ptr, bytes) }, "len {len} word {i}");
                buf[i] = 0;
            }
        }
    }

    #[test]
    fn finds_any_non_zero_byte_at_any_alignment() {
        let mut buf = vec![0u8; 4096 + 16];
        for start in 0..9 {
            for len in [0, 1, 7, 8, 63, 64, 65, 4096] {
                let s = &mut buf[start..start + len];
                assert!(is_zero(s));
                for i in 0..len {
                    s[i] = 1;
                    assert!(!is_zero(s), "start {start} len {len} byte {i}");
                    s[i] = 0;
                }
            }
        }
    }
}
