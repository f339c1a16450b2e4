//! The return path: the one message the destination sends back on the migration socket
//! (see the parent module for its layout), and its checked decoding on the source.

use std::io::{self, Read, Write};

/// The first four bytes of a reply: "MVMR".
pub const REPLY_MAGIC: [u8; 4] = *b"MVMR";
/// The longest message a reply carries.
pub const MAX_REPLY_MESSAGE: usize = 4096;

/// What the destination answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The guest runs on the destination.
    Running,
    /// The destination failed; the message says why.
    Failed(String),
    /// Local migration: every block handed over so far is mapped.
    Mapped,
    /// Local migration: everything is loaded and restored; the guest starts on `go`.
    Ready,
    /// Local migration: the guest runs, since this CLOCK_MONOTONIC instant (ns) — the
    /// host's clock, which both processes share.
    RunningSince(u64),
    /// Post-copy: the guest runs on the destination since this CLOCK_MONOTONIC instant
    /// (ns); its missing pages come from the source.
    PostcopyRunning(u64),
    /// Post-copy: the destination needs `pages` pages from `offset` (page-aligned) of
    /// block `id` now (a vCPU or the VMM waits on the first).
    PageRequest {
        /// The block.
        id: String,
        /// Offset in the block.
        offset: u64,
        /// Pages wanted, at least one.
        pages: u32,
    },
    /// Post-copy: every page is in place on the destination; the message is its figures
    /// (JSON).
    PostcopyDone(String),
    /// Post-copy recovery: pages of block `id` the destination still misses, as runs of
    /// (first page, count), ascending; message `RUNS ID`, RUNS being `HEX+COUNT` pairs
    /// joined by commas. One block may take several messages.
    PostcopyMissing {
        /// The block.
        id: String,
        /// The runs.
        runs: Vec<(u64, u64)>,
    },
    /// Post-copy recovery: every missing page was listed; the stream may go on.
    PostcopyResumeReady,
}

/// The most runs one [`Reply::PostcopyMissing`] carries (its text stays within
/// [`MAX_REPLY_MESSAGE`] with the longest idstr).
pub const MAX_RUNS_PER_MESSAGE: usize = 100;

/// Why a reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The transport failed or timed out (or closed: `UnexpectedEof`).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Bytes that are not a reply.
    #[error("{0}")]
    Bad(String),
}

impl Reply {
    /// Writes the reply and flushes.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        let since;
        let (status, msg) = match self {
            Reply::Running => (0u8, "running"),
            Reply::Failed(m) => (1u8, m.as_str()),
            Reply::Mapped => (2u8, "mapped"),
            Reply::Ready => (3u8, "ready"),
            Reply::RunningSince(ns) => {
                since = ns.to_string();
                (4u8, since.as_str())
            }
            Reply::PostcopyRunning(ns) => {
                since = ns.to_string();
                (5u8, since.as_str())
            }
            Reply::PageRequest { id, offset, pages } => {
                since = format!("{offset:x} {pages} {id}");
                (6u8, since.as_str())
            }
            Reply::PostcopyDone(m) => (7u8, m.as_str()),
            Reply::PostcopyMissing { id, runs } => {
                let list: Vec<String> = runs.iter().map(|(f, n)| format!("{f:x}+{n}")).collect();
                since = format!("{} {id}", list.join(","));
                (8u8, since.as_str())
            }
            Reply::PostcopyResumeReady => (9u8, "ready"),
        };
        // Cut at a character boundary within the limit.
        let mut end = msg.len().min(MAX_REPLY_MESSAGE);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = Vec::with_capacity(7 + end);
        buf.extend_from_slice(&REPLY_MAGIC);
        buf.push(status);
        buf.extend_from_slice(&(end as u16).to_be_bytes());
        buf.extend_from_slice(&msg.as_bytes()[..end]);
        w.write_all(&buf)?;
        w.flush()
    }

    /// Reads one reply, checking every byte.
    pub fn read_from(r: &mut dyn Read) -> Result<Reply, ReplyError> {
        let mut head = [0u8; 7];
        r.read_exact(&mut head)?;
        if head[..4] != REPLY_MAGIC {
            return Err(ReplyError::Bad(format!(
                "not a reply (starts with {:02x?})",
                &head[..4]
            )));
        }
        let len = usize::from(u16::from_be_bytes([head[5], head[6]]));
        if len > MAX_REPLY_MESSAGE {
            return Err(ReplyError::Bad(format!("a message of {len} bytes")));
        }
        let mut msg = vec![0u8; len];
        r.read_exact(&mut msg)?;
        let msg = String::from_utf8(msg)
            .map_err(|_| ReplyError::Bad("a message that is not UTF-8".into()))?;
        match head[4] {
            0 => Ok(Reply::Running),
            1 => Ok(Reply::Failed(msg)),
            2 => Ok(Reply::Mapped),
            3 => Ok(Reply::Ready),
            4 => msg
                .parse()
                .map(Reply::RunningSince)
                .map_err(|_| ReplyError::Bad(format!("running since {msg:?}"))),
            5 => msg
                .parse()
                .map(Reply::PostcopyRunning)
                .map_err(|_| ReplyError::Bad(format!("post-copy running since {msg:?}"))),
            6 => parse_request(&msg),
            7 => Ok(Reply::PostcopyDone(msg)),
            8 => parse_missing(&msg),
            9 => Ok(Reply::PostcopyResumeReady),
            s => Err(ReplyError::Bad(format!("unknown status {s}"))),
        }
    }
}

/// A missing-pages message: `HEX+COUNT[,HEX+COUNT...] ID`, strictly (at most
/// [`MAX_RUNS_PER_MESSAGE`] runs, each count at least 1).
fn parse_missing(msg: &str) -> Result<Reply, ReplyError> {
    let bad = || ReplyError::Bad(format!("missing pages {msg:?}"));
    let (list, id) = msg.split_once(' ').ok_or_else(bad)?;
    if id.is_empty() || list.is_empty() {
        return Err(bad());
    }
    let mut runs = Vec::new();
    for item in list.split(',') {
        if runs.len() == MAX_RUNS_PER_MESSAGE {
            return Err(bad());
        }
        let (first, count) = item.split_once('+').ok_or_else(bad)?;
        let hex_ok =
            !first.is_empty() && first.len() <= 16 && first.bytes().all(|b| b.is_ascii_hexdigit());
        let dec_ok =
            !count.is_empty() && count.len() <= 16 && count.bytes().all(|b| b.is_ascii_digit());
        if !hex_ok || !dec_ok {
            return Err(bad());
        }
        let first = u64::from_str_radix(first, 16).map_err(|_| bad())?;
        let count: u64 = count.parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        runs.push((first, count));
    }
    Ok(Reply::PostcopyMissing {
        id: id.to_string(),
        runs,
    })
}

/// A page request's message: `OFFSET_HEX PAGES ID`, strictly.
fn parse_request(msg: &str) -> Result<Reply, ReplyError> {
    let bad = || ReplyError::Bad(format!("page request {msg:?}"));
    let mut parts = msg.splitn(3, ' ');
    let (Some(offset), Some(pages), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let digits = |s: &str, hex: bool| {
        !s.is_empty()
            && s.len() <= 16
            && s.bytes().all(|b| {
                if hex {
                    b.is_ascii_hexdigit()
                } else {
                    b.is_ascii_digit()
                }
            })
    };
    if !digits(offset, true) || !digits(pages, false) || id.is_empty() {
        return Err(bad());
    }
    Ok(Reply::PageRequest {
        id: id.to_string(),
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        pages: pages.parse().map_err(|_| bad())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip_and_junk_is_refused() {
        for r in [
            Reply::Running,
            Reply::Failed("no such block \"x\"".into()),
            Reply::Mapped,
            Reply::Ready,
            Reply::RunningSince(123_456_789_012),
            Reply::PostcopyRunning(42),
            Reply::PageRequest {
                id: "pc.ram 1".into(),
                offset: 0x7fff_f000,
                pages: 3,
            },
            Reply::PostcopyDone("{\"requests\":3}".into()),
            Reply::PostcopyMissing {
                id: "ram one".into(),
                runs: vec![(0, 1), (0x10, 300)],
            },
            Reply::PostcopyResumeReady,
        ] {
            let mut buf = Vec::new();
            r.write_to(&mut buf).unwrap();
            assert_eq!(Reply::read_from(&mut &buf[..]).unwrap(), r);
        }
        let long = Reply::Failed("é".repeat(3000));
        let mut buf = Vec::new();
        long.write_to(&mut buf).unwrap();
        assert!(buf.len() <= 7 + MAX_REPLY_MESSAGE);
        assert!(matches!(
            Reply::read_from(&mut &buf[..]),
            Ok(Reply::Failed(_))
        ));
        let bad = |b: &[u8]| Reply::read_from(&mut &b[..]).unwrap_err().to_string();
        assert!(bad(b"HTTP/1.1 200").contains("not a reply"));
        assert!(bad(b"MVMR\x0a\0\0").contains("unknown status 10"));
        for junk in [
            "",
            "x",
            "1+1",
            " x",
            "1+0 x",
            "+1 x",
            "1+ x",
            "g+1 x",
            "1+1,,2+1 x",
        ] {
            let mut buf = b"MVMR\x08".to_vec();
            buf.extend_from_slice(&(junk.len() as u16).to_be_bytes());
            buf.extend_from_slice(junk.as_bytes());
            assert!(bad(&buf).contains("missing pages"), "{junk:?}");
        }
        for junk in [
            "",
            "1 2",
            "-1 2 x",
            "g 2 x",
            "1 -2 x",
            "1 2 ",
            "1 99999999999 x",
            " 1 2 x",
        ] {
            let mut buf = b"MVMR\x06".to_vec();
            buf.extend_from_slice(&(junk.len() as u16).to_be_bytes());
            buf.extend_from_slice(junk.as_bytes());
            assert!(bad(&buf).contains("page request"), "{junk:?}");
        }
        assert!(bad(b"MVMR\0\xff\xff").contains("65535 bytes"));
        assert!(bad(b"MVMR\0\0\x02\xff\xfe").contains("not UTF-8"));
        assert!(matches!(
            Reply::read_from(&mut &b"MVM"[..]),
            Err(ReplyError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
    }
}
