//! Snapshots read from something other than a regular file (a FIFO, as `file:/dev/stdin`
//! or a shell's `<(...)` gives): [`PipeReader`] waits for data with `poll`, so that the
//! connection's read timeout and its shutdown bound every read as they do a socket's. A
//! plain blocking read of a pipe whose writer stalls would wait forever, and a stalled
//! source must end a load by the stall timeout (or the deadline), never hang it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// No read timeout.
const NO_TIMEOUT: u64 = u64::MAX;

/// What a pipe connection's control shares with its reader: the read timeout, and an
/// eventfd that [`shutdown`](PipeControl::shutdown) signals to end reads at once.
pub(super) struct PipeControl {
    /// Milliseconds, or [`NO_TIMEOUT`].
    timeout_ms: AtomicU64,
    wake: OwnedFd,
}

impl PipeControl {
    pub(super) fn new() -> io::Result<Arc<PipeControl>> {
        // SAFETY: eventfd takes no pointers; its result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(PipeControl {
            timeout_ms: AtomicU64::new(NO_TIMEOUT),
            wake,
        }))
    }

    /// Bounds each read (None: waits forever), as a socket's `SO_RCVTIMEO` does.
    pub(super) fn set_read_timeout(&self, t: Option<Duration>) {
        let ms = t.map_or(NO_TIMEOUT, |t| {
            u64::try_from(t.as_millis())
                .unwrap_or(NO_TIMEOUT - 1)
                .clamp(1, NO_TIMEOUT - 1)
        });
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Ends every read, now and later, with the end of the stream (as a socket shut down).
    pub(super) fn shutdown(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this control owns.
        let r = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // A full counter: signalled already.
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The reading half of a pipe snapshot: the file opened non-blocking, read only once
/// `poll` says it has data (or its writer left), within the read timeout.
pub(super) struct PipeReader {
    file: File,
    control: Arc<PipeControl>,
}

impl PipeReader {
    /// `file` must have been opened with `O_NONBLOCK`.
    pub(super) fn new(file: File, control: Arc<PipeControl>) -> PipeReader {
        PipeReader { file, control }
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = self.control.timeout_ms.load(Ordering::Relaxed);
        let deadline =
            (timeout != NO_TIMEOUT).then(|| Instant::now() + Duration::from_millis(timeout));
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now()).as_millis();
                    i32::try_from(left).unwrap_or(i32::MAX)
                }
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.control.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds for descriptors that `self` keeps open during the
            // call; the length passed is the array's.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[0].revents != 0 {
                return Ok(0);
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no data from the pipe within {timeout} ms"),
                ));
            }
            // Data, or the writer left (POLLHUP: the read then says end of stream).
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}
