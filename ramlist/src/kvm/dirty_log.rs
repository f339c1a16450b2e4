//! KVM's dirty log: which protocol a VM uses, and the two ioctls that read and re-arm it.
//!
//! kvm-ioctls' `get_dirty_log` allocates a fresh bitmap per call (and trusts the size it
//! is given) and it has no `KVM_CLEAR_DIRTY_LOG` at all, so both are issued here: GET only
//! into a [`SlotLog`], a buffer sized from the slot's own record that a slot keeps from
//! one sync to the next; CLEAR from any buffer, since KVM only reads the bits it is told.

use super::KVM_LOG_PAGE_SIZE;
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use std::ops::Range;
use std::os::raw::c_void;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// How KVM hands over and re-arms a slot's dirty log.
///
/// The default ([`DirtyLogMode::detect`]) is what QEMU picks: manual protect with the log
/// initially set. Turning logging on then costs KVM nothing up front — it neither
/// write-protects the whole slot under its MMU lock nor splits huge pages — and it
/// reports every page dirty on the first sync, which is what a migration's first pass
/// wants anyway (it looks at every page; the pagemap filter skips the never-touched ones).
/// Write protection is then re-armed only for the pages a sync actually took, through
/// `KVM_CLEAR_DIRTY_LOG`, so its cost follows the dirtying rate, not the RAM size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` clears the log and write-protects the reported pages itself
    /// (KVM without `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    GetClears,
    /// Manual protect: GET only reads; the syncer clears what it took with
    /// `KVM_CLEAR_DIRTY_LOG`. Enabling logging write-protects the slot at once.
    Manual,
    /// Manual protect with `KVM_DIRTY_LOG_INITIALLY_SET`: enabling logging marks every page
    /// dirty and protects nothing; pages are protected as syncs clear them.
    ManualInitiallySet,
}

impl DirtyLogMode {
    /// The best mode this KVM offers (see the type's docs for why).
    pub fn detect(vm: &VmFd) -> DirtyLogMode {
        let flags = offered_flags(vm);
        if flags & KVM_DIRTY_LOG_INITIALLY_SET != 0 {
            DirtyLogMode::ManualInitiallySet
        } else if flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
            DirtyLogMode::Manual
        } else {
            DirtyLogMode::GetClears
        }
    }

    /// Whether the syncer must clear the log itself.
    pub fn is_manual(self) -> bool {
        self != DirtyLogMode::GetClears
    }

    /// The `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` argument for this mode (0: leave it off).
    pub fn cap_flags(self) -> u32 {
        match self {
            DirtyLogMode::GetClears => 0,
            DirtyLogMode::Manual => KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
            DirtyLogMode::ManualInitiallySet => {
                KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
            }
        }
    }
}

/// The manual-protect flags this KVM supports (0 if none).
pub fn offered_flags(vm: &VmFd) -> u32 {
    let raw = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    u32::try_from(raw).unwrap_or(0)
}

/// Switches the VM to `mode`'s protocol. Do it before any slot logs dirty pages: KVM
/// applies the protocol when logging is turned on for a slot.
pub fn enable_mode(vm: &VmFd, mode: DirtyLogMode) -> Result<(), errno::Error> {
    if !mode.is_manual() {
        return Ok(());
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(mode.cap_flags());
    vm.enable_cap(&cap)
}

/// Bitmap words a slot of `pages` pages needs.
pub fn log_words(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// A slot's dirty-log buffer, sized from the slot's own record: the only way this crate
/// issues `KVM_GET_DIRTY_LOG`.
///
/// KVM writes one bit per [`KVM_LOG_PAGE_SIZE`] page of the slot's *real* size into
/// whatever buffer it is handed, and no ioctl tells us that size. So the size is never
/// taken from a caller: a `SlotLog` is made (inside this crate only) from the very bytes
/// count `KvmRam` passed to `KVM_SET_USER_MEMORY_REGION` for that slot, holds the buffer
/// for exactly that many pages, and is dropped or rebuilt whenever the slot changes.
/// Safe code outside the crate cannot name a slot and a buffer of its own choosing.
///
/// (The module docs of `kvm` hold a compile-fail test that the old API stays gone.)
pub(crate) struct SlotLog {
    slot: u32,
    pages: u64,
    bits: Vec<u64>,
}

impl SlotLog {
    /// The buffer for `slot`, registered with KVM as `size` bytes.
    pub(crate) fn new(slot: u32, size: u64) -> SlotLog {
        let pages = size / KVM_LOG_PAGE_SIZE;
        SlotLog {
            slot,
            pages,
            bits: vec![0; log_words(pages)],
        }
    }

    /// Pages the log covers (the slot's size in KVM pages).
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap as the last [`SlotLog::get`] left it.
    pub(crate) fn bits(&self) -> &[u64] {
        &self.bits
    }

    /// `KVM_GET_DIRTY_LOG` into the buffer.
    pub(crate) fn get(&mut self, vm: &VmFd) -> Result<(), errno::Error> {
        debug_assert_eq!(self.bits.len(), log_words(self.pages));
        let log = kvm_dirty_log {
            slot: self.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: self.bits.as_mut_ptr().cast::<c_void>(),
            },
        };
        // SAFETY: `vm` is a VM fd; KVM writes one bit per KVM page of the slot's current
        // size, rounded up to 64 bits, into `dirty_bitmap`. `bits` holds exactly that
        // many words: `SlotLog::new` sized it from the byte count the slot was registered
        // with, and `KvmRam` (its only maker, under its slot-table lock, which it holds
        // across this call) rebuilds the log whenever it re-registers the slot with
        // another size, and never lets anyone else register that slot number. The
        // buffer outlives the call.
        let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
        if ret == 0 {
            Ok(())
        } else {
            Err(errno::Error::last())
        }
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the pages set in the words `span` of the buffer (what the
    /// last `get` reported there). The buffer is only read.
    pub(crate) fn clear(&mut self, vm: &VmFd, span: Range<usize>) -> Result<(), errno::Error> {
        let first_page = span.start as u64 * 64;
        let num_pages = (span.end as u64 * 64).min(self.pages) - first_page;
        // Slots are below 2^32 pages (16 TiB): sizes come from the RAM list, whose
        // blocks are at most MAX_BLOCK_SIZE (1 TiB).
        let num_pages = u32::try_from(num_pages).unwrap_or(u32::MAX);
        clear_dirty_log(vm, self.slot, first_page, num_pages, &mut self.bits[span])
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: re-arms write protection for the pages whose bits are set in
/// `bitmap`, which describes `num_pages` pages from `first_page` of `slot`. KVM wants
/// `first_page` a multiple of 64 and `num_pages` one too unless the range ends the slot.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> Result<(), errno::Error> {
    if bitmap.len() < log_words(u64::from(num_pages)) {
        return Err(errno::Error::new(libc::EINVAL));
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast::<c_void>(),
        },
    };
    // SAFETY: `vm` is a VM fd; KVM reads `num_pages` bits from `dirty_bitmap`, which was
    // just checked to hold that many, and checks slot and range itself (EINVAL otherwise).
    // The buffer outlives the call.
    let ret = unsafe { ioctl_with_mut_ref(vm, KVM_CLEAR_DIRTY_LOG(), &mut clear) };
    if ret == 0 {
        Ok(())
    } else {
        Err(errno::Error::last())
    }
}

/// The range of words of `bitmap` from its first to its last non-zero word, or `None` if
/// all are zero: what a sync needs to clear.
pub fn dirty_span(bitmap: &[u64]) -> Option<Range<usize>> {
    let first = bitmap.iter().position(|&w| w != 0)?;
    let last = bitmap.iter().rposition(|&w| w != 0)?;
    Some(first..last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_span_finds_first_and_last_nonzero_words() {
        assert_eq!(dirty_span(&[0, 0, 0]), None);
        assert_eq!(dirty_span(&[0, 4, 0, 1, 0]), Some(1..4));
        assert_eq!(dirty_span(&[1]), Some(0..1));
    }

    #[test]
    fn mode_flags() {
        assert_eq!(DirtyLogMode::GetClears.cap_flags(), 0);
        assert!(!DirtyLogMode::GetClears.is_manual());
        assert_eq!(DirtyLogMode::ManualInitiallySet.cap_flags(), 3);
        assert_eq!(DirtyLogMode::Manual.cap_flags(), 1);
    }

    #[test]
    fn short_buffers_are_refused_before_the_clear() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIPPED: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let mut buf = [0u64; 1];
        let e = clear_dirty_log(&vm, 0, 0, 128, &mut buf).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn slot_log_is_sized_from_the_registered_size() {
        // 65 KVM pages: two words, the second holding one page.
        let log = SlotLog::new(3, 65 * KVM_LOG_PAGE_SIZE);
        assert_eq!((log.pages(), log.bits().len()), (65, 2));
        let log = SlotLog::new(3, 64 * KVM_LOG_PAGE_SIZE);
        assert_eq!((log.pages(), log.bits().len()), (64, 1));
    }
}
