//! The destination's side of a local migration: [`incoming_local`] maps each block the
//! source hands over (through the VMM's [`BlockHotplug::map_shared`](crate::load::BlockHotplug::map_shared)), loads the ordinary
//! stream that follows (no pages: the setup and the states), restores, says it is ready,
//! and starts the guest only once the source sent `go`.

use super::wire::{FdReader, LayoutError, Record, SharedBlock, GO, LOCAL_MAGIC};
use crate::live::dest::{IncomingOptions, IncomingStats};
use crate::live::error::IncomingError;
use crate::live::progress::ms;
use crate::live::reply::Reply;
use crate::live::RestorableVm;
use crate::load::{load_without_pages, HotplugError};
use crate::transport::Connection;
use ramlist::RamList;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Receives whichever migration comes on `conn`: a local one (a unix socket whose first
/// bytes are the local header: [`incoming_local`]) or an ordinary stream
/// ([`incoming`](crate::live::incoming)).
pub fn incoming_any(
    vm: &mut dyn RestorableVm,
    conn: Connection,
    opts: &IncomingOptions,
) -> Result<IncomingStats, IncomingError> {
    let stall = Some(opts.stall_timeout.max(Duration::from_millis(1)));
    conn.set_timeouts(stall, stall)
        .map_err(IncomingError::Setup)?;
    let mut magic = [0u8; 4];
    // A source that sends fewer than four bytes fails the ordinary loader just the same.
    let local = matches!(conn.peek_unix(&mut magic), Ok(Some(()))) && magic == LOCAL_MAGIC;
    if !local {
        return crate::live::incoming(vm, conn, opts);
    }
    match conn.into_unix() {
        Some(sock) => incoming_local(vm, sock, opts),
        None => Err(IncomingError::Setup(io::Error::other(
            "a local migration on a socket that is not a unix socket",
        ))),
    }
}

/// Receives a local migration on `sock` (whose first bytes are the local header) into
/// `vm`. A failure before `go` is reported to the source, which resumes its guest; the
/// guest is not started here then.
pub fn incoming_local(
    vm: &mut dyn RestorableVm,
    sock: UnixStream,
    opts: &IncomingOptions,
) -> Result<IncomingStats, IncomingError> {
    let t0 = Instant::now();
    let stall = Some(opts.stall_timeout.max(Duration::from_millis(1)));
    sock.set_read_timeout(stall)
        .and_then(|()| sock.set_write_timeout(stall))
        .map_err(IncomingError::Setup)?;
    let mut reader = FdReader::new(&sock);
    let fail = |e: IncomingError| {
        log::error!("migration: {e}");
        if let Err(err) = Reply::Failed(e.to_string()).write_to(&mut &sock) {
            log::debug!("migration: the source did not take the failure reply: {err}");
        }
        e
    };
    match receive(vm, &mut reader, &sock, opts) {
        Ok((summary, load_ms)) => {
            let stats = IncomingStats {
                summary,
                load_ms,
                total_ms: ms(t0.elapsed()),
                postcopy: None,
            };
            log::info!(
                "migration: local incoming completed in {:.3} ms ({} bytes, no page copied)",
                stats.total_ms,
                stats.summary.bytes
            );
            Ok(stats)
        }
        Err(Failure::Report(e)) => Err(fail(e)),
        Err(Failure::Quiet(e)) => Err(e),
    }
}

/// How a failure ends: reported to the source (before `go`), or not (the source is gone,
/// or the guest already runs here).
enum Failure {
    Report(IncomingError),
    Quiet(IncomingError),
}

fn layout_err(e: LayoutError) -> Failure {
    Failure::Report(IncomingError::Layout(e))
}

fn receive(
    vm: &mut dyn RestorableVm,
    reader: &mut FdReader<'_>,
    sock: &UnixStream,
    opts: &IncomingOptions,
) -> Result<(crate::load::LoadSummary, f64), Failure> {
    let t0 = Instant::now();
    let ram = vm.ram();
    reader.read_header().map_err(layout_err)?;
    // 1. The blocks as they are while the source's guest runs; then say they are mapped.
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut count = 0u32;
    apply_layout(vm, &ram, reader, opts, &mut added, &mut removed, &mut count)?;
    Reply::Mapped
        .write_to(&mut &*sock)
        .map_err(|e| Failure::Quiet(IncomingError::Confirm(e)))?;
    // 2. What changed while it paused, then the ordinary stream: setup and states.
    apply_layout(vm, &ram, reader, opts, &mut added, &mut removed, &mut count)?;
    let bytes0 = reader.bytes_read();
    // No page may come: the loader refuses any before it writes one.
    let mut summary = load_without_pages(&ram, &mut *reader, &opts.load)
        .map_err(|e| Failure::Report(IncomingError::Load(e)))?;
    reader.no_stray_fds().map_err(layout_err)?;
    summary.bytes = reader.bytes_read() - bytes0;
    summary.blocks_added = added;
    summary.blocks_removed = removed;
    let load_ms = ms(t0.elapsed());
    let t1 = Instant::now();
    vm.restore_state(&summary.states)
        .map_err(|e| Failure::Report(IncomingError::Restore(e)))?;
    let restored_in = t1.elapsed();
    // 3. Ready; the guest starts only after `go` (the source gave it up).
    Reply::Ready
        .write_to(&mut &*sock)
        .map_err(|e| Failure::Quiet(IncomingError::Confirm(e)))?;
    let mut go = [0u8; 4];
    reader
        .read_exact(&mut go)
        .map_err(|e| Failure::Quiet(IncomingError::NoGo(e)))?;
    if go != GO {
        return Err(Failure::Report(IncomingError::NoGo(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{go:02x?} instead of go"),
        ))));
    }
    let t2 = Instant::now();
    vm.resume()
        .map_err(|e| Failure::Report(IncomingError::Resume(e)))?;
    log::debug!(
        "migration: local incoming: restored in {restored_in:?}, resumed in {:?} after go",
        t2.elapsed()
    );
    let running = match vm.running_since_ns() {
        Some(ns) => Reply::RunningSince(ns),
        None => Reply::Running,
    };
    running
        .write_to(&mut &*sock)
        .and_then(|()| (&*sock).flush())
        .map_err(|e| {
            // The source gave the guest up at `go`: it stays running here.
            log::warn!("migration: the guest runs; the source did not hear it: {e}");
        })
        .ok();
    Ok((summary, load_ms))
}

/// Applies one layout (records up to DONE): each ADD checked against its file and mapped,
/// each DEL dropped.
fn apply_layout(
    vm: &mut dyn RestorableVm,
    ram: &RamList,
    reader: &mut FdReader<'_>,
    opts: &IncomingOptions,
    added: &mut Vec<String>,
    removed: &mut Vec<String>,
    n: &mut u32,
) -> Result<(), Failure> {
    loop {
        match reader.next_record().map_err(layout_err)? {
            Record::Done => return Ok(()),
            Record::Add(block) => {
                *n += 1;
                if *n > crate::stream::MAX_SETUP_BLOCKS {
                    return Err(layout_err(LayoutError::BadBlock {
                        id: block.id,
                        what: format!("more than {} blocks", crate::stream::MAX_SETUP_BLOCKS),
                    }));
                }
                check_file(&block, opts.load.max_new_block).map_err(layout_err)?;
                let (id, len) = (block.id.clone(), block.len);
                vm.hotplug()
                    .map_shared(ram, &block)
                    .map_err(|e| Failure::Report(hotplug_err(&id, e)))?;
                let placed = block_len(ram, &id);
                if placed != Some(len) {
                    return Err(Failure::Report(hotplug_err(
                        &id,
                        format!("mapped with {placed:?} bytes, not {len:#x}").into(),
                    )));
                }
                added.push(id);
            }
            Record::Del(id) => {
                vm.hotplug()
                    .remove_block(ram, &id)
                    .map_err(|e| Failure::Report(hotplug_err(&id, e)))?;
                removed.push(id);
            }
        }
    }
}

fn hotplug_err(id: &str, e: HotplugError) -> IncomingError {
    IncomingError::Layout(LayoutError::BadBlock {
        id: id.to_string(),
        what: e.to_string(),
    })
}

/// The length of block `id` on `ram`, if it has one.
fn block_len(ram: &RamList, id: &str) -> Option<u64> {
    let guard = rcu::read_lock();
    ram.block_by_id(&guard, id).map(|b| b.len())
}

/// The file must be a regular file (a memfd, a file on tmpfs or hugetlbfs) that holds the
/// whole block: a mapping past its end would fault (SIGBUS) on the guest's first touch.
fn check_file(b: &SharedBlock, max_len: u64) -> Result<(), LayoutError> {
    let bad = |what: String| LayoutError::BadBlock {
        id: b.id.clone(),
        what,
    };
    if b.len > max_len {
        return Err(bad(format!(
            "{:#x} bytes is over the {max_len:#x} this destination accepts",
            b.len
        )));
    }
    let file = std::fs::File::from(
        b.fd.as_fd()
            .try_clone_to_owned()
            .map_err(|e| bad(format!("its descriptor: {e}")))?,
    );
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("its descriptor: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(bad("its descriptor is not a regular file".into()));
    }
    // A file that can shrink under the mapping would fault the guest (and this VMM, on
    // its own access) with SIGBUS: only a file sealed against shrinking is mapped.
    if !sealed_against_shrinking(&file) {
        return Err(bad(
            "its file is not sealed against shrinking (F_SEAL_SHRINK): the source could cut it short under the guest".into(),
        ));
    }
    // Offset and length were checked not to overflow.
    if meta.len() < b.offset + b.len {
        return Err(bad(format!(
            "its file holds {:#x} bytes, short of offset {:#x} + length {:#x}",
            meta.len(),
            b.offset,
            b.len
        )));
    }
    Ok(())
}

/// The destination's side of [`BlockHotplug::map_shared`](crate::load::BlockHotplug::map_shared) for VMMs without KVM slots:
/// maps the file where the block's id is, replacing a block of the same id and length.
pub fn map_shared_plain(ram: &RamList, block: &SharedBlock) -> Result<(), HotplugError> {
    if let Some(len) = block_len(ram, &block.id) {
        if len != block.len {
            return Err(format!("the destination's block has {len:#x} bytes").into());
        }
        ram.free(&block.id)?;
    }
    let opts = ramlist::RamBlockOptions {
        guest_addr: block.guest_addr,
        ..ramlist::RamBlockOptions::default()
    };
    ram.alloc_from_fd(&block.id, block.len, block.fd.as_fd(), block.offset, opts)?;
    Ok(())
}

/// Whether `file` carries F_SEAL_SHRINK (a memfd made with sealing allowed and sealed).
pub(super) fn sealed_against_shrinking(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GET_SEALS on a descriptor we hold open; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}
