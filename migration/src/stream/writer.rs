//! [`StreamWriter`]: encodes the stream's header, sections and records into a buffer and
//! hands it to any [`io::Write`] in large writes, counting bytes and, when asked, holding
//! to a rate limit.

use super::format::{PageRecord, SectionKind, MAGIC, PAGE_SIZE, VERSION};
use super::rate::RateLimiter;
use ramlist::MAX_ID_LEN;
use std::io::{self, Write};
use std::time::Instant;

/// The default buffer: 512 KiB, a hundred-odd pages per write to the transport.
pub const DEFAULT_BUFFER: usize = 512 * 1024;

/// The smallest buffer: one page record with the longest idstr must fit.
const MIN_BUFFER: usize = PAGE_SIZE as usize + 8 + 1 + MAX_ID_LEN;

/// A buffered encoder of the migration stream over a transport.
///
/// The record methods keep the one piece of state the layout needs on this side: the block
/// of the previous page record of the section, so that a page of the same block is sent
/// with CONTINUE instead of its idstr. Nothing reaches the transport until the buffer
/// fills or [`flush`](Self::flush) is called.
pub struct StreamWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    cap: usize,
    /// Bytes encoded so far (buffered or sent).
    written: u64,
    /// Bytes handed to the transport.
    sent: u64,
    limiter: Option<RateLimiter>,
    /// The block of the previous page record in this section.
    last_id: Option<String>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl<W: Write> StreamWriter<W> {
    /// A writer with the default buffer.
    pub fn new(inner: W) -> StreamWriter<W> {
        StreamWriter::with_capacity(inner, DEFAULT_BUFFER)
    }

    /// A writer whose buffer holds `cap` bytes (raised to one page record at least).
    pub fn with_capacity(inner: W, cap: usize) -> StreamWriter<W> {
        let cap = cap.max(MIN_BUFFER);
        StreamWriter {
            inner,
            buf: Vec::with_capacity(cap),
            cap,
            written: 0,
            sent: 0,
            limiter: None,
            last_id: None,
        }
    }

    /// Limits the transport to `bytes_per_sec` (None: no limit), with a token bucket on
    /// real time: a write waits, sleeping, until its bytes are credited.
    pub fn set_rate_limit(&mut self, bytes_per_sec: Option<u64>) {
        self.limiter = bytes_per_sec.map(RateLimiter::new);
    }

    /// The limit set, in bytes per second.
    pub fn rate_limit(&self) -> Option<u64> {
        self.limiter.as_ref().map(RateLimiter::rate)
    }

    /// Bytes of stream encoded so far, buffered or sent.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Bytes handed to the transport so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Whether sending what is buffered would wait for the rate limit now: a caller
    /// holding a read-side section ends its batch and flushes outside it instead of
    /// sleeping inside it.
    pub fn is_throttled(&mut self) -> bool {
        let pending = self.buf.len() as u64;
        self.limiter
            .as_mut()
            .is_some_and(|l| !l.has_credit_at(pending, Instant::now()))
    }

    /// Sends what is buffered, then flushes the transport.
    pub fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()?;
        self.inner.flush()
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Flushes and returns the transport.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.flush()?;
        let StreamWriter { inner, .. } = self;
        Ok(inner)
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(l) = &mut self.limiter {
            l.take(self.buf.len() as u64);
        }
        self.inner.write_all(&self.buf)?;
        self.sent += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Makes room for `n` more bytes in the buffer.
    #[inline]
    fn room(&mut self, n: usize) -> io::Result<()> {
        if self.buf.len() + n > self.cap {
            self.send_buffer()?;
        }
        Ok(())
    }

    /// Appends raw bytes (for hand-made streams; records use the methods below).
    pub fn put_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        if b.len() > self.cap {
            self.send_buffer()?;
            if let Some(l) = &mut self.limiter {
                l.take(b.len() as u64);
            }
            self.inner.write_all(b)?;
            self.sent += b.len() as u64;
        } else {
            self.room(b.len())?;
            self.buf.extend_from_slice(b);
        }
        self.written += b.len() as u64;
        Ok(())
    }

    /// Appends one byte.
    pub fn put_u8(&mut self, v: u8) -> io::Result<()> {
        self.put_bytes(&[v])
    }

    /// Appends a big-endian u32.
    pub fn put_u32(&mut self, v: u32) -> io::Result<()> {
        self.put_bytes(&v.to_be_bytes())
    }

    /// Appends a big-endian u64.
    pub fn put_u64(&mut self, v: u64) -> io::Result<()> {
        self.put_bytes(&v.to_be_bytes())
    }

    /// Appends an idstr: its length byte, then its bytes. Refuses what a loader would.
    pub fn put_idstr(&mut self, id: &str) -> io::Result<()> {
        if id.is_empty() || id.len() > MAX_ID_LEN || id.contains('\0') {
            return Err(invalid(format!("{id:?} cannot be a stream idstr")));
        }
        self.room(1 + id.len())?;
        self.buf.push(id.len() as u8);
        self.buf.extend_from_slice(id.as_bytes());
        self.written += 1 + id.len() as u64;
        Ok(())
    }

    /// The stream header: magic and version.
    pub fn header(&mut self) -> io::Result<()> {
        self.put_u32(MAGIC)?;
        self.put_u32(VERSION)
    }

    /// A RAM_SETUP section listing `blocks` as (idstr, length).
    pub fn ram_setup<'a>(
        &mut self,
        blocks: impl ExactSizeIterator<Item = (&'a str, u64)>,
    ) -> io::Result<()> {
        let count = u32::try_from(blocks.len())
            .map_err(|_| invalid(format!("{} blocks in a RAM setup", blocks.len())))?;
        self.put_u8(SectionKind::RamSetup as u8)?;
        self.put_u32(PAGE_SIZE as u32)?;
        self.put_u32(count)?;
        for (id, len) in blocks {
            self.put_idstr(id)?;
            self.put_u64(len)?;
        }
        Ok(())
    }

    /// Opens a RAM section; records follow, then [`eos`](Self::eos).
    pub fn begin_ram(&mut self) -> io::Result<()> {
        self.last_id = None;
        self.put_u8(SectionKind::Ram as u8)
    }

    fn page_header(&mut self, id: &str, rec: impl FnOnce(bool) -> PageRecord) -> io::Result<()> {
        let cont = self.last_id.as_deref() == Some(id);
        let rec = rec(cont);
        let offset = match rec {
            PageRecord::Zero { offset, .. } | PageRecord::Page { offset, .. } => offset,
            _ => 0,
        };
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(format!(
                "page offset {offset:#x} of {id:?} is unaligned"
            )));
        }
        self.put_u64(rec.encode())?;
        if !cont {
            self.put_idstr(id)?;
            self.last_id = Some(id.to_string());
        }
        Ok(())
    }

    /// A zero page at `offset` of block `id`: its word (and idstr) only.
    pub fn zero_page(&mut self, id: &str, offset: u64) -> io::Result<()> {
        self.page_header(id, |cont| PageRecord::Zero { offset, cont })
    }

    /// A page of data at `offset` of block `id`.
    pub fn page(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 != PAGE_SIZE {
            return Err(invalid(format!("a page of {} bytes", data.len())));
        }
        // Header and data in one buffer pass: reserve for both first.
        self.room(8 + 1 + id.len() + data.len())?;
        self.page_header(id, |cont| PageRecord::Page { offset, cont })?;
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// The source added block `id` of `len` bytes.
    pub fn block_add(&mut self, id: &str, len: u64) -> io::Result<()> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(format!("block {id:?} of {len:#x} bytes")));
        }
        self.last_id = None;
        self.put_u64(PageRecord::BlockAdd { len }.encode())?;
        self.put_idstr(id)
    }

    /// The source removed block `id`.
    pub fn block_del(&mut self, id: &str) -> io::Result<()> {
        self.last_id = None;
        self.put_u64(PageRecord::BlockDel.encode())?;
        self.put_idstr(id)
    }

    /// Ends a RAM section.
    pub fn eos(&mut self) -> io::Result<()> {
        self.last_id = None;
        self.put_u64(PageRecord::Eos.encode())
    }

    /// A STATE section: component `name`'s opaque blob.
    pub fn state(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| invalid(format!("state {name:?} of {} bytes", data.len())))?;
        self.put_u8(SectionKind::State as u8)?;
        self.put_idstr(name)?;
        self.put_u32(len)?;
        self.put_bytes(data)
    }

    /// The end marker (then [`flush`](Self::flush)).
    pub fn end(&mut self) -> io::Result<()> {
        self.put_u8(SectionKind::End as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_one_block_continue_and_bytes_are_counted() {
        let mut w = StreamWriter::with_capacity(Vec::new(), 0);
        w.header().unwrap();
        w.begin_ram().unwrap();
        let page = vec![7u8; PAGE_SIZE as usize];
        w.page("a", 0, &page).unwrap();
        w.zero_page("a", PAGE_SIZE).unwrap();
        w.zero_page("b", 0).unwrap();
        w.block_del("c").unwrap();
        w.zero_page("b", PAGE_SIZE).unwrap();
        w.eos().unwrap();
        let total = w.bytes_written();
        let out = w.into_inner().unwrap();
        assert_eq!(out.len() as u64, total);
        let mut want = Vec::new();
        want.extend_from_slice(b"MVMS\0\0\0\x01\x02");
        want.extend_from_slice(&(0x02u64).to_be_bytes());
        want.extend_from_slice(b"\x01a");
        want.extend_from_slice(&page);
        want.extend_from_slice(&(PAGE_SIZE | 0x05).to_be_bytes());
        want.extend_from_slice(&(0x01u64).to_be_bytes());
        want.extend_from_slice(b"\x01b");
        want.extend_from_slice(&(0x20u64).to_be_bytes());
        want.extend_from_slice(b"\x01c");
        want.extend_from_slice(&(PAGE_SIZE | 0x01).to_be_bytes());
        want.extend_from_slice(b"\x01b");
        want.extend_from_slice(&(0x08u64).to_be_bytes());
        assert_eq!(out, want);
    }

    #[test]
    fn bad_values_are_refused_before_encoding() {
        let mut w = StreamWriter::new(Vec::new());
        assert!(w.put_idstr("").is_err());
        assert!(w.put_idstr(&"x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(w.zero_page("a", 5).is_err());
        assert!(w.page("a", 0, &[0; 10]).is_err());
        assert!(w.block_add("a", 100).is_err());
        assert_eq!(w.bytes_written(), 0);
    }

    #[test]
    fn large_writes_go_straight_through() {
        let mut w = StreamWriter::with_capacity(Vec::new(), 0);
        w.put_u8(1).unwrap();
        let big = vec![3u8; 3 * MIN_BUFFER];
        w.put_bytes(&big).unwrap();
        assert_eq!(w.bytes_sent(), 1 + big.len() as u64);
        let out = w.into_inner().unwrap();
        assert_eq!(out.len(), 1 + big.len());
    }
}
