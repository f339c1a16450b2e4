//! A userfaultfd (`userfaultfd(2)`, `ioctl_userfaultfd(2)`) in missing mode: what the
//! post-copy destination needs and nothing more — register a range, read its page
//! faults, resolve each with `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`, wake, unregister.
//!
//! Written here rather than taken from the `userfaultfd` crate: that crate's `-sys` half
//! runs bindgen (libclang) at build time, which these machines and a fresh CI do not
//! have; the ABI used is six ioctls on fixed-layout structs (`linux/userfaultfd.h`),
//! numbered with vmm-sys-util's ioctl macros.
//!
//! Faults are raised for every access to a missing page of a registered range, whether
//! by a thread of this process or by the kernel on its behalf (KVM's `get_user_pages` for
//! a vCPU): the faulting thread sleeps until a `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` fills the
//! page (they wake it) or the range is unregistered. The fd is opened without
//! `UFFD_USER_MODE_ONLY` so kernel faults are reported too (root, or
//! `vm.unprivileged_userfaultfd`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// The ioctls a registered range must support for missing mode to be served.
const NEEDED_RANGE_IOCTLS: u64 = (1 << 0x02) | (1 << 0x03) | (1 << 0x04); // WAKE, COPY, ZEROPAGE

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes, packed; only the page-fault arm is read.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    _pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

/// The ioctl numbers (`linux/userfaultfd.h`).
mod nr {
    #![allow(missing_docs)]
    use super::*;
    ioctl_iowr_nr!(UFFDIO_API_NR, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER_NR, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER_NR, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE_NR, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY_NR, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE_NR, UFFDIO, 0x04, UffdioZeropage);
}
use nr::*;

/// A page fault read from the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (not page-aligned: round it down).
    pub address: u64,
    /// The access was a write.
    pub write: bool,
}

/// What a fill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The page was missing and is now filled; its waiters are woken.
    Done,
    /// The page was there already (another fill won): nothing written. Waiters on it, if
    /// any, still need [`Userfaultfd::wake`].
    Exists,
}

/// An open userfaultfd (close-on-exec, non-blocking).
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens one and does the API handshake. Fails with the errno when userfaultfd is
    /// unavailable (no syscall, `EPERM` without the privilege).
    pub fn open() -> io::Result<Userfaultfd> {
        // SAFETY: the syscall takes flags only and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes the `UffdioApi` it is given, which lives
        // through the call and has the kernel's layout.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_NR(), &mut api) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Userfaultfd { fd })
    }

    /// Registers `[start, start + len)` (page-aligned, mapped) in missing mode: from now
    /// on an access to a page of it that is not there waits for this fd.
    pub fn register(&self, start: *mut u8, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct given, alive through the
        // call; it changes no memory of ours, only how faults on the range are handled.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER_NR(), &mut reg) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if reg.ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
            let _ = self.unregister(start, len);
            return Err(io::Error::other(format!(
                "the range cannot be filled by copy and zero page (ioctls {:#x})",
                reg.ioctls
            )));
        }
        Ok(())
    }

    /// Unregisters the range: faults on it are ordinary again, and any thread still
    /// waiting on it is woken (it then faults the page in as usual).
    pub fn unregister(&self, start: *mut u8, len: u64) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads the range struct, alive through the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER_NR(), &mut range) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next fault, if one is pending (`None`: none now; poll [`Self::as_raw_fd`]).
    /// Events other than page faults (none are asked for) are skipped.
    pub fn read_fault(&self) -> io::Result<Option<Fault>> {
        loop {
            let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
            // SAFETY: reads at most 32 bytes into `msg`, which has room for them.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msg.as_mut_ptr().cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n as usize != std::mem::size_of::<UffdMsg>() {
                return Err(io::Error::other(format!(
                    "a userfaultfd message of {n} bytes"
                )));
            }
            // SAFETY: the kernel wrote the whole message (checked above); every bit
            // pattern is a valid `UffdMsg` (integers only).
            let msg = unsafe { msg.assume_init() };
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let (flags, address) = (msg.flags, msg.address);
            return Ok(Some(Fault {
                address,
                write: flags & 1 != 0,
            }));
        }
    }

    /// Fills the missing page(s) at `dst` with `src` (`len` bytes, page-aligned) and wakes
    /// their waiters.
    ///
    /// # Safety
    /// `dst..dst+len` must lie in a range registered on this fd; `src` must be readable
    /// for `len` bytes.
    pub unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: u64) -> io::Result<Filled> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        loop {
            // SAFETY: the kernel reads `len` bytes at `src` (readable, by the caller's
            // contract) and fills only pages that are missing in the registered range at
            // `dst`: no memory a Rust reference points at changes under it (a missing
            // page is not readable by anyone until filled).
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY_NR(), &mut c) };
            if r == 0 {
                return Ok(Filled::Done);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Filled::Exists),
                // The mapping is changing (or a partial copy): go on from where it is.
                Some(libc::EAGAIN) if c.copy >= 0 => {
                    let done = c.copy as u64;
                    if done >= c.len {
                        return Ok(Filled::Done);
                    }
                    c.dst += done;
                    c.src += done;
                    c.len -= done;
                    c.copy = 0;
                }
                _ => return Err(e),
            }
        }
    }

    /// Fills the missing page(s) at `dst` (`len` bytes, page-aligned, registered) with
    /// zeros and wakes their waiters.
    ///
    /// # Safety
    /// `dst..dst+len` must lie in a range registered on this fd whose pages, where the
    /// kernel sees none mapped, hold nothing anyone may read: anonymous memory, or memory
    /// whose contents were dropped. (A private file mapping's unmapped page still has
    /// its file's bytes, which this would replace with zeros.)
    pub unsafe fn zero(&self, dst: *mut u8, len: u64) -> io::Result<Filled> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len,
            },
            mode: 0,
            zeropage: 0,
        };
        loop {
            // SAFETY: the kernel maps zero pages only where pages are missing in a range
            // registered on this fd (anything else is refused with an error): no memory
            // that is readable changes.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE_NR(), &mut z) };
            if r == 0 {
                return Ok(Filled::Done);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Filled::Exists),
                Some(libc::EAGAIN) if z.zeropage >= 0 => {
                    let done = z.zeropage as u64;
                    if done >= z.range.len {
                        return Ok(Filled::Done);
                    }
                    z.range.start += done;
                    z.range.len -= done;
                    z.zeropage = 0;
                }
                _ => return Err(e),
            }
        }
    }

    /// Wakes the threads waiting on `[start, start + len)` (after a fill found the page
    /// there already).
    pub fn wake(&self, start: *mut u8, len: u64) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len,
        };
        // SAFETY: UFFDIO_WAKE reads the range struct, alive through the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE_NR(), &mut range) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;

    struct Map(*mut u8, usize);
    // SAFETY: an anonymous mapping owned by the test, unmapped in Drop after every user
    // thread was joined.
    unsafe impl Send for Map {}
    // SAFETY: as above; accesses go through atomics or the uffd ioctls.
    unsafe impl Sync for Map {}
    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: the mapping was made by `anon` and nothing uses it any more.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    fn anon(len: usize) -> Map {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Map(p.cast(), len)
    }

    #[test]
    fn a_fault_waits_for_its_fill_and_zero_and_exists_are_told() {
        let uffd = match Userfaultfd::open() {
            Ok(u) => u,
            Err(e) => {
                println!("SKIPPED: no userfaultfd ({e})");
                return;
            }
        };
        let map = Arc::new(anon(4 * 4096));
        uffd.register(map.0, 4 * 4096).unwrap();
        assert_eq!(uffd.read_fault().unwrap(), None);
        let reader = {
            let map = map.clone();
            std::thread::spawn(move || {
                // SAFETY: inside the mapping; the read waits for the fill.
                let a = unsafe { &*(map.0.add(4096 + 8) as *const AtomicU8) };
                // SAFETY: as above, page 3.
                let b = unsafe { &*(map.0.add(3 * 4096) as *const AtomicU8) };
                (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed))
            })
        };
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive through the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        let f = uffd.read_fault().unwrap().expect("a fault");
        assert_eq!(f.address & !4095, map.0 as u64 + 4096);
        assert!(!f.write);
        let page = vec![0x5au8; 4096];
        // SAFETY: page 1 of the registered range; `page` is 4096 readable bytes.
        let r = unsafe { uffd.copy(map.0.add(4096), page.as_ptr(), 4096) }.unwrap();
        assert_eq!(r, Filled::Done);
        // SAFETY: as above.
        let again = unsafe { uffd.copy(map.0.add(4096), page.as_ptr(), 4096) }.unwrap();
        assert_eq!(again, Filled::Exists);
        // SAFETY: one pollfd, alive through the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        let f = uffd.read_fault().unwrap().expect("a second fault");
        assert_eq!(f.address & !4095, map.0 as u64 + 3 * 4096);
        // SAFETY: page 3 of the registered range, anonymous and never touched.
        let z = unsafe { uffd.zero(map.0.add(3 * 4096), 4096) };
        assert_eq!(z.unwrap(), Filled::Done);
        assert_eq!(reader.join().unwrap(), (0x5a, 0));
        uffd.unregister(map.0, 4 * 4096).unwrap();
        // Unregistered: page 0 faults in as ordinary anonymous memory.
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { *map.0 }, 0);
    }
}
