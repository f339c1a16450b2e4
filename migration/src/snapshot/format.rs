//! `DIR/state`: the snapshot's layout and component states, and its checked decoding.
//!
//! ```text
//! state   := "MVSN" | version u32 (1) | page size u32 | snapshot id u64
//!            | memory length u64                 (DIR/memory's exact size; its last page,
//!                                                 past every block, is "MVSM" | id u64)
//!            | parent id u64 (0: a full snapshot) | parent dir: length u16 | UTF-8
//!            | block count u32 (<= 4096) | block*
//!            | state count u32 (<= 4096) | (idstr name | length u32 | bytes)*
//!            | crc32 u32                         (of every byte before it)
//! block   := idstr | length u64 | guest_addr u64 (u64::MAX: none) | file offset u64
//!            | flags u8 (bit 0: hot-added)
//! ```
//! Integers are big-endian; an idstr is the stream's. A block's pages are at its file
//! offset in `DIR/memory`, page for page. In a full snapshot, pages the guest never wrote
//! and zero pages are holes. In a diff snapshot (a parent), the pages written are the ones
//! that changed since the parent (zero pages written as zeros), and a hole means "as in
//! the parent": the layout is the parent's, block for block.

use crate::load::ComponentState;
use crate::stream::{MAX_ID_LEN, MAX_SETUP_BLOCKS, PAGE_SIZE};
use std::collections::HashSet;

/// The first four bytes of `DIR/state`: "MVSN" (minivmm snapshot).
pub const STATE_MAGIC: [u8; 4] = *b"MVSN";
/// The layout this module reads and writes.
pub const STATE_VERSION: u32 = 1;
/// The most state blobs a snapshot holds.
const MAX_STATES: u32 = 4096;
/// The largest `DIR/state` read (states are a few KiB per vCPU).
pub const MAX_STATE_FILE: u64 = 64 << 20;
const NO_ADDR: u64 = u64::MAX;
const HOTPLUGGED: u8 = 0x01;

/// One RAM block of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBlock {
    /// Its id.
    pub id: String,
    /// Its length in bytes (whole pages).
    pub len: u64,
    /// Where the guest saw it.
    pub guest_addr: Option<u64>,
    /// Where its pages start in `DIR/memory` (page-aligned).
    pub file_offset: u64,
    /// Added at run time (`ram-add`), not built from the configuration.
    pub hotplugged: bool,
}

/// The snapshot a diff snapshot is a diff of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// Its id (checked when the stack is restored).
    pub id: u64,
    /// Its directory, as given when the diff was taken (absolute).
    pub dir: String,
}

/// The longest parent directory a state names.
const MAX_PARENT_DIR: usize = 4096;

/// What `DIR/state` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotState {
    /// Names this snapshot (never 0).
    pub id: u64,
    /// `DIR/memory`'s size in bytes.
    pub memory_len: u64,
    /// For a diff snapshot, the snapshot it is a diff of.
    pub parent: Option<Parent>,
    /// The RAM layout, in file order.
    pub blocks: Vec<SnapshotBlock>,
    /// Every component's state (vCPUs, devices), as a migration sends them.
    pub states: Vec<ComponentState>,
}

/// What is wrong with a snapshot: said before anything of it is mapped.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done ("reading", "writing", ...).
        what: &'static str,
        /// The file.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// `DIR/state` is not a snapshot state of this version, or its checksum fails.
    #[error("{path}: {why}")]
    BadState {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The VM could not do what the snapshot needs (pause, save its state...).
    #[error("the VM could not {op}: {source}")]
    Vm {
        /// What was asked.
        op: &'static str,
        /// The VM's error.
        source: crate::live::VmError,
    },
    /// `DIR/memory` does not match the layout (truncated, swapped, grown).
    #[error("{path} holds {actual} bytes, but the snapshot's layout says {expected}: truncated or not this snapshot's memory")]
    MemoryLength {
        /// The memory file.
        path: String,
        /// Its size.
        actual: u64,
        /// The layout's.
        expected: u64,
    },
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

impl SnapshotState {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_be_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.memory_len.to_be_bytes());
        let (pid, pdir) = self
            .parent
            .as_ref()
            .map_or((0, ""), |p| (p.id, p.dir.as_str()));
        out.extend_from_slice(&pid.to_be_bytes());
        let pdir = &pdir.as_bytes()[..pdir.len().min(MAX_PARENT_DIR)];
        out.extend_from_slice(&(pdir.len() as u16).to_be_bytes());
        out.extend_from_slice(pdir);
        out.extend_from_slice(&(self.blocks.len() as u32).to_be_bytes());
        let idstr = |out: &mut Vec<u8>, s: &str| {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        for b in &self.blocks {
            idstr(&mut out, &b.id);
            out.extend_from_slice(&b.len.to_be_bytes());
            out.extend_from_slice(&b.guest_addr.unwrap_or(NO_ADDR).to_be_bytes());
            out.extend_from_slice(&b.file_offset.to_be_bytes());
            out.push(if b.hotplugged { HOTPLUGGED } else { 0 });
        }
        out.extend_from_slice(&(self.states.len() as u32).to_be_bytes());
        for s in &self.states {
            idstr(&mut out, &s.name);
            out.extend_from_slice(&(s.data.len() as u32).to_be_bytes());
            out.extend_from_slice(&s.data);
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes `bytes` (the file `path`), checking every value: the magic, version, page
    /// size and checksum; each block's id (valid, unique), length (whole pages, non-zero),
    /// guest address (page-aligned, no overflow, no two blocks overlapping) and file range
    /// (page-aligned, inside the memory length, no two overlapping); each state's name
    /// (valid, unique); no byte left over.
    pub fn decode(bytes: &[u8], path: &str) -> Result<SnapshotState, SnapshotError> {
        let bad = |why: String| SnapshotError::BadState {
            path: path.to_string(),
            why,
        };
        if bytes.len() < 4 + 4 + 4 + 8 + 8 + 4 + 4 + 4 {
            return Err(bad(format!(
                "{} bytes: too short to be a snapshot state",
                bytes.len()
            )));
        }
        if bytes[..4] != STATE_MAGIC {
            return Err(bad(format!(
                "not a snapshot state (starts with {:02x?})",
                &bytes[..4]
            )));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if crc32(body) != stored {
            return Err(bad(
                "its checksum does not match: the file was changed or damaged".into(),
            ));
        }
        let mut r = Cursor { b: body, at: 4 };
        let version = r.u32().map_err(&bad)?;
        if version != STATE_VERSION {
            return Err(bad(format!(
                "version {version}; this VMM reads {STATE_VERSION}"
            )));
        }
        let page = r.u32().map_err(&bad)?;
        if u64::from(page) != PAGE_SIZE {
            return Err(bad(format!("page size {page}, not {PAGE_SIZE}")));
        }
        let id = r.u64().map_err(&bad)?;
        if id == 0 {
            return Err(bad("snapshot id 0".into()));
        }
        let memory_len = r.u64().map_err(&bad)?;
        if memory_len < PAGE_SIZE || !memory_len.is_multiple_of(PAGE_SIZE) {
            return Err(bad(format!("a memory length of {memory_len:#x} bytes")));
        }
        // The last page is the trailer that names the snapshot: no block reaches it.
        let blocks_end = memory_len - PAGE_SIZE;
        let pid = r.u64().map_err(&bad)?;
        let plen = usize::from(r.u16().map_err(&bad)?);
        if plen > MAX_PARENT_DIR {
            return Err(bad(format!("a parent directory of {plen} bytes")));
        }
        let pdir = std::str::from_utf8(r.take(plen).map_err(&bad)?)
            .map_err(|_| bad("a parent directory that is not UTF-8".into()))?;
        let parent = match (pid, pdir) {
            (0, "") => None,
            (0, _) | (_, "") => {
                return Err(bad("a parent with no id or no directory".into()));
            }
            (id, dir) if dir.contains('\0') || !dir.starts_with('/') => {
                let _ = id;
                return Err(bad(format!(
                    "parent directory {dir:?} is not an absolute path"
                )));
            }
            (id, dir) => Some(Parent {
                id,
                dir: dir.to_string(),
            }),
        };
        let count = r.u32().map_err(&bad)?;
        if count == 0 || count > MAX_SETUP_BLOCKS {
            return Err(bad(format!("{count} RAM blocks")));
        }
        let mut blocks = Vec::new();
        let mut ids = HashSet::new();
        for _ in 0..count {
            let bid = r.idstr().map_err(&bad)?;
            let len = r.u64().map_err(&bad)?;
            let addr = r.u64().map_err(&bad)?;
            let file_offset = r.u64().map_err(&bad)?;
            let flags = r.u8().map_err(&bad)?;
            let wrong = |what: String| bad(format!("block {bid:?}: {what}"));
            if !ids.insert(bid.clone()) {
                return Err(wrong("listed twice".into()));
            }
            if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
                return Err(wrong(format!("a length of {len:#x} bytes")));
            }
            let guest_addr = (addr != NO_ADDR).then_some(addr);
            if let Some(a) = guest_addr {
                if !a.is_multiple_of(PAGE_SIZE) || a.checked_add(len).is_none() {
                    return Err(wrong(format!("guest address {a:#x}")));
                }
            }
            let end = file_offset.checked_add(len);
            if !file_offset.is_multiple_of(PAGE_SIZE) || end.is_none_or(|e| e > blocks_end) {
                return Err(wrong(format!(
                    "file range {file_offset:#x}+{len:#x} is not inside the {memory_len:#x}-byte memory file (before its last page)"
                )));
            }
            if flags & !HOTPLUGGED != 0 {
                return Err(wrong(format!("flags {flags:#04x}")));
            }
            blocks.push(SnapshotBlock {
                id: bid,
                len,
                guest_addr,
                file_offset,
                hotplugged: flags & HOTPLUGGED != 0,
            });
        }
        let overlap = |ranges: &mut Vec<(u64, u64, &str)>, what: &str| {
            ranges.sort();
            for w in ranges.windows(2) {
                if w[0].1 > w[1].0 {
                    return Err(bad(format!(
                        "blocks {:?} and {:?} overlap in {what}",
                        w[0].2, w[1].2
                    )));
                }
            }
            Ok(())
        };
        let mut file: Vec<_> = blocks
            .iter()
            .map(|b| (b.file_offset, b.file_offset + b.len, b.id.as_str()))
            .collect();
        overlap(&mut file, "the memory file")?;
        let mut guest: Vec<_> = blocks
            .iter()
            .filter_map(|b| b.guest_addr.map(|a| (a, a + b.len, b.id.as_str())))
            .collect();
        overlap(&mut guest, "guest-physical memory")?;
        let n = r.u32().map_err(&bad)?;
        if n > MAX_STATES {
            return Err(bad(format!("{n} component states")));
        }
        let mut states = Vec::new();
        let mut names = HashSet::new();
        for _ in 0..n {
            let name = r.idstr().map_err(&bad)?;
            if !names.insert(name.clone()) {
                return Err(bad(format!("state {name:?} listed twice")));
            }
            let len = r.u32().map_err(&bad)? as usize;
            let data = r.take(len).map_err(&bad)?.to_vec();
            states.push(ComponentState { name, data });
        }
        if r.at != body.len() {
            return Err(bad(format!("{} bytes after the states", body.len() - r.at)));
        }
        Ok(SnapshotState {
            id,
            memory_len,
            parent,
            blocks,
            states,
        })
    }
}

/// Bounded reads of the state's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end
            .ok_or_else(|| format!("ends at byte {} inside a value of {n} bytes", self.b.len()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn idstr(&mut self) -> Result<String, String> {
        let n = usize::from(self.u8()?);
        if n == 0 || n > MAX_ID_LEN {
            return Err(format!("an id of {n} bytes"));
        }
        let s = std::str::from_utf8(self.take(n)?)
            .map_err(|_| "an id that is not UTF-8".to_string())?;
        if s.contains('\0') {
            return Err(format!("id {s:?} holds a NUL"));
        }
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotState {
        SnapshotState {
            id: 7,
            memory_len: (6 << 20) + 4096,
            parent: Some(Parent {
                id: 3,
                dir: "/var/tmp/base".into(),
            }),
            blocks: vec![
                SnapshotBlock {
                    id: "ram-below-4g".into(),
                    len: 4 << 20,
                    guest_addr: Some(0),
                    file_offset: 0,
                    hotplugged: false,
                },
                SnapshotBlock {
                    id: "extra".into(),
                    len: 2 << 20,
                    guest_addr: Some(1 << 32),
                    file_offset: 4 << 20,
                    hotplugged: true,
                },
            ],
            states: vec![ComponentState {
                name: "cpu0".into(),
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn a_state_round_trips() {
        let s = sample();
        assert_eq!(SnapshotState::decode(&s.encode(), "s").unwrap(), s);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                SnapshotState::decode(&bytes[..n], "s").is_err(),
                "cut at {n}"
            );
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(SnapshotState::decode(&b, "s").is_err(), "flip {i}.{bit}");
            }
        }
    }

    #[test]
    fn hostile_layouts_with_a_good_checksum_are_refused_by_name() {
        let refuse = |f: &dyn Fn(&mut SnapshotState), want: &str| {
            let mut s = sample();
            f(&mut s);
            let e = SnapshotState::decode(&s.encode(), "st")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        };
        refuse(
            &|s| s.blocks[1].file_offset = 3 << 20,
            "overlap in the memory file",
        );
        refuse(
            &|s| s.blocks[1].guest_addr = Some(1 << 20),
            "overlap in guest-physical",
        );
        refuse(&|s| s.blocks[1].file_offset = 5 << 20, "not inside the");
        refuse(
            &|s| s.blocks[1].file_offset = u64::MAX - 4095,
            "not inside the",
        );
        refuse(&|s| s.blocks[0].len = 4097, "a length of 0x1001");
        refuse(&|s| s.blocks[1].id = "ram-below-4g".into(), "listed twice");
        refuse(
            &|s| s.blocks[1].guest_addr = Some(u64::MAX - 4095),
            "guest address",
        );
        refuse(&|s| s.blocks.clear(), "0 RAM blocks");
        refuse(&|s| s.id = 0, "snapshot id 0");
        refuse(
            &|s| s.parent.as_mut().unwrap().dir = "rel/dir".into(),
            "not an absolute path",
        );
        refuse(&|s| s.parent.as_mut().unwrap().id = 0, "no id");
        refuse(
            &|s| s.states.push(s.states[0].clone()),
            "state \"cpu0\" listed twice",
        );
    }
}
