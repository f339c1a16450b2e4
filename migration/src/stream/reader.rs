//! [`StreamReader`]: buffered reads off a transport that know their byte offset in the
//! stream, so every error can say where it happened, and that never allocate more than
//! the bytes that really arrived.

use std::io::{self, Read};

/// The default read buffer: 64 KiB. Small records (zero pages: eight bytes each) come in
/// thousands per read; runs of pages are read past it, straight into their destination
/// (see [`StreamReader::read_exact_direct`]), so a larger buffer would only mean more
/// page data copied through it.
const DEFAULT_BUFFER: usize = 64 * 1024;
/// Blobs are read in steps of this much: a declared length that the stream does not back
/// with bytes never becomes an allocation.
const BLOB_STEP: usize = 64 * 1024;

/// A read that could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream ended before the value did.
    #[error("stream truncated at byte {offset}: end of stream while reading {what}")]
    Eof {
        /// Where the value started.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// The transport failed (a reset connection, a timeout).
    #[error("transport error at byte {offset} while reading {what}: {source}")]
    Io {
        /// Where the value started.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// The transport's error.
        source: io::Error,
    },
}

impl ReadError {
    /// The stream offset the error is about.
    pub fn offset(&self) -> u64 {
        match self {
            ReadError::Eof { offset, .. } | ReadError::Io { offset, .. } => *offset,
        }
    }
}

/// A string as read off the stream: at most 255 bytes, unchecked.
pub struct RawStr {
    len: u8,
    bytes: [u8; 255],
}

impl RawStr {
    /// The bytes read.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Buffered, offset-tracking reads of the stream.
pub struct StreamReader<R: Read> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
}

impl<R: Read> StreamReader<R> {
    /// A reader with the default buffer.
    pub fn new(inner: R) -> StreamReader<R> {
        StreamReader::with_capacity(inner, DEFAULT_BUFFER)
    }

    /// A reader with a buffer of `cap` bytes (at least 64).
    pub fn with_capacity(inner: R, cap: usize) -> StreamReader<R> {
        StreamReader {
            inner,
            buf: vec![0; cap.max(64)].into_boxed_slice(),
            pos: 0,
            filled: 0,
            base: 0,
        }
    }

    /// The stream offset of the next byte to be read.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The transport.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Refills an empty buffer; false at the end of the stream.
    fn fill(&mut self, start: u64, what: &'static str) -> Result<bool, ReadError> {
        debug_assert_eq!(self.pos, self.filled);
        self.base += self.filled as u64;
        self.pos = 0;
        self.filled = 0;
        loop {
            match self.inner.read(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.filled = n.min(self.buf.len());
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ReadError::Io {
                        offset: start,
                        what,
                        source,
                    })
                }
            }
        }
    }

    /// Fills `dst` entirely; `what` names the value in errors.
    pub fn read_exact(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), ReadError> {
        let start = self.offset();
        let mut done = 0;
        while done < dst.len() {
            if self.pos == self.filled && !self.fill(start, what)? {
                return Err(ReadError::Eof {
                    offset: start,
                    what,
                });
            }
            let n = (self.filled - self.pos).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
        Ok(())
    }

    /// Fills `dst` entirely like [`read_exact`](Self::read_exact), but once the buffered
    /// bytes are used, reads the rest from the transport straight into `dst`, with no
    /// copy through the buffer: for bulk data such as runs of pages.
    pub fn read_exact_direct(
        &mut self,
        dst: &mut [u8],
        what: &'static str,
    ) -> Result<(), ReadError> {
        let start = self.offset();
        let n = (self.filled - self.pos).min(dst.len());
        dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        let mut done = n;
        if done == dst.len() {
            return Ok(());
        }
        // The buffer is used up: direct reads move the stream offset on by themselves.
        self.base += self.filled as u64;
        self.pos = 0;
        self.filled = 0;
        while done < dst.len() {
            match self.inner.read(&mut dst[done..]) {
                Ok(0) => {
                    return Err(ReadError::Eof {
                        offset: start,
                        what,
                    })
                }
                Ok(k) => {
                    let k = k.min(dst.len() - done);
                    done += k;
                    self.base += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ReadError::Io {
                        offset: start,
                        what,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// One byte.
    pub fn read_u8(&mut self, what: &'static str) -> Result<u8, ReadError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b, what)?;
        Ok(b[0])
    }

    /// A big-endian u16.
    pub fn read_u16(&mut self, what: &'static str) -> Result<u16, ReadError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    /// A big-endian u32.
    pub fn read_u32(&mut self, what: &'static str) -> Result<u32, ReadError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    /// A big-endian u64.
    #[inline]
    pub fn read_u64(&mut self, what: &'static str) -> Result<u64, ReadError> {
        if self.filled - self.pos >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
            self.pos += 8;
            return Ok(u64::from_be_bytes(b));
        }
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The bytes of a string of `len` bytes whose length byte was already read.
    pub fn read_str(&mut self, len: u8, what: &'static str) -> Result<RawStr, ReadError> {
        let mut s = RawStr {
            len,
            bytes: [0; 255],
        };
        self.read_exact(&mut s.bytes[..len as usize], what)?;
        Ok(s)
    }

    /// A blob of `len` bytes (the caller has capped `len`), allocated as it arrives.
    pub fn read_blob(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>, ReadError> {
        let start = self.offset();
        let mut v = Vec::with_capacity(len.min(BLOB_STEP));
        while v.len() < len {
            let n = (len - v.len()).min(BLOB_STEP);
            let at = v.len();
            v.resize(at + n, 0);
            self.read_exact(&mut v[at..], what).map_err(|e| match e {
                ReadError::Eof { what, .. } => ReadError::Eof {
                    offset: start,
                    what,
                },
                ReadError::Io { what, source, .. } => ReadError::Io {
                    offset: start,
                    what,
                    source,
                },
            })?;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out one byte per call, to cross every buffer edge.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(d)) => {
                    *d = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn values_across_refills_and_offsets() {
        let mut data = vec![0xab];
        data.extend_from_slice(&0x0102_0304u32.to_be_bytes());
        data.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        data.extend_from_slice(b"hello");
        let mut r = StreamReader::with_capacity(Trickle(&data), 3);
        assert_eq!(r.read_u8("a").unwrap(), 0xab);
        assert_eq!(r.read_u32("b").unwrap(), 0x0102_0304);
        assert_eq!(r.offset(), 5);
        assert_eq!(r.read_u64("c").unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(r.read_str(5, "d").unwrap().as_bytes(), b"hello");
        match r.read_u32("e") {
            Err(ReadError::Eof { offset: 18, what }) => assert_eq!(what, "e"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn direct_reads_keep_the_offset() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut r = StreamReader::with_capacity(Trickle(&data), 64);
        assert_eq!(r.read_u8("a").unwrap(), 0);
        let mut big = vec![0u8; 500];
        r.read_exact_direct(&mut big, "b").unwrap();
        assert_eq!(&big[..], &data[1..501]);
        assert_eq!(r.offset(), 501);
        assert_eq!(r.read_u8("c").unwrap(), data[501]);
        let mut rest = vec![0u8; 600];
        match r.read_exact_direct(&mut rest, "d") {
            Err(ReadError::Eof { offset: 502, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_blob_longer_than_the_stream_allocates_only_what_came() {
        let data = vec![5u8; 1000];
        let mut r = StreamReader::new(&data[..]);
        r.read_u8("x").unwrap();
        match r.read_blob(usize::MAX / 2, "blob") {
            Err(ReadError::Eof { offset: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
