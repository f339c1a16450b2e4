//! How much a socket holds that its peer has not taken: post-copy paces its background
//! pages by it, so that a page a vCPU waits for is never queued behind more than about
//! one round trip of bulk data.
//!
//! - TCP: the bytes sent and not acknowledged yet, and the link's bandwidth-delay
//!   product from the kernel's own measures (`TCP_INFO`: delivery rate × minimum RTT).
//!   Keeping no more than that in flight fills the link without queueing in front of it.
//! - A unix socket: the memory of what was written and not read yet (`TIOCOUTQ`: the
//!   data plus the kernel's per-buffer overhead); no link to fill.

use std::os::fd::{AsRawFd, RawFd};

/// How far a migration socket's writer may run ahead of what TCP has put on the wire
/// (`TCP_NOTSENT_LOWAT`): a blocking write waits until fewer unsent bytes than this are
/// queued. Without it the kernel takes up to `tcp_wmem`'s 4 MiB, seconds of a slow link:
/// the saver would pick pages, and read them, that long before they cross, so a page the
/// guest writes meanwhile goes twice, and the final stage's bytes wait behind all of it.
/// 128 KiB keeps a 10 Gbit/s link busy between two wake-ups of the writer.
pub const UNSENT_LOWAT: u32 = 128 << 10;

/// Sets [`UNSENT_LOWAT`] on a TCP socket that carries a migration stream.
pub fn limit_unsent(s: &std::net::TcpStream) -> std::io::Result<()> {
    let v: libc::c_int = UNSENT_LOWAT as libc::c_int;
    // SAFETY: TCP_NOTSENT_LOWAT reads one int from `v`, alive through the call; the fd is
    // the stream's own, open while `s` is borrowed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A socket's queue now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendQueue {
    /// Bytes written by us and not yet taken by the peer (acknowledged, or read).
    pub queued: u64,
    /// The link's bandwidth-delay product in bytes, once TCP has measured it.
    pub bdp: Option<u64>,
    /// The link's recent delivery rate in bytes per second, as TCP measured it
    /// (`tcpi_delivery_rate`), once it has.
    pub delivery_rate: Option<u64>,
}

/// The kernel's `struct tcp_info` up to `tcpi_delivery_rate` (Linux 4.9): the layout is
/// append-only, and the kernel copies no more than the length given.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    head: [u8; 8],
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
}

const _: () = assert!(std::mem::size_of::<TcpInfo>() == 168);

fn outq(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int into `n`, alive through the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (r == 0 && n >= 0).then_some(n as u64)
}

/// A unix socket's queue.
pub(super) fn unix(fd: RawFd) -> Option<SendQueue> {
    Some(SendQueue {
        queued: outq(fd)?,
        bdp: None,
        delivery_rate: None,
    })
}

/// A TCP socket's queue and the link's bandwidth-delay product.
pub(super) fn tcp(fd: RawFd) -> Option<SendQueue> {
    let queued = outq(fd)?;
    let mut info = TcpInfo::default();
    let mut len = std::mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which has that many,
    // and sets `len` to what it wrote.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfo).cast(),
            &mut len,
        )
    };
    let full = r == 0 && len as usize >= std::mem::size_of::<TcpInfo>();
    let bdp = (full && info.min_rtt > 0 && info.min_rtt != u32::MAX && info.delivery_rate > 0)
        .then(|| info.delivery_rate.saturating_mul(u64::from(info.min_rtt)) / 1_000_000);
    let delivery_rate = (full && info.delivery_rate > 0).then_some(info.delivery_rate);
    Some(SendQueue {
        queued,
        bdp,
        delivery_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    /// `TCP_NOTSENT_LOWAT` as the kernel has it for `fd`.
    fn lowat(fd: RawFd) -> u32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes (one int) into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v as u32
    }

    /// Both ends of a `tcp:` migration connection keep at most [`UNSENT_LOWAT`] unsent
    /// (the kernel's default is 4 GiB: no limit).
    #[test]
    fn a_tcp_migration_connection_limits_what_it_holds_unsent() {
        use crate::transport::{connect, listen, MigrationUri, Socket};
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let uri = MigrationUri::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let listener = listen(&uri).unwrap();
        let out = connect(&uri).unwrap();
        let inc = listener
            .accept_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        for conn in [&out, &inc] {
            let Some(Socket::Tcp(s)) = &conn.socket else {
                panic!("not a TCP connection");
            };
            assert_eq!(lowat(s.as_raw_fd()), UNSENT_LOWAT);
        }
    }

    #[test]
    fn a_unix_socket_counts_what_the_peer_has_not_read() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(unix(a.as_raw_fd()).unwrap().queued, 0);
        a.write_all(&[7u8; 1000]).unwrap();
        // The kernel counts the buffer's memory, its overhead included.
        let q = unix(a.as_raw_fd()).unwrap().queued;
        assert!((1000..64 << 10).contains(&q), "{q}");
        let mut buf = [0u8; 1000];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(unix(a.as_raw_fd()).unwrap().queued, 0);
    }

    #[test]
    fn a_tcp_socket_reports_its_queue_and_a_bdp_once_data_was_acknowledged() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(&[1u8; 64 << 10]).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        b.read_exact(&mut buf).unwrap();
        // The acknowledgements come back on their own time: wait for them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let q = loop {
            let q = tcp(a.as_raw_fd()).unwrap();
            if (q.queued == 0 && q.bdp.is_some()) || std::time::Instant::now() > deadline {
                break q;
            }
            std::thread::yield_now();
        };
        assert_eq!(q.queued, 0, "{q:?}");
        assert!(q.bdp.is_some_and(|b| b > 0), "{q:?}");
        assert!(q.delivery_rate.is_some_and(|r| r > 0), "{q:?}");
    }
}
