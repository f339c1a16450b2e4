//! The memory barriers that pair readers with grace periods.
//!
//! A reader publishes "I am inside a section" (its counter snapshot) and then reads
//! RCU-protected pointers; a writer unlinks a pointer and then reads every reader's
//! counter. That is the store-buffering pattern: both sides need a full barrier between
//! their store and their load. liburcu's memb flavour and QEMU move the whole cost to the
//! writer: readers use only a compiler barrier, and the writer issues
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every running thread of the
//! process execute a full barrier. Where membarrier is unavailable (an old kernel, a
//! seccomp filter, or `RCU_NO_MEMBARRIER=1`), both sides use real fences.
//!
//! The mode is chosen once, before the first reader registers, and never changes.

use std::sync::atomic::{compiler_fence, AtomicU8, Ordering};

/// How readers and writers order their accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarrierMode {
    /// Readers use compiler barriers only; grace periods issue
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`.
    Membarrier,
    /// Readers and writers both use `fence(SeqCst)`.
    Fences,
}

/// The requested mode could not be set because readers already run under another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierModeLocked(pub BarrierMode);

impl std::fmt::Display for BarrierModeLocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the RCU barrier mode is already fixed to {:?}", self.0)
    }
}

impl std::error::Error for BarrierModeLocked {}

const UNDECIDED: u8 = 0;
const MEMBARRIER: u8 = 1;
const FENCES: u8 = 2;

// A plain std atomic even under loom: the mode is fixed before any modelled thread runs.
static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier(2) takes two integers and touches no user memory.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        )
    }
}

fn decode(v: u8) -> BarrierMode {
    if v == MEMBARRIER {
        BarrierMode::Membarrier
    } else {
        BarrierMode::Fences
    }
}

/// Picks the mode on first use: membarrier if the kernel offers private expedited
/// membarrier and registration succeeds, fences otherwise (or if `RCU_NO_MEMBARRIER` is
/// set to anything but `0`). Loom models always use fences: loom knows no membarrier; so
/// does Miri, which cannot execute the membarrier system call (it does emulate futexes).
fn probe() -> u8 {
    if cfg!(any(loom, miri)) {
        return FENCES;
    }
    if std::env::var_os("RCU_NO_MEMBARRIER").is_some_and(|v| v != "0") {
        return FENCES;
    }
    let supported = membarrier(MEMBARRIER_CMD_QUERY);
    if supported < 0 || supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED as libc::c_long == 0 {
        log::info!("rcu: membarrier private expedited unavailable; readers use fences");
        return FENCES;
    }
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0 {
        log::info!("rcu: membarrier registration failed; readers use fences");
        return FENCES;
    }
    MEMBARRIER
}

/// The mode in force, choosing it now if nothing has yet.
pub fn barrier_mode() -> BarrierMode {
    let v = MODE.load(Ordering::Acquire);
    if v != UNDECIDED {
        return decode(v);
    }
    let want = probe();
    match MODE.compare_exchange(UNDECIDED, want, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => decode(want),
        Err(won) => decode(won),
    }
}

/// Chooses the mode before any reader runs; an error if another mode is already fixed.
/// Programs normally let the library probe the kernel; tests use this (or the
/// `RCU_NO_MEMBARRIER` environment variable) to exercise the fence path.
pub fn set_barrier_mode(mode: BarrierMode) -> Result<(), BarrierModeLocked> {
    let want = match mode {
        BarrierMode::Membarrier => {
            if cfg!(any(loom, miri)) || membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0 {
                return Err(BarrierModeLocked(barrier_mode()));
            }
            MEMBARRIER
        }
        BarrierMode::Fences => FENCES,
    };
    match MODE.compare_exchange(UNDECIDED, want, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(()),
        Err(v) if v == want => Ok(()),
        Err(v) => Err(BarrierModeLocked(decode(v))),
    }
}

/// The reader's half: a compiler barrier under membarrier, a full fence otherwise.
#[inline(always)]
pub(crate) fn reader_barrier(fences: bool) {
    if fences {
        crate::primitive::fence(Ordering::SeqCst);
    } else {
        compiler_fence(Ordering::SeqCst);
    }
}

/// The writer's half: a full barrier on every running thread of the process.
pub(crate) fn global_barrier() {
    match barrier_mode() {
        BarrierMode::Membarrier => {
            let r = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
            // Readers rely on this barrier for correctness: carrying on without it would
            // free memory under them, so a failure here must stop the program.
            assert!(
                r == 0,
                "rcu: membarrier(PRIVATE_EXPEDITED) failed after registration: {}",
                std::io::Error::last_os_error()
            );
        }
        BarrierMode::Fences => crate::primitive::fence(Ordering::SeqCst),
    }
}
