//! [`StreamWriter`]: encodes the stream's header, sections and records into a buffer and
//! hands it to any [`io::Write`] in large writes, counting bytes and, when asked, holding
//! to a rate limit. Pages may be lent instead of copied: they then go from guest memory to
//! the transport in one vectored write.

use super::format::{
    BlockFlags, BlockRuns, PageRecord, SectionKind, MAGIC, MAX_RUN_PAGES, PAGE_SIZE, VERSION,
};
use super::lent::{copy_shared, send_vectored};
use super::rate::RateLimiter;
use ramlist::MAX_ID_LEN;
use std::io::{self, Write};
use std::time::Instant;

/// The default buffer: 512 KiB, a hundred-odd pages per write to the transport.
pub const DEFAULT_BUFFER: usize = 512 * 1024;

/// The smallest buffer: one page record with the longest idstr must fit.
const MIN_BUFFER: usize = PAGE_SIZE as usize + 8 + 1 + MAX_ID_LEN;

/// The most pages lent at once: each costs two iovecs of one vectored write, which the
/// kernel takes up to 1024 of.
const MAX_LENT: usize = 500;

/// A buffered encoder of the migration stream over a transport.
///
/// The record methods keep the one piece of state the layout needs on this side: the block
/// of the previous page record of the section, so that a page of the same block is sent
/// with CONTINUE instead of its idstr. Nothing reaches the transport until the buffer
/// fills or [`flush`](Self::flush) is called.
pub struct StreamWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    /// Pages lent by [`pages_lent`](Self::pages_lent), in order, as (end, pointer,
    /// length): each goes out after `buf[..end]` (and after the previous lent pages).
    lent: Vec<(usize, *const u8, usize)>,
    /// Bytes lent and not sent yet.
    lent_bytes: usize,
    cap: usize,
    /// Bytes encoded so far (buffered or sent).
    written: u64,
    /// Bytes handed to the transport.
    sent: u64,
    limiter: Option<RateLimiter>,
    /// The block of the previous page record in this section.
    last_id: Option<String>,
}

// SAFETY: the raw pointers are pages lent by `pages_lent`, whose contract (mapped until
// the writer next sends or releases them) is about the memory's lifetime, not about the
// thread that reads it; the writer reads them only through `&mut self`.
unsafe impl<W: Write + Send> Send for StreamWriter<W> {}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Refuses an idstr a loader would refuse. Every record method checks its ids before it
/// encodes a byte, so a refused record leaves nothing of itself in the stream.
fn check_idstr(id: &str) -> io::Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.contains('\0') {
        return Err(invalid(format!("{id:?} cannot be a stream idstr")));
    }
    Ok(())
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
            lent: Vec::new(),
            lent_bytes: 0,
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
        self.would_wait(0)
    }

    /// Whether sending what is buffered plus `more` bytes would wait for the rate limit
    /// now. A caller about to encode up to `more` bytes under a read-side section asks
    /// this first: when it says no, any send those bytes cause (a full buffer) goes
    /// within the credit there is, without sleeping.
    pub fn would_wait(&mut self, more: u64) -> bool {
        let wanted = (self.pending() as u64).saturating_add(more);
        self.limiter
            .as_mut()
            .is_some_and(|l| !l.has_credit_at(wanted, Instant::now()))
    }

    /// Sends what is buffered, then flushes the transport.
    pub fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()?;
        self.inner.flush()
    }

    /// Swaps the transport for `inner` (post-copy recovery: a new connection), dropping
    /// whatever was buffered or lent for the old one; the next record opens a section
    /// afresh.
    pub fn replace_inner(&mut self, inner: W) -> W {
        self.buf.clear();
        self.lent.clear();
        self.lent_bytes = 0;
        self.last_id = None;
        std::mem::replace(&mut self.inner, inner)
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

    /// Bytes waiting to go: the buffer and the lent pages.
    fn pending(&self) -> usize {
        self.buf.len() + self.lent_bytes
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        let pending = self.pending();
        if pending == 0 {
            return Ok(());
        }
        if let Some(l) = &mut self.limiter {
            l.take(pending as u64);
        }
        // What is pending leaves the writer before the transport sees it: whether the
        // transport fails or panics, no loan survives into a later send (its lender may
        // unmap the pages once the call that lent them is gone, unwinding included).
        let lent = std::mem::take(&mut self.lent);
        self.lent_bytes = 0;
        let mut buf = std::mem::take(&mut self.buf);
        let r = if lent.is_empty() {
            self.inner.write_all(&buf)
        } else {
            send_vectored(&mut self.inner, &buf, &lent)
        };
        // On error the stream is dead: what was pending is dropped, loans included.
        buf.clear();
        self.buf = buf;
        self.lent = lent;
        self.lent.clear();
        r?;
        self.sent += pending as u64;
        Ok(())
    }

    /// Makes room for `n` more bytes in the buffer.
    #[inline]
    fn room(&mut self, n: usize) -> io::Result<()> {
        if self.pending() + n > self.cap {
            self.send_buffer()?;
        }
        Ok(())
    }

    /// Copies the pages lent so far into the writer's own buffer, ending their loans (the
    /// lender may then unmap them). Costs one copy of at most a buffer's worth.
    pub fn release_lent(&mut self) {
        if self.lent.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(self.cap.max(self.pending()));
        let mut last = 0;
        for &(end, page, len) in &self.lent {
            buf.extend_from_slice(&self.buf[last..end]);
            // SAFETY: as in `send_vectored`: the loan runs until this call ends it.
            unsafe { copy_shared(page, len, &mut buf) };
            last = end;
        }
        buf.extend_from_slice(&self.buf[last..]);
        self.buf = buf;
        self.lent.clear();
        self.lent_bytes = 0;
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
        check_idstr(id)?;
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

    /// A RAM_SETUP section listing `blocks` as (idstr, length), with no block flags.
    pub fn ram_setup<'a>(
        &mut self,
        blocks: impl ExactSizeIterator<Item = (&'a str, u64)>,
    ) -> io::Result<()> {
        self.ram_setup_flagged(blocks.map(|(id, len)| (id, len, BlockFlags::NONE)))
    }

    /// A RAM_SETUP section listing `blocks` as (idstr, length, flags).
    pub fn ram_setup_flagged<'a>(
        &mut self,
        blocks: impl ExactSizeIterator<Item = (&'a str, u64, BlockFlags)>,
    ) -> io::Result<()> {
        // Every entry is checked before the section's first byte, and the count is the
        // entries' own (not the iterator's word for it).
        let blocks: Vec<_> = blocks.collect();
        let count = u32::try_from(blocks.len())
            .map_err(|_| invalid(format!("{} blocks in a RAM setup", blocks.len())))?;
        for &(id, len, flags) in &blocks {
            check_idstr(id)?;
            if !len.is_multiple_of(PAGE_SIZE) || flags.0 & !BlockFlags::KNOWN.0 != 0 {
                return Err(invalid(format!(
                    "block {id:?} of {len:#x} bytes with flags {:#x}",
                    flags.0
                )));
            }
        }
        self.put_u8(SectionKind::RamSetup as u8)?;
        self.put_u32(PAGE_SIZE as u32)?;
        self.put_u32(count)?;
        for (id, len, flags) in blocks {
            self.put_idstr(id)?;
            self.put_u64(len | flags.0)?;
        }
        Ok(())
    }

    /// Opens a RAM section; records follow, then [`eos`](Self::eos).
    pub fn begin_ram(&mut self) -> io::Result<()> {
        self.last_id = None;
        self.put_u8(SectionKind::Ram as u8)
    }

    fn page_header(&mut self, id: &str, rec: impl FnOnce(bool) -> PageRecord) -> io::Result<()> {
        check_idstr(id)?;
        let cont = self.last_id.as_deref() == Some(id);
        let rec = rec(cont);
        let offset = match rec {
            PageRecord::Zero { offset, .. }
            | PageRecord::Page { offset, .. }
            | PageRecord::Run { offset, .. } => offset,
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

    /// A run of `count` consecutive pages of block `id` from `offset` (one PAGE record
    /// when `count` is 1, else one PAGE|MANY record), without copying the data into the
    /// buffer: it goes from `data` to the transport in a vectored write when the buffer is
    /// next sent.
    ///
    /// # Safety
    /// `data` must point to `count` × [`PAGE_SIZE`] bytes that stay mapped and readable
    /// until this writer's next [`flush`](Self::flush),
    /// [`release_lent`](Self::release_lent) or [`into_inner`](Self::into_inner), or any
    /// record method that fills the buffer (call `release_lent` before the memory may
    /// go). The bytes are read when they are sent; changes made meanwhile go out as they
    /// are then.
    pub unsafe fn pages_lent(
        &mut self,
        id: &str,
        offset: u64,
        data: *const u8,
        count: u16,
    ) -> io::Result<()> {
        if count == 0 || count > MAX_RUN_PAGES {
            return Err(invalid(format!("a run of {count} pages")));
        }
        let len = count as usize * PAGE_SIZE as usize;
        if self.lent.len() >= MAX_LENT {
            self.send_buffer()?;
        }
        // The record's header and its data go out in the same write when they fit.
        self.room((8 + 1 + id.len() + 2 + len).min(self.cap))?;
        if count == 1 {
            self.page_header(id, |cont| PageRecord::Page { offset, cont })?;
        } else {
            self.page_header(id, |cont| PageRecord::Run { offset, cont })?;
            self.put_bytes(&count.to_be_bytes())?;
        }
        self.lent.push((self.buf.len(), data, len));
        self.lent_bytes += len;
        self.written += len as u64;
        Ok(())
    }

    /// A run of consecutive pages of block `id` from `offset`, copied from `data` (a whole
    /// number of pages, 2..=[`MAX_RUN_PAGES`] of them).
    pub fn page_run(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let count = data.len() as u64 / PAGE_SIZE;
        if !(data.len() as u64).is_multiple_of(PAGE_SIZE)
            || !(2..=u64::from(MAX_RUN_PAGES)).contains(&count)
        {
            return Err(invalid(format!("a run of {} bytes", data.len())));
        }
        self.page_header(id, |cont| PageRecord::Run { offset, cont })?;
        self.put_bytes(&(count as u16).to_be_bytes())?;
        self.put_bytes(data)
    }

    /// The source added block `id` of `len` bytes (not placed in guest-physical memory).
    pub fn block_add(&mut self, id: &str, len: u64) -> io::Result<()> {
        self.block_add_placed(id, len, None)
    }

    /// The source added block `id` of `len` bytes, which the guest sees at `guest_addr`
    /// (BLOCK_ADD|PLACED; plain BLOCK_ADD for `None`). Nothing is written when a value is
    /// refused.
    pub fn block_add_placed(
        &mut self,
        id: &str,
        len: u64,
        guest_addr: Option<u64>,
    ) -> io::Result<()> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(format!("block {id:?} of {len:#x} bytes")));
        }
        check_idstr(id)?;
        if let Some(addr) = guest_addr {
            if !addr.is_multiple_of(PAGE_SIZE) || addr.checked_add(len).is_none() {
                return Err(invalid(format!(
                    "block {id:?} of {len:#x} bytes at guest {addr:#x}"
                )));
            }
        }
        self.last_id = None;
        let word = match guest_addr {
            Some(_) => PageRecord::BlockAddPlaced { len },
            None => PageRecord::BlockAdd { len },
        };
        self.put_u64(word.encode())?;
        self.put_idstr(id)?;
        match guest_addr {
            Some(addr) => self.put_u64(addr),
            None => Ok(()),
        }
    }

    /// The source removed block `id`.
    pub fn block_del(&mut self, id: &str) -> io::Result<()> {
        check_idstr(id)?;
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
        check_idstr(name)?;
        self.put_u8(SectionKind::State as u8)?;
        self.put_idstr(name)?;
        self.put_u32(len)?;
        self.put_bytes(data)
    }

    /// A POSTCOPY section: `token`, which a source resuming this post-copy on a new
    /// connection shows; then, for each block, the runs of pages (first page index, page
    /// count; ascending, apart, inside the block) the destination must not trust and
    /// will get from the post-copy stream. Every run is checked before the first byte.
    pub fn postcopy_switch(&mut self, token: u64, blocks: &[BlockRuns]) -> io::Result<()> {
        let count = u32::try_from(blocks.len())
            .map_err(|_| invalid(format!("{} blocks in a post-copy switch", blocks.len())))?;
        for BlockRuns { id, len, runs } in blocks {
            check_idstr(id)?;
            u32::try_from(runs.len())
                .map_err(|_| invalid(format!("{} runs for block {id:?}", runs.len())))?;
            let pages = len / PAGE_SIZE;
            let mut next = 0u64;
            for &(first, n) in runs {
                if first < next || n == 0 || first.checked_add(n).is_none_or(|e| e > pages) {
                    return Err(invalid(format!(
                        "run of {n} pages at page {first} of block {id:?} ({pages} pages)"
                    )));
                }
                next = first + n;
            }
        }
        self.put_u8(SectionKind::Postcopy as u8)?;
        self.put_u64(token)?;
        self.put_u32(count)?;
        for BlockRuns { id, runs, .. } in blocks {
            self.put_idstr(id)?;
            self.put_u32(runs.len() as u32)?;
            for &(first, n) in runs {
                self.put_u64(first)?;
                self.put_u64(n)?;
            }
        }
        Ok(())
    }

    /// The end marker (then [`flush`](Self::flush)).
    pub fn end(&mut self) -> io::Result<()> {
        self.put_u8(SectionKind::End as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;

    #[test]
    fn would_wait_counts_the_bytes_about_to_come() {
        let mut w = StreamWriter::new(Vec::new());
        assert!(!w.would_wait(u64::MAX), "no limit: never waits");
        // 1 MB/s: a bucket of 100 kB, full at the start.
        w.set_rate_limit(Some(1_000_000));
        assert!(!w.is_throttled());
        assert!(!w.would_wait(90_000));
        assert!(w.would_wait(200_000), "200 kB more cannot go at once");
        w.put_bytes(&[0; 60_000]).unwrap();
        assert!(!w.is_throttled());
        assert!(w.would_wait(60_000), "60 kB buffered plus 60 kB more");
    }

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
        assert!(w.block_add_placed("a", 4096, Some(100)).is_err());
        assert!(w.block_add_placed("a", 4096, Some(!4095)).is_err());
        assert!(w.block_add_placed("", 4096, Some(0)).is_err());
        assert_eq!(w.bytes_written(), 0);
    }

    /// A transport that takes at most 5000 bytes per call, to split vectored writes.
    struct Stingy(Vec<u8>);
    impl Write for Stingy {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(5000);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(5000 - n);
                self.0.extend_from_slice(&b[..k]);
                n += k;
                if n == 5000 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lent_pages_go_out_in_place_whether_sent_or_released() {
        let pages: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; PAGE_SIZE as usize]).collect();
        let encode = |lend: bool, release_at: usize| {
            let mut w = StreamWriter::with_capacity(Stingy(Vec::new()), 64 * 1024);
            w.begin_ram().unwrap();
            for (i, p) in pages.iter().enumerate() {
                let id = if i % 3 == 0 { "a" } else { "b" };
                if lend {
                    // SAFETY: `pages` outlives the writer, which is consumed below.
                    unsafe {
                        w.pages_lent(id, i as u64 * PAGE_SIZE, p.as_ptr(), 1)
                            .unwrap()
                    };
                } else {
                    w.page(id, i as u64 * PAGE_SIZE, p).unwrap();
                }
                if i == release_at {
                    w.release_lent();
                }
            }
            w.eos().unwrap();
            let n = w.bytes_written();
            let out = w.into_inner().unwrap().0;
            assert_eq!(out.len() as u64, n);
            out
        };
        let copied = encode(false, usize::MAX);
        assert_eq!(encode(true, usize::MAX), copied);
        assert_eq!(encode(true, 7), copied);
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
