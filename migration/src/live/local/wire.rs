//! The bytes of a local migration's layout part (the parent module gives the whole
//! exchange): the records that hand each RAM block's file over with SCM_RIGHTS, the
//! one-word "go" the source sends once it gave up its guest, and the two ends of the
//! socket that carry descriptors: [`send_record`] (one record and its descriptor in one
//! `sendmsg`) and [`FdReader`] (a reader that keeps the descriptors arriving with the
//! bytes, in order).
//!
//! ```text
//! local   := "MVML" | version u32 (1) | layout | ... (see the parent module)
//! layout  := record* DONE
//! record  := ADD u8 (0x01) | idstr | length u64 | guest_addr u64 (u64::MAX: none)
//!            | file offset u64                    + exactly one descriptor (SCM_RIGHTS)
//!          | DEL u8 (0x02) | idstr
//! DONE    := u8 (0x03)
//! go      := "MVMG"
//! ```
//! Integers are big-endian, an idstr is the stream's (a length byte 1..=255, UTF-8, no
//! NUL). The descriptor of an ADD travels with the record's first byte.

use crate::stream::{MAX_ID_LEN, PAGE_SIZE};
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The first four bytes of a local migration: "MVML" (minivmm local).
pub const LOCAL_MAGIC: [u8; 4] = *b"MVML";
/// The layout part's version; a destination refuses any other.
pub const LOCAL_VERSION: u32 = 1;
/// The word the source sends once it gave the guest up: "MVMG" (go).
pub const GO: [u8; 4] = *b"MVMG";
/// A guest address of u64::MAX: the block has none.
const NO_ADDR: u64 = u64::MAX;
/// Descriptors that may wait for their record at once: one is all a well-behaved source
/// ever has in flight, so a few more means a flood.
const MAX_PENDING_FDS: usize = 4;

const ADD: u8 = 0x01;
const DEL: u8 = 0x02;
const DONE: u8 = 0x03;

/// One record of the layout.
#[derive(Debug)]
pub enum Record {
    /// Map block `id` over the descriptor that came with the record.
    Add(SharedBlock),
    /// Drop block `id` (the source removed it since the last layout).
    Del(String),
    /// The end of this layout.
    Done,
}

/// A block handed over: where the destination maps it and the file it maps.
pub struct SharedBlock {
    /// The block's id (the stream's idstr).
    pub id: String,
    /// Its length in bytes, a whole number of pages.
    pub len: u64,
    /// Where the guest sees it, if it does.
    pub guest_addr: Option<u64>,
    /// Where the block starts in the file, page-aligned.
    pub offset: u64,
    /// The file.
    pub fd: OwnedFd,
}

impl fmt::Debug for SharedBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBlock")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("guest_addr", &self.guest_addr)
            .field("offset", &self.offset)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

/// What was wrong with the layout a source sent.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The socket failed, timed out or closed.
    #[error("reading the layout: {0}")]
    Io(#[from] io::Error),
    /// Not a local migration, or another version.
    #[error("not a local migration of this version (starts with {0:02x?})")]
    BadHeader([u8; 8]),
    /// A record kind the layout does not have.
    #[error("unknown layout record {0:#04x}")]
    UnknownRecord(u8),
    /// An idstr the stream would refuse.
    #[error("a block id that is not an idstr ({0})")]
    BadId(String),
    /// A length, address or offset that cannot be a block's.
    #[error("block {id:?}: {what}")]
    BadBlock {
        /// The block.
        id: String,
        /// What is wrong.
        what: String,
    },
    /// An ADD record came without its descriptor.
    #[error("block {0:?} came without its file descriptor")]
    MissingFd(String),
    /// More descriptors than records, or a message with several.
    #[error("descriptors the layout did not ask for ({0})")]
    StrayFds(String),
}

/// Sends `record` (an ADD's bytes with `fd`, or a DEL or DONE) as one `sendmsg`; a short
/// send is finished with plain writes (the descriptor rides on the first byte).
pub fn send_record(
    sock: &UnixStream,
    record: &RecordOut<'_>,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<u64> {
    let bytes = record.encode()?;
    let sent = match fd {
        Some(fd) => sock
            .send_with_fd(&bytes[..], fd.as_raw_fd())
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
        None => {
            let mut w = sock;
            w.write_all(&bytes)?;
            bytes.len()
        }
    };
    if sent < bytes.len() {
        let mut w = sock;
        w.write_all(&bytes[sent..])?;
    }
    Ok(bytes.len() as u64)
}

/// A record as the source writes it.
pub enum RecordOut<'a> {
    /// Block `id` of `len` bytes at `guest_addr`, from `offset` in the file sent with it.
    Add {
        /// The block's id.
        id: &'a str,
        /// Its length.
        len: u64,
        /// Its guest address.
        guest_addr: Option<u64>,
        /// Its offset in the file.
        offset: u64,
    },
    /// Block `id` is gone.
    Del(&'a str),
    /// The end of a layout.
    Done,
}

impl RecordOut<'_> {
    fn encode(&self) -> io::Result<Vec<u8>> {
        let idstr = |out: &mut Vec<u8>, id: &str| {
            if id.is_empty() || id.len() > MAX_ID_LEN || id.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{id:?} cannot be a block id"),
                ));
            }
            out.push(id.len() as u8);
            out.extend_from_slice(id.as_bytes());
            Ok(())
        };
        let mut out = Vec::with_capacity(64);
        match *self {
            RecordOut::Add {
                id,
                len,
                guest_addr,
                offset,
            } => {
                out.push(ADD);
                idstr(&mut out, id)?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&guest_addr.unwrap_or(NO_ADDR).to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
            }
            RecordOut::Del(id) => {
                out.push(DEL);
                idstr(&mut out, id)?;
            }
            RecordOut::Done => out.push(DONE),
        }
        Ok(out)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the host's clock, the same in both processes of a
/// local migration.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The header both ends agree on: magic and version.
pub fn header() -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&LOCAL_MAGIC);
    h[4..].copy_from_slice(&LOCAL_VERSION.to_be_bytes());
    h
}

/// The destination's reader: `recvmsg` for every read, each descriptor that arrives
/// kept (close-on-exec) in arrival order until a record takes it. Bytes come as from any
/// reader, so the ordinary stream that follows the layout is read through it too.
pub struct FdReader<'a> {
    sock: &'a UnixStream,
    fds: VecDeque<OwnedFd>,
    /// Bytes read, the layout's and the stream's.
    bytes: u64,
}

impl<'a> FdReader<'a> {
    /// Reads from `sock` (its read timeout bounds every read).
    pub fn new(sock: &'a UnixStream) -> FdReader<'a> {
        FdReader {
            sock,
            fds: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Checks the header.
    pub fn read_header(&mut self) -> Result<(), LayoutError> {
        let mut h = [0u8; 8];
        self.read_exact(&mut h)?;
        if h != header() {
            return Err(LayoutError::BadHeader(h));
        }
        Ok(())
    }

    /// The next record, every value checked: a valid idstr, a non-zero length of whole
    /// pages, a page-aligned guest address and offset whose ends do not overflow, and
    /// exactly its own descriptor for an ADD.
    pub fn next_record(&mut self) -> Result<Record, LayoutError> {
        let kind = self.u8()?;
        match kind {
            ADD => {
                let id = self.idstr()?;
                let len = self.u64()?;
                let addr = self.u64()?;
                let offset = self.u64()?;
                let bad = |what: String| LayoutError::BadBlock {
                    id: id.clone(),
                    what,
                };
                if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
                    return Err(bad(format!("a length of {len:#x} bytes")));
                }
                let guest_addr = (addr != NO_ADDR).then_some(addr);
                if let Some(a) = guest_addr {
                    if !a.is_multiple_of(PAGE_SIZE) || a.checked_add(len).is_none() {
                        return Err(bad(format!("guest address {a:#x}")));
                    }
                }
                if !offset.is_multiple_of(PAGE_SIZE) || offset.checked_add(len).is_none() {
                    return Err(bad(format!("file offset {offset:#x}")));
                }
                let fd = self
                    .fds
                    .pop_front()
                    .ok_or_else(|| LayoutError::MissingFd(id.clone()))?;
                Ok(Record::Add(SharedBlock {
                    id,
                    len,
                    guest_addr,
                    offset,
                    fd,
                }))
            }
            DEL => Ok(Record::Del(self.idstr()?)),
            DONE => {
                // Every descriptor belongs to an ADD before this.
                self.no_stray_fds()?;
                Ok(Record::Done)
            }
            k => Err(LayoutError::UnknownRecord(k)),
        }
    }

    /// Fails if a descriptor arrived that no record took.
    pub fn no_stray_fds(&self) -> Result<(), LayoutError> {
        match self.fds.len() {
            0 => Ok(()),
            n => Err(LayoutError::StrayFds(format!(
                "{n} descriptor(s) with no ADD record"
            ))),
        }
    }

    fn u8(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn idstr(&mut self) -> Result<String, LayoutError> {
        let n = usize::from(self.u8()?);
        if n == 0 {
            return Err(LayoutError::BadId("an empty id".into()));
        }
        let mut b = vec![0u8; n];
        self.read_exact(&mut b)?;
        let s = String::from_utf8(b).map_err(|_| LayoutError::BadId("not UTF-8".into()))?;
        if s.contains('\0') {
            return Err(LayoutError::BadId(format!("{s:?} holds a NUL")));
        }
        Ok(s)
    }
}

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = recv_with_fds(self.sock, buf, &mut self.fds).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                "nothing received within the read timeout",
            ),
            _ => e,
        })?;
        if self.fds.len() > MAX_PENDING_FDS {
            // Dropping them closes them.
            self.fds.clear();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_PENDING_FDS} descriptors ahead of their records"),
            ));
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The most descriptors one `recvmsg` takes: the kernel closes any beyond (MSG_CTRUNC).
const FDS_PER_MESSAGE: usize = 8;

/// One `recvmsg` into `buf`; the descriptors that came with it (close-on-exec) are pushed
/// onto `fds`, in order. More than [`FDS_PER_MESSAGE`] in one message is an error (the
/// kernel closed the rest).
fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<usize> {
    // u64 words: the control buffer must be aligned for cmsghdr.
    const WORDS: usize = 16 + FDS_PER_MESSAGE.div_ceil(2);
    let mut control = [0u64; WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * size_of::<libc::c_int>()) as u32) };
    debug_assert!(space as usize <= size_of_val(&control));
    msg.msg_controllen = space as usize;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`, valid for writes of its length) and at
        // `control` (valid for writes of msg_controllen bytes); both outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk the control buffer it
    // describes and stay inside msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` points at a complete cmsghdr inside `control` (CMSG_FIRSTHDR /
        // CMSG_NXTHDR return null otherwise).
        let hdr = unsafe { c.read_unaligned() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN(0) is the header's size.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(head) / size_of::<libc::c_int>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` ints inside `control`.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: each is a descriptor the kernel just installed for us; nothing
                // else owns it.
                fds.push_back(unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message carrying more than {FDS_PER_MESSAGE} descriptors"),
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: a valid NUL-terminated name; the call makes a new descriptor.
        let fd = unsafe { libc::memfd_create(c"wire-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just made and is owned by nothing else.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn records_and_their_descriptors_arrive_in_order() {
        let (a, b) = pair();
        let (f1, f2) = (memfd(PAGE_SIZE), memfd(2 * PAGE_SIZE));
        (&a).write_all(&header()).unwrap();
        for (id, f, len) in [("one", &f1, PAGE_SIZE), ("two", &f2, 2 * PAGE_SIZE)] {
            let rec = RecordOut::Add {
                id,
                len,
                guest_addr: Some(1 << 32),
                offset: 0,
            };
            send_record(&a, &rec, Some(f.as_fd())).unwrap();
        }
        send_record(&a, &RecordOut::Del("old"), None).unwrap();
        send_record(&a, &RecordOut::Done, None).unwrap();
        let mut r = FdReader::new(&b);
        r.read_header().unwrap();
        let mut adds = Vec::new();
        loop {
            match r.next_record().unwrap() {
                Record::Add(s) => adds.push(s),
                Record::Del(id) => assert_eq!(id, "old"),
                Record::Done => break,
            }
        }
        assert_eq!(adds.len(), 2);
        for (s, len) in adds.iter().zip([PAGE_SIZE, 2 * PAGE_SIZE]) {
            let size = std::fs::File::from(s.fd.try_clone().unwrap())
                .metadata()
                .unwrap()
                .len();
            assert_eq!(size, len, "{} got another block's file", s.id);
            assert_eq!(s.guest_addr, Some(1 << 32));
        }
    }

    #[test]
    fn a_record_without_its_descriptor_and_stray_descriptors_are_refused() {
        let (a, b) = pair();
        let rec = RecordOut::Add {
            id: "ram0",
            len: PAGE_SIZE,
            guest_addr: None,
            offset: 0,
        };
        send_record(&a, &rec, None).unwrap();
        let err = FdReader::new(&b).next_record().unwrap_err();
        assert!(
            matches!(err, LayoutError::MissingFd(ref id) if id == "ram0"),
            "{err}"
        );

        let (a, b) = pair();
        let f = memfd(PAGE_SIZE);
        send_record(&a, &RecordOut::Del("x"), Some(f.as_fd())).unwrap();
        send_record(&a, &RecordOut::Done, None).unwrap();
        let mut r = FdReader::new(&b);
        assert!(matches!(r.next_record().unwrap(), Record::Del(_)));
        let err = r.next_record().unwrap_err();
        assert!(matches!(err, LayoutError::StrayFds(_)), "{err}");
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
        }
        (a, b)
    }

    #[test]
    fn two_descriptors_in_one_message_and_bad_values_are_refused() {
        // Two descriptors with one ADD: the second is a stray, refused at DONE.
        let (a, b) = pair();
        let (f1, f2) = (memfd(PAGE_SIZE), memfd(PAGE_SIZE));
        let rec = RecordOut::Add {
            id: "r",
            len: PAGE_SIZE,
            guest_addr: None,
            offset: 0,
        }
        .encode()
        .unwrap();
        a.send_with_fds(&[&rec[..]], &[f1.as_raw_fd(), f2.as_raw_fd()])
            .unwrap();
        send_record(&a, &RecordOut::Done, None).unwrap();
        let mut r = FdReader::new(&b);
        assert!(matches!(r.next_record().unwrap(), Record::Add(_)));
        let err = r.next_record().unwrap_err();
        assert!(matches!(err, LayoutError::StrayFds(_)), "{err}");
        // More than a message may carry: refused, and the kernel closed the rest.
        let (a, b) = pair();
        let many: Vec<_> = (0..FDS_PER_MESSAGE + 1).map(|_| f1.as_raw_fd()).collect();
        a.send_with_fds(&[&rec[..]], &many).unwrap();
        let err = FdReader::new(&b).next_record().unwrap_err().to_string();
        assert!(err.contains("more than 8 descriptors"), "{err}");

        let bad = |len: u64, addr: u64, offset: u64| {
            let (a, b) = pair();
            let mut bytes = vec![ADD, 1, b'r'];
            for v in [len, addr, offset] {
                bytes.extend_from_slice(&v.to_be_bytes());
            }
            (&a).write_all(&bytes).unwrap();
            FdReader::new(&b).next_record().unwrap_err().to_string()
        };
        assert!(bad(0, NO_ADDR, 0).contains("a length of 0x0"));
        assert!(bad(PAGE_SIZE + 1, NO_ADDR, 0).contains("length"));
        assert!(bad(PAGE_SIZE, 7, 0).contains("guest address 0x7"));
        assert!(bad(PAGE_SIZE, u64::MAX - PAGE_SIZE + 1, 0).contains("guest address"));
        assert!(bad(PAGE_SIZE, NO_ADDR, !(PAGE_SIZE - 1)).contains("file offset"));

        let (a, b) = pair();
        (&a).write_all(b"MVMS\0\0\0\x01").unwrap();
        let err = FdReader::new(&b).read_header().unwrap_err().to_string();
        assert!(err.contains("not a local migration"), "{err}");
        (&a).write_all(&[0x7f]).unwrap();
        let err = FdReader::new(&b).next_record().unwrap_err().to_string();
        assert!(err.contains("unknown layout record 0x7f"), "{err}");
    }

    #[test]
    fn a_flood_of_descriptors_is_refused_and_closed() {
        let (a, b) = pair();
        let f = memfd(PAGE_SIZE);
        for _ in 0..MAX_PENDING_FDS + 1 {
            a.send_with_fd(&[0u8][..], f.as_raw_fd()).unwrap();
        }
        let mut r = FdReader::new(&b);
        let mut buf = [0u8; 1];
        let mut failed = None;
        for _ in 0..MAX_PENDING_FDS + 1 {
            if let Err(e) = r.read(&mut buf) {
                failed = Some(e.to_string());
                break;
            }
        }
        let err = failed.expect("the flood was taken");
        assert!(err.contains("descriptors ahead of their records"), "{err}");
    }
}
