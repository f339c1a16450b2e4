//! Pages lent to the [`StreamWriter`](super::StreamWriter) (guest memory it sends without
//! copying, see `StreamWriter::pages_lent`): the vectored send that hands them to the
//! transport, and the copy that ends their loans early.

use std::io::{self, IoSlice, Write};

/// Writes `buf` to `inner` with the `lent` pages in their places, without copying them.
pub(super) fn send_vectored<W: Write>(
    inner: &mut W,
    buf: &[u8],
    lent: &[(usize, *const u8, usize)],
) -> io::Result<()> {
    let mut iov = Vec::with_capacity(2 * lent.len() + 1);
    let mut last = 0;
    for &(end, page, len) in lent {
        if end > last {
            iov.push(IoSlice::new(&buf[last..end]));
        }
        // SAFETY: `pages_lent`'s contract: `len` readable bytes, mapped until the writer
        // next sends, releases or is consumed — which is now (`send_buffer`, which took
        // the loans out of the writer), and the slice does not outlive this function.
        iov.push(IoSlice::new(unsafe {
            std::slice::from_raw_parts(page, len)
        }));
        last = end;
    }
    if buf.len() > last {
        iov.push(IoSlice::new(&buf[last..]));
    }
    let mut slices = &mut iov[..];
    while !slices.is_empty() {
        match inner.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends the `len` bytes at `src` to `dst`, reading them a word at a time with relaxed
/// atomic loads (bytes at the unaligned ends one by one): lent pages are guest memory that
/// a running guest may write meanwhile, so no reference to them is made (see
/// [`crate::is_zero_shared`]). A page written during the copy goes out mixed; its dirty
/// bit is set again and it is sent again.
///
/// # Safety
/// `src..src + len` must be mapped and readable for the whole call.
pub(super) unsafe fn copy_shared(src: *const u8, len: usize, dst: &mut Vec<u8>) {
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
    dst.reserve(len);
    let head = src.align_offset(8).min(len);
    let words = (len - head) / 8;
    let byte = |i: usize| {
        // SAFETY: `i < len`, inside the range the caller vouches for; only atomic loads
        // are made through the pointer.
        unsafe { (*src.add(i).cast::<AtomicU8>()).load(Relaxed) }
    };
    dst.extend((0..head).map(byte));
    let aligned = src.wrapping_add(head).cast::<AtomicU64>();
    for w in 0..words {
        // SAFETY: word `w` lies inside the range (head + 8 × words <= len) and is
        // 8-byte aligned.
        let v = unsafe { (*aligned.add(w)).load(Relaxed) };
        dst.extend_from_slice(&v.to_ne_bytes());
    }
    dst.extend((head + 8 * words..len).map(byte));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_shared_copies_any_range_at_any_alignment() {
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 63, 64, 100, 191 - start] {
                let mut dst = vec![0xee];
                // SAFETY: `src[start..start + len]` is inside `src`, unchanged meanwhile.
                unsafe { copy_shared(src.as_ptr().add(start), len, &mut dst) };
                assert_eq!(dst[0], 0xee);
                assert_eq!(
                    &dst[1..],
                    &src[start..start + len],
                    "start {start} len {len}"
                );
            }
        }
    }
}
