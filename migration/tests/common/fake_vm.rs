//! A VM for the live-migration tests: a real [`RamList`] and a real "guest" thread that
//! writes whole pages of it, logging its writes in a bitmap of its own the way KVM does
//! (the page first, then the bit); `dirty_sync` moves that log into the list's
//! Migration bitmap as `KvmRam::sync_dirty_log` does (take the log, then merge). Pausing
//! parks the guest thread between two page writes and waits until it is parked. A
//! throttle of p% (`set_throttle`, auto-converge) makes the thread sleep p/(100-p) of each
//! 10 ms slice it ran, as a throttled vCPU does; its write rate counts running time only.
#![allow(dead_code)]

use migration::live::{ComponentState, MigratableVm, RestorableVm, VmError};
use migration::load::{AnonymousHotplug, BlockHotplug};
use migration::stream::PAGE_SIZE;
use ramlist::dirty::DirtyClient;
use ramlist::RamList;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const P: u64 = PAGE_SIZE;
/// A throttled guest runs this long between two sleeps (QEMU's timeslice).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// What the guest thread does.
#[derive(Clone, Copy, Debug)]
pub struct GuestLoad {
    /// The block it writes ("ram").
    pub pages: u64,
    /// It rewrites pages `first .. first + working_set` in turn...
    pub first: u64,
    pub working_set: u64,
    /// ... at about this many pages per second (0: as fast as it can).
    pub pages_per_sec: u64,
}

/// The guest's "CPU" state: what save_state sends.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub struct CpuState {
    pub generation: u64,
    pub rip: u64,
}

/// Shared between the VM and its guest thread.
struct Guest {
    ram: Arc<RamList>,
    /// KVM's per-page log, one bit per page of the ram_addr space.
    log: Vec<AtomicU64>,
    pause: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
    generation: AtomicU64,
    /// The throttle in percent, and what a throttled guest sleeps on (woken by a pause,
    /// a stop or a new throttle).
    throttle: AtomicU8,
    nap: Mutex<()>,
    wake: Condvar,
}

/// The source VM.
pub struct FakeVm {
    guest: Arc<Guest>,
    thread: Mutex<Option<JoinHandle<()>>>,
    logging: AtomicBool,
    /// Calls the driver made, in order.
    pub calls: Mutex<Vec<&'static str>>,
    /// Every throttle the driver set, in order.
    pub throttles: Mutex<Vec<u8>>,
}

/// The pattern of page `page` at generation `gen`: no page is zero, each differs.
pub fn pattern(page: u64, gen: u64) -> [u64; 4] {
    let x = (page << 32 | gen).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    [x, page, gen, !x]
}

/// Writes page `page` of block "ram" (the whole page) and marks it in the guest's log.
fn write_page(g: &Guest, page: u64, gen: u64) {
    let guard = rcu::read_lock();
    let b = g.ram.block_by_id(&guard, "ram").expect("block ram");
    assert!((page + 1) * P <= b.len());
    let words = pattern(page, gen);
    // SAFETY: the page lies inside the block (checked), which the guard keeps mapped; the
    // guest thread is the only writer of block "ram" (the saver only reads it).
    let dst = unsafe {
        std::slice::from_raw_parts_mut(b.host().add((page * P) as usize).cast::<u64>(), 512)
    };
    for (i, w) in dst.iter_mut().enumerate() {
        *w = words[i % 4] ^ i as u64;
    }
    let bit = b.offset() / P + page;
    g.log[(bit / 64) as usize].fetch_or(1 << (bit % 64), Release);
}

impl FakeVm {
    /// A VM over `ram` (which has block "ram"); the guest thread starts with `load`
    /// (None: an idle guest, no thread).
    pub fn new(ram: Arc<RamList>, load: Option<GuestLoad>) -> FakeVm {
        let pages = ram.last_ram_offset().div_ceil(P);
        let guest = Arc::new(Guest {
            ram,
            log: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pause: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            throttle: AtomicU8::new(0),
            nap: Mutex::new(()),
            wake: Condvar::new(),
        });
        let thread = load.map(|l| {
            let g = guest.clone();
            thread::spawn(move || guest_loop(&g, l))
        });
        FakeVm {
            guest,
            thread: Mutex::new(thread),
            logging: AtomicBool::new(false),
            calls: Mutex::new(Vec::new()),
            throttles: Mutex::new(Vec::new()),
        }
    }

    /// Fills pages `range` of block "ram" once (generation 0), as a guest that booted.
    pub fn prefill(&self, range: std::ops::Range<u64>) {
        for p in range {
            write_page(&self.guest, p, 0);
        }
    }

    /// Page writes so far.
    pub fn generation(&self) -> u64 {
        self.guest.generation.load(Acquire)
    }

    /// Whether the guest thread is stopped by a pause.
    pub fn is_paused(&self) -> bool {
        self.guest.pause.load(Acquire)
    }

    /// The throttle in force, in percent.
    pub fn throttle(&self) -> u8 {
        self.guest.throttle.load(Acquire)
    }

    /// Every throttle the driver set, in order.
    pub fn throttles(&self) -> Vec<u8> {
        self.throttles.lock().unwrap().clone()
    }

    /// Whether dirty logging is on.
    pub fn is_logging(&self) -> bool {
        self.logging.load(Acquire)
    }

    /// The driver's calls so far.
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }

    fn call(&self, what: &'static str) {
        self.calls.lock().unwrap().push(what);
    }

    /// Waits until the guest has written `n` more pages (it runs), at most `limit`.
    pub fn wait_for_writes(&self, n: u64, limit: Duration) -> bool {
        let start = self.generation();
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.generation() >= start + n {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.guest.stop.store(true, Release);
        self.guest.pause.store(false, Release);
        self.guest.wake_up();
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().unwrap();
        }
    }
}

impl Guest {
    fn wake_up(&self) {
        let _nap = self.nap.lock().unwrap();
        self.wake.notify_all();
    }

    /// A throttled guest's sleep after a slice: p/(100-p) of it, cut short by a pause, a
    /// stop or a change of throttle. Returns how long it slept.
    fn throttle_nap(&self, p: u8) -> Duration {
        let t0 = Instant::now();
        let until = t0 + THROTTLE_SLICE * u32::from(p) / u32::from(100 - p.min(99));
        let mut nap = self.nap.lock().unwrap();
        loop {
            let now = Instant::now();
            if now >= until
                || self.pause.load(Acquire)
                || self.stop.load(Acquire)
                || self.throttle.load(Acquire) != p
            {
                return t0.elapsed();
            }
            nap = self.wake.wait_timeout(nap, until - now).unwrap().0;
        }
    }
}

fn guest_loop(g: &Guest, l: GuestLoad) {
    let interval =
        (l.pages_per_sec > 0).then(|| Duration::from_secs_f64(1.0 / l.pages_per_sec as f64));
    let start = Instant::now();
    let mut written = 0u64;
    // Time spent in throttle naps (not running), and the start of the current slice.
    let mut napped = Duration::ZERO;
    let mut slice = Instant::now();
    while !g.stop.load(Acquire) {
        if g.pause.load(Acquire) {
            g.parked.store(true, Release);
            thread::sleep(Duration::from_micros(50));
            continue;
        }
        g.parked.store(false, Release);
        let p = g.throttle.load(Acquire);
        if p > 0 && slice.elapsed() >= THROTTLE_SLICE {
            napped += g.throttle_nap(p);
            slice = Instant::now();
            continue;
        }
        let gen = g.generation.load(Relaxed) + 1;
        write_page(g, l.first + gen % l.working_set, gen);
        g.generation.store(gen, Release);
        written += 1;
        if let Some(i) = interval {
            // Keep the average rate over the time it ran: sleep when ahead of it.
            let due = i * written as u32;
            let ran = start.elapsed().saturating_sub(napped);
            if due > ran {
                thread::sleep(due - ran);
            }
        }
    }
}

impl MigratableVm for FakeVm {
    fn ram(&self) -> Arc<RamList> {
        self.guest.ram.clone()
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        self.call("start_dirty_log");
        // As KVM: logging starts clean.
        for w in &self.guest.log {
            w.store(0, Relaxed);
        }
        self.logging.store(true, Release);
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.call("stop_dirty_log");
        self.logging.store(false, Release);
        Ok(())
    }

    fn dirty_sync(&self) -> Result<u64, VmError> {
        if !self.logging.load(Acquire) {
            return Err("dirty logging is off".into());
        }
        // GET and CLEAR in one: take the words, then merge them.
        let bitmap: Vec<u64> = self.guest.log.iter().map(|w| w.swap(0, AcqRel)).collect();
        let pages = bitmap.len() as u64 * 64;
        Ok(self
            .guest
            .ram
            .dirty()
            .merge_bitmap(&[DirtyClient::Migration], 0, &bitmap, pages))
    }

    fn pause(&self) -> Result<bool, VmError> {
        self.call("pause");
        let was = !self.guest.pause.swap(true, AcqRel);
        self.guest.wake_up();
        if self.thread.lock().unwrap().is_some() {
            while !self.guest.parked.load(Acquire) {
                thread::yield_now();
            }
        }
        Ok(was)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.call("resume");
        self.guest.parked.store(false, Release);
        self.guest.pause.store(false, Release);
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<ComponentState>, VmError> {
        self.call("save_state");
        let cpu = CpuState {
            generation: self.generation(),
            rip: 0xfff0,
        };
        Ok(vec![
            ComponentState::encode("cpu0", &cpu)?,
            ComponentState {
                name: "serial".into(),
                data: b"tick 41\n".to_vec(),
            },
        ])
    }

    fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        if percent > 99 {
            return Err(format!("throttle {percent}% is over 99%").into());
        }
        self.throttles.lock().unwrap().push(percent);
        self.guest.throttle.store(percent, Release);
        self.guest.wake_up();
        Ok(())
    }
}

/// The destination VM: a RAM list, anonymous hotplug, and what it was given.
pub struct FakeDest {
    pub ram: Arc<RamList>,
    hotplug: AnonymousHotplug,
    pub states: Vec<ComponentState>,
    pub resumed: bool,
    /// Refuse the states with this message.
    pub refuse_restore: Option<&'static str>,
    /// Called by `resume` (which returns its result): a guest that cannot start, or a
    /// look at the connection while the driver waits for the resume.
    pub on_resume: Option<Box<dyn FnMut() -> Result<(), VmError> + Send>>,
    /// Post-copy: called when the link to the source broke.
    pub on_pause: Option<Box<dyn FnMut() + Send>>,
    /// Post-copy recovery: where the source reconnects (None: no recovery).
    pub reconnect: Option<migration::transport::Listener>,
}

impl FakeDest {
    pub fn new(ram: Arc<RamList>) -> FakeDest {
        FakeDest {
            ram,
            hotplug: AnonymousHotplug,
            states: Vec::new(),
            resumed: false,
            refuse_restore: None,
            on_resume: None,
            on_pause: None,
            reconnect: None,
        }
    }
}

impl RestorableVm for FakeDest {
    fn ram(&self) -> Arc<RamList> {
        self.ram.clone()
    }

    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.hotplug
    }

    fn restore_state(&mut self, states: &[ComponentState]) -> Result<(), VmError> {
        if let Some(m) = self.refuse_restore {
            return Err(m.into());
        }
        self.states = states.to_vec();
        Ok(())
    }

    fn postcopy_paused(&mut self, _why: &str) {
        if let Some(hook) = self.on_pause.as_mut() {
            hook();
        }
    }

    fn postcopy_reconnect(&mut self) -> Option<migration::transport::Connection> {
        let l = self.reconnect.as_ref()?;
        l.accept_timeout(Duration::from_secs(20)).ok()
    }

    fn resume(&mut self) -> Result<(), VmError> {
        if let Some(hook) = self.on_resume.as_mut() {
            hook()?;
        }
        self.resumed = true;
        Ok(())
    }
}
