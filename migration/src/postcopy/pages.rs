//! The destination's pages after the switch: which are still missing (the source's
//! discard runs), the userfaultfd that holds every access to them, the fault thread that
//! asks the source for each, and the placer the loader fills them through.
//!
//! # Which page is what
//!
//! At the switch every page of a registered block is one of:
//! - **missing**: in the discard runs. Whatever the destination holds there is stale (or
//!   nothing); it was dropped (`discard`) before the guest ran, so an access
//!   faults. The first fault on it sends one request to the source; the page comes back
//!   (or in the background stream) and is filled with `UFFDIO_COPY`, which wakes every
//!   thread waiting on it.
//! - **present**: received during pre-copy and clean since: no fault.
//! - **absent and not missing**: the source never sent it because it knew it was zero
//!   (the first pass's skipped pages, or a ZERO record the loader did not need to
//!   write). A fault on it is filled at once with `UFFDIO_ZEROPAGE`, without asking.
//!
//! # Races, and why none loses a wake-up
//!
//! The missing bit is tested by the fault thread and cleared by the placer under one
//! lock ([`Waits`]), after the placer's `UFFDIO_COPY`:
//! - fault thread first: the page is still missing, the fault is recorded and asked for;
//!   the copy that comes wakes it (the waiter was queued before the fault was readable).
//! - placer first: the bit is clear, the fault thread's `UFFDIO_ZEROPAGE` finds the page
//!   there (`EEXIST`) and wakes the range instead.
//!
//! A page the source sends that is not missing (sent twice, or never asked for) is
//! left as it is. The fault thread never touches guest memory itself: it would wait for
//! its own fill.

use super::uffd::{Fault, Filled, Userfaultfd};
use crate::live::Reply;
use crate::load::{DiscardRuns, PagePlacer};
use crate::stream::PAGE_SIZE;
use ramlist::{RamBlockRef, RamList};
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// The return path, shared by the fault thread (requests) and the driver (replies).
pub(crate) type ReturnPath = Arc<Mutex<Box<dyn Write + Send>>>;

/// One registered block.
struct Block {
    id: String,
    /// Keeps the mapping alive while it is registered.
    block: RamBlockRef,
    host: u64,
    len: u64,
    /// One bit per page: still to come from the source.
    missing: Box<[AtomicU64]>,
}

impl Block {
    fn bit(&self, page: u64) -> (&AtomicU64, u64) {
        (&self.missing[(page / 64) as usize], 1u64 << (page % 64))
    }

    fn is_missing(&self, page: u64) -> bool {
        let (w, b) = self.bit(page);
        w.load(Ordering::Acquire) & b != 0
    }
}

/// A page some thread waits on.
struct Waiting {
    first_fault: Instant,
    /// When it was asked for (none: asked for by an earlier fault still pending).
    requested: Option<Instant>,
    /// Faults read for it (one per waiting thread, at least).
    faults: u32,
}

/// The figures the fault thread and the placer keep.
#[derive(Default)]
struct Waits {
    waiting: HashMap<u64, Waiting>,
    requests: u64,
    /// Per request: from the request going out to the page in place, in ms.
    latencies_ms: Vec<f64>,
    /// Sum over faults of the time each waited, in seconds.
    blocktime: f64,
    zero_faults: u64,
    placed: u64,
    zero_placed: u64,
    ignored: u64,
}

/// What post-copy did on the destination (the JSON of the `PostcopyDone` reply).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PostcopyFigures {
    /// Pages the switch said were missing.
    pub missing_pages: u64,
    /// Page requests sent to the source.
    pub requests: u64,
    /// Faults filled with zeros here, without asking.
    pub zero_faults: u64,
    /// Total time threads (vCPUs, the VMM) waited on missing pages, in ms.
    pub blocktime_ms: f64,
    /// Request to page in place, median, in ms.
    pub fault_p50_ms: f64,
    /// ... 99th percentile, in ms.
    pub fault_p99_ms: f64,
    /// ... the worst, in ms.
    pub fault_max_ms: f64,
    /// Pages filled with data.
    pub placed_pages: u64,
    /// Pages filled with zeros from ZERO records.
    pub placed_zero_pages: u64,
    /// Pages the source sent that were not missing (left as they were).
    pub ignored_pages: u64,
    /// From the guest running to the last page in place, in ms.
    pub postcopy_ms: f64,
}

/// The destination's pages during post-copy: see the module documentation.
pub(crate) struct Pages {
    uffd: Userfaultfd,
    /// Sorted by host address.
    blocks: Vec<Block>,
    waits: Mutex<Waits>,
    missing_total: u64,
    left: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pages {
    /// Drops the stale pages of `runs` from `ram`'s blocks and registers every block the
    /// runs name... and every other block of the list too (its absent pages are zeros
    /// that fault and are filled here). The guest must not run yet.
    pub(crate) fn register(ram: &RamList, runs: &DiscardRuns) -> Result<Pages, String> {
        let uffd = Userfaultfd::open().map_err(|e| format!("userfaultfd is unavailable: {e}"))?;
        let refs: Vec<RamBlockRef> = {
            let guard = rcu::read_lock();
            ram.blocks(&guard)
                .filter_map(|b| ram.block_ref(&guard, b.id()))
                .collect()
        };
        let mut blocks = Vec::with_capacity(refs.len());
        let mut missing_total = 0;
        for r in refs {
            if r.fd().is_some() && !r.is_shared() {
                // Its unmapped pages are its file's, not missing ones: a zero fill or a
                // discard would expose or replace them.
                return Err(format!(
                    "block {:?} maps a file privately (a restored snapshot): post-copy \
                     needs anonymous or shared guest RAM here",
                    r.id()
                ));
            }
            let pages = r.len() / PAGE_SIZE;
            let missing: Box<[AtomicU64]> =
                (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
            let b = Block {
                id: r.id().to_string(),
                host: r.host() as u64,
                len: r.len(),
                block: r,
                missing,
            };
            if let Some((_, rs)) = runs.blocks.iter().find(|(id, _)| *id == b.id) {
                for &(first, n) in rs {
                    for p in first..first + n {
                        let (w, bit) = b.bit(p);
                        w.fetch_or(bit, Ordering::Relaxed);
                    }
                    missing_total += n;
                }
            }
            blocks.push(b);
        }
        if let Some((id, _)) = runs
            .blocks
            .iter()
            .find(|(id, _)| !blocks.iter().any(|b| b.id == *id))
        {
            return Err(format!("the switch names block {id:?}, which is gone here"));
        }
        blocks.sort_by_key(|b| b.host);
        let unregister = |blocks: &[Block]| {
            for done in blocks {
                let _ = uffd.unregister(done.block.host(), done.len);
            }
        };
        for (i, b) in blocks.iter().enumerate() {
            if let Err(e) = uffd.register(b.block.host(), b.len) {
                unregister(&blocks[..i]);
                return Err(format!(
                    "registering block {:?} with userfaultfd: {e}",
                    b.id
                ));
            }
        }
        // Dropped only now that every block is registered: a touch of a dropped page
        // faults to us from the first instant, instead of mapping a zero page that the
        // page's arrival could no longer replace (UFFDIO_COPY refuses a present page).
        for b in &blocks {
            if let Some((_, rs)) = runs.blocks.iter().find(|(id, _)| *id == b.id) {
                for &(first, n) in rs {
                    if let Err(e) = discard(b, first * PAGE_SIZE, n * PAGE_SIZE) {
                        unregister(&blocks);
                        return Err(e);
                    }
                }
            }
        }
        Ok(Pages {
            uffd,
            blocks,
            waits: Mutex::new(Waits::default()),
            missing_total,
            left: AtomicU64::new(missing_total),
        })
    }

    /// Pages still missing.
    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    /// Unregisters every block: accesses are ordinary again (any still-missing page then
    /// reads as zero: call it once [`left`](Self::left) is 0, or to give up).
    pub(crate) fn unregister(&self) {
        for b in &self.blocks {
            if let Err(e) = self.uffd.unregister(b.block.host(), b.len) {
                log::error!("post-copy: unregistering block {:?}: {e}", b.id);
            }
        }
    }

    /// Post-copy failed: makes every page still missing inaccessible, so that once guest
    /// RAM is let go a thread that touches one faults (KVM answers a vCPU with an
    /// error) instead of reading zeros where the guest's data was.
    pub(crate) fn fence_missing(&self) {
        for (id, runs) in self.missing_runs() {
            let Some(b) = self.blocks.iter().find(|b| b.id == id) else {
                continue;
            };
            for (first, n) in runs {
                // SAFETY: the range is pages of the block's own mapping (runs come from
                // its missing bitmap, sized to its length), kept mapped by the counted
                // reference. They are missing: nothing was ever readable there, so no
                // reference sees its memory change; later accesses fault instead.
                let r = unsafe {
                    libc::mprotect(
                        (b.host + first * PAGE_SIZE) as *mut libc::c_void,
                        (n * PAGE_SIZE) as usize,
                        libc::PROT_NONE,
                    )
                };
                if r < 0 {
                    log::error!(
                        "post-copy: fencing missing pages of block {id:?}: {}",
                        io::Error::last_os_error()
                    );
                }
            }
        }
    }

    /// The block and the page index of host address `addr`.
    fn find(&self, addr: u64) -> Option<(&Block, u64)> {
        let i = self
            .blocks
            .partition_point(|b| b.host <= addr)
            .checked_sub(1)?;
        let b = &self.blocks[i];
        (addr < b.host + b.len).then(|| (b, (addr - b.host) / PAGE_SIZE))
    }

    /// Serves faults until `stop` is written: each missing page is asked of the source
    /// once on `ret`, every other page is filled with zeros at once. Returns on `stop`,
    /// or with the error that ended it (the return path broke, a fault outside guest
    /// RAM, the fd failed).
    pub(crate) fn serve_faults(&self, stop: &EventFd, ret: &ReturnPath) -> Result<(), String> {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two pollfds in an array alive through the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("polling the userfaultfd: {e}"));
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            while let Some(f) = self
                .uffd
                .read_fault()
                .map_err(|e| format!("reading the userfaultfd: {e}"))?
            {
                self.fault(f, ret)?;
            }
        }
    }

    fn fault(&self, f: Fault, ret: &ReturnPath) -> Result<(), String> {
        let addr = f.address & !(PAGE_SIZE - 1);
        let Some((b, page)) = self.find(addr) else {
            return Err(format!(
                "a fault at {:#x}, outside every registered block",
                f.address
            ));
        };
        let request = {
            let mut w = lock(&self.waits);
            if b.is_missing(page) {
                let now = Instant::now();
                let entry = w.waiting.entry(addr).or_insert(Waiting {
                    first_fault: now,
                    requested: None,
                    faults: 0,
                });
                entry.faults += 1;
                if entry.requested.is_none() {
                    entry.requested = Some(now);
                    w.requests += 1;
                    true
                } else {
                    false
                }
            } else {
                w.zero_faults += 1;
                false
            }
        };
        if request {
            let r = Reply::PageRequest {
                id: b.id.clone(),
                offset: page * PAGE_SIZE,
                pages: 1,
            };
            if let Err(e) = r.write_to(&mut **lock(ret)) {
                // The link is down: the request stays recorded, and goes again once a
                // source reconnects ([`Pages::ask_again`]); meanwhile the fault waits.
                log::debug!("post-copy: asking the source for a page: {e}");
            }
            return Ok(());
        }
        if b.is_missing(page) {
            // Asked for by an earlier fault: the copy to come wakes this one too.
            return Ok(());
        }
        // SAFETY: `addr` is a page of a registered block (found by `find`). Its blocks
        // are anonymous or shared memory (`register` refuses private file mappings), so
        // a page the kernel has none for holds nothing: filling it with zeros is what
        // reading it would have given (a page not missing is one the source knew was
        // zero, or one already placed: then the fill finds it there and changes nothing).
        let zeroed = unsafe { self.uffd.zero(addr as *mut u8, PAGE_SIZE) };
        match zeroed {
            Ok(Filled::Done) => Ok(()),
            Ok(Filled::Exists) => self
                .uffd
                .wake(addr as *mut u8, PAGE_SIZE)
                .map_err(|e| format!("waking a fault at {addr:#x}: {e}")),
            Err(e) => Err(format!("filling a zero page at {addr:#x}: {e}")),
        }
    }

    /// After a reconnection: asks again for every page a thread waits on (the requests
    /// on the old connection may have been lost with it).
    pub(crate) fn ask_again(&self, ret: &ReturnPath) -> std::io::Result<u64> {
        let waiting: Vec<u64> = lock(&self.waits).waiting.keys().copied().collect();
        let mut n = 0;
        for addr in waiting {
            let Some((b, page)) = self.find(addr) else {
                continue;
            };
            if !b.is_missing(page) {
                continue;
            }
            Reply::PageRequest {
                id: b.id.clone(),
                offset: page * PAGE_SIZE,
                pages: 1,
            }
            .write_to(&mut **lock(ret))?;
            n += 1;
        }
        Ok(n)
    }

    /// The pages still missing, as runs per block (post-copy recovery tells the source).
    pub(crate) fn missing_runs(&self) -> Vec<(String, Vec<(u64, u64)>)> {
        let mut out = Vec::new();
        for b in &self.blocks {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (w, word) in b.missing.iter().enumerate() {
                let mut bits = word.load(Ordering::Acquire);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    match runs.last_mut() {
                        Some((first, n)) if *first + *n == page => *n += 1,
                        _ => runs.push((page, 1)),
                    }
                }
            }
            if !runs.is_empty() {
                out.push((b.id.clone(), runs));
            }
        }
        out
    }

    /// The figures, `since` the guest ran.
    pub(crate) fn figures(&self, since: Instant) -> PostcopyFigures {
        let w = lock(&self.waits);
        let mut l = w.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if l.is_empty() {
                0.0
            } else {
                l[((l.len() - 1) as f64 * p).round() as usize]
            }
        };
        PostcopyFigures {
            missing_pages: self.missing_total,
            requests: w.requests,
            zero_faults: w.zero_faults,
            blocktime_ms: round_ms(w.blocktime * 1e3),
            fault_p50_ms: round_ms(pct(0.5)),
            fault_p99_ms: round_ms(pct(0.99)),
            fault_max_ms: round_ms(l.last().copied().unwrap_or(0.0)),
            placed_pages: w.placed,
            placed_zero_pages: w.zero_placed,
            ignored_pages: w.ignored,
            postcopy_ms: round_ms(since.elapsed().as_secs_f64() * 1e3),
        }
    }

    /// Records that the page at `addr` of `b` is in place (after the copy).
    fn placed(&self, b: &Block, page: u64, addr: u64, zero: bool) {
        let mut w = lock(&self.waits);
        let (word, bit) = b.bit(page);
        let was = word.fetch_and(!bit, Ordering::AcqRel) & bit != 0;
        if !was {
            w.ignored += 1;
            return;
        }
        self.left.fetch_sub(1, Ordering::AcqRel);
        if zero {
            w.zero_placed += 1;
        } else {
            w.placed += 1;
        }
        if let Some(wait) = w.waiting.remove(&addr) {
            let now = Instant::now();
            w.blocktime +=
                now.duration_since(wait.first_fault).as_secs_f64() * f64::from(wait.faults);
            if let Some(t) = wait.requested {
                w.latencies_ms
                    .push(now.duration_since(t).as_secs_f64() * 1e3);
            }
        }
    }
}

fn round_ms(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

/// Drops `len` bytes at `offset` of `b`, so that the next access faults.
fn discard(b: &Block, offset: u64, len: u64) -> Result<(), String> {
    let advice = if b.block.is_shared() {
        // A shared file mapping keeps its pages in the file: punch them out of it.
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: the range lies inside the block's mapping (the loader checked the runs
    // against its length), which the counted reference keeps mapped. The guest does not
    // run yet and no reference to these bytes is held by anyone (the loader has dropped
    // its slices): dropping their contents changes nothing a Rust reference sees.
    let r = unsafe {
        libc::madvise(
            b.block.host().add(offset as usize).cast(),
            len as usize,
            advice,
        )
    };
    if r < 0 {
        return Err(format!(
            "dropping {len:#x} stale bytes at {offset:#x} of block {:?}: {}",
            b.id,
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

impl PagePlacer for Pages {
    fn place(&self, block: &RamBlockRef, offset: u64, data: Option<&[u8]>) -> Result<(), String> {
        let Some((b, first)) = self.find(block.host() as u64 + offset) else {
            return Err(format!(
                "a page for block {:?}, which is not registered",
                block.id()
            ));
        };
        let count = data.map_or(1, |d| d.len() as u64 / PAGE_SIZE);
        for i in 0..count {
            let page = first + i;
            if !b.is_missing(page) {
                lock(&self.waits).ignored += 1;
                continue;
            }
            let addr = b.host + page * PAGE_SIZE;
            let filled = match data {
                Some(d) => {
                    let src = &d[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
                    // SAFETY: `addr` is a page of a block registered on this fd (found
                    // by `find`, inside its length); `src` is one page of readable bytes.
                    unsafe { self.uffd.copy(addr as *mut u8, src.as_ptr(), PAGE_SIZE) }
                }
                // SAFETY: as above, a page of a registered block, which holds anonymous or
                // shared memory; this page is missing (dropped at the switch).
                None => unsafe { self.uffd.zero(addr as *mut u8, PAGE_SIZE) },
            };
            match filled {
                Ok(Filled::Done) => self.placed(b, page, addr, data.is_none()),
                // Only this thread fills missing pages, and they were dropped before
                // the guest ran: one there now would hide the source's data.
                Ok(Filled::Exists) => {
                    return Err(format!(
                        "page {:#x} of block {:?} was there though it was dropped",
                        page * PAGE_SIZE,
                        b.id
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "filling page {:#x} of block {:?}: {e}",
                        page * PAGE_SIZE,
                        b.id
                    ))
                }
            }
        }
        Ok(())
    }
}
