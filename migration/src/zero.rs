//! [`is_zero`]: the zero-page test both ends use (QEMU's `buffer_is_zero`), written so the
//! compiler vectorizes it.

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

#[cfg(test)]
mod tests {
    use super::*;

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
