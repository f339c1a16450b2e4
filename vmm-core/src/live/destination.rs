//! The destination of a live migration, `vmm run --incoming URI`: the receiving thread
//! ([`receive`]) and what it and the control API share ([`IncomingSlot`]). The VMM
//! process around it (the machine built empty, the main loop, how the VMM ends) is
//! `crate::vmm::incoming`.
//!
//! The machine runs as `vmm run` runs it — the main loop with the control API, the
//! signals, one thread per vCPU — except that the vCPU threads start parked at their first
//! checkpoint, before any KVM_RUN ([`crate::machine::Start::Parked`]). The stream is
//! received beside the main loop, on a thread of its own, by the migration crate's driver
//! ([`migration::live::incoming`]) over `DestVm`.
//! The stages, as `status` shows them in `incoming.stage`:
//!
//! 1. `listening`: the URI is bound (before the thread starts: a bad URI fails at once).
//! 2. `loading`: a source connected; the checked loader fills the RAM list.
//! 3. `restoring`: PIT, PICs, IOAPIC and kvmclock from here, each vCPU's state on its own
//!    parked thread, then COM1.
//! 4. `starting`: [`RestorableVm::resume`] releases the vCPUs and returns once every vCPU
//!    thread has left its park (each on its way into KVM_RUN). Only then does the driver
//!    confirm "running" to the source, so a confirmed destination really runs. If the
//!    release fails (a vCPU still parked after 2 s, the VM stopping, a quit that came
//!    first), the vCPUs are parked again and the reply is a failure: the source resumes
//!    its own guest.
//! 5. `completed`: the guest runs here, and the VMM goes on as `vmm run` would. A
//!    confirmation that could not be sent (the source may have given up and resumed its
//!    copy) stops the guest here instead (stage `failed`) and ends the VMM with an error.
//!
//! The control API is served from the start. Until the guest runs here `status` says
//! `"state": "inmigrate"` (QEMU's run state for a destination waiting for its stream) and
//! `quit`, like SIGINT, SIGTERM or SIGHUP, abandons the migration: the connection is shut
//! down (the source sees its destination go, and resumes its guest) and the VMM ends with
//! a non-zero status and `vmm: incoming migration from URI abandoned: quit through the
//! control API, before the guest ran here`. Every other command is refused with class
//! `inmigrate`. Once the stage is `completed`, `quit` is an ordinary quit.
//!
//! A stream that fails (refused, truncated, stalled) ends the VMM with exactly one line,
//! `vmm: incoming migration failed: ...`: the receiving thread's own log stays quiet
//! unless `VMM_LOG` asks for it.

use crate::boot::layout::{check_hotplug_addr, free_guest_range};
use crate::config::MemoryBackend;
use crate::events::{EventBus, VmEvent};
use crate::machine::backing::add_block;
use crate::machine::Machine;
use crate::persist::VmState;
use migration::live::local::{incoming_any, SharedBlock};
use migration::live::{
    ComponentState, IncomingError, IncomingOptions, IncomingStats, RestorableVm, VmError,
};
use migration::load::{BlockHotplug, HotplugError};
use migration::transport::{
    Accepted, Connection, ConnectionControl, Listener, MigrationUri, TransportError,
};
use ramlist::kvm::KvmRam;
use ramlist::{RamBlockOptions, RamList};
use serde::Serialize;
use serde_json::json;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a paused post-copy waits before it tries its incoming URI again.
const RELISTEN_RETRY: Duration = Duration::from_millis(500);
/// How often the receiving thread, waiting for the source, looks for an abandon.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// TLS handshakes run at once, at most, while the destination waits for its source.
const MAX_HANDSHAKES: usize = 16;

/// Where an incoming migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IncomingStage {
    /// `--incoming defer`: waiting for QMP's `migrate-incoming` to say where to listen.
    Deferred,
    /// Waiting for the source to connect (or about to open the snapshot file).
    Listening,
    /// Reading the stream into guest RAM.
    Loading,
    /// Putting the CPU and device state in place.
    Restoring,
    /// Releasing the vCPUs.
    Starting,
    /// Post-copy: the guest runs here, and the pages it misses are still coming from
    /// the source.
    #[serde(rename = "postcopy-active")]
    Postcopy,
    /// Post-copy, the link to the source broken: the guest's vCPUs wait on the pages
    /// they miss, and the VMM listens on its incoming URI again for the source to
    /// resume (`vmm migrate --resume`).
    #[serde(rename = "postcopy-paused")]
    PostcopyPaused,
    /// The guest runs here.
    Completed,
    /// Failed or abandoned; the VMM is ending.
    Failed,
}

/// The machine's incoming-migration bookkeeping (empty on a VM that booted). Its stages
/// are told as QMP's `MIGRATION` events: `active` once a source connected, then
/// `completed` or `failed`.
#[derive(Default)]
pub struct IncomingSlot {
    inner: Mutex<Option<Incoming>>,
    events: Option<Arc<EventBus>>,
}

struct Incoming {
    uri: String,
    stage: IncomingStage,
    /// The VMM is ending: the receiving thread must not start the guest.
    abandoned: bool,
    /// The source's connection, to shut down on abandon.
    conn: Option<ConnectionControl>,
    stats: Option<serde_json::Value>,
    error: Option<String>,
    /// Sources refused before a byte of their stream was read (TLS), the last few.
    refused: Vec<String>,
    refused_count: u64,
}

/// Refusals `status` keeps the reasons of.
const REFUSALS_KEPT: usize = 8;

impl IncomingSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Incoming>> {
        // Every change is one assignment: nothing is left half-done by a panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `--incoming defer`: an incoming migration whose URI `migrate-incoming` will give
    /// (stage `deferred`; the guest is not here yet all the same).
    pub fn defer(&self) {
        *self.lock() = Some(Incoming {
            uri: "defer".into(),
            stage: IncomingStage::Deferred,
            abandoned: false,
            conn: None,
            stats: None,
            error: None,
            refused: Vec::new(),
            refused_count: 0,
        });
    }

    /// Whether the incoming migration waits for `migrate-incoming` (and was not abandoned).
    pub fn is_deferred(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|i| i.stage == IncomingStage::Deferred && !i.abandoned)
    }

    /// An incoming migration from `uri` begins (stage `listening`).
    pub fn begin(&self, uri: &MigrationUri) {
        *self.lock() = Some(Incoming {
            uri: uri.to_string(),
            stage: IncomingStage::Listening,
            abandoned: false,
            conn: None,
            stats: None,
            error: None,
            refused: Vec::new(),
            refused_count: 0,
        });
    }

    /// Whether the guest has not been started here yet by a migration under way: the
    /// API refuses what needs the guest.
    pub fn in_progress(&self) -> bool {
        self.lock().as_ref().is_some_and(|i| {
            !matches!(
                i.stage,
                IncomingStage::Completed
                    | IncomingStage::Failed
                    | IncomingStage::Postcopy
                    | IncomingStage::PostcopyPaused
            )
        })
    }

    /// Whether the guest runs here while post-copy still brings its pages: it must not
    /// be migrated or snapshotted away before they are all here.
    pub fn in_postcopy(&self) -> bool {
        self.lock().as_ref().is_some_and(|i| {
            matches!(
                i.stage,
                IncomingStage::Postcopy | IncomingStage::PostcopyPaused
            )
        })
    }

    /// Post-copy paused: the link broke (`why`), the source may reconnect.
    fn postcopy_paused(&self, why: &str) {
        self.tell("postcopy-paused");
        if let Some(i) = self.lock().as_mut() {
            if !i.abandoned {
                i.stage = IncomingStage::PostcopyPaused;
                i.error = Some(why.to_string());
                i.conn = None;
            }
        }
    }

    /// A source reconnected to resume post-copy: keeps its connection for
    /// [`IncomingSlot::abandon`].
    fn reconnected(&self, conn: ConnectionControl) -> Result<(), String> {
        let mut g = self.lock();
        match g.as_mut() {
            Some(i) if !i.abandoned => {
                i.conn = Some(conn);
                i.error = None;
                Ok(())
            }
            _ => Err("the VMM is ending (the migration was abandoned)".into()),
        }
    }

    /// Moves on to `stage`, unless the migration was abandoned.
    /// A slot whose stages go to `events` as `MIGRATION`.
    pub fn with_events(events: Arc<EventBus>) -> IncomingSlot {
        IncomingSlot {
            inner: Mutex::new(None),
            events: Some(events),
        }
    }

    fn tell(&self, status: &'static str) {
        if let Some(bus) = &self.events {
            bus.emit(VmEvent::Migration { status });
        }
    }

    fn advance(&self, stage: IncomingStage) -> Result<(), String> {
        let mut g = self.lock();
        match g.as_mut() {
            Some(i) if !i.abandoned => {
                i.stage = stage;
                drop(g);
                match stage {
                    IncomingStage::Loading => self.tell("active"),
                    IncomingStage::Completed => self.tell("completed"),
                    IncomingStage::Postcopy => self.tell("postcopy-active"),
                    _ => {}
                }
                Ok(())
            }
            _ => Err("the VMM is ending (the migration was abandoned)".into()),
        }
    }

    /// A source connected: keeps its connection for [`IncomingSlot::abandon`].
    fn connected(&self, conn: ConnectionControl) -> Result<(), String> {
        self.advance(IncomingStage::Loading)?;
        if let Some(i) = self.lock().as_mut() {
            i.conn = Some(conn);
        }
        Ok(())
    }

    fn completed(&self, stats: &IncomingStats) {
        let after_postcopy = self.in_postcopy();
        if after_postcopy {
            self.tell("completed");
        }
        if let Some(i) = self.lock().as_mut() {
            i.stage = IncomingStage::Completed;
            i.conn = None;
            i.stats = Some(json!({
                "load_ms": stats.load_ms,
                "total_ms": stats.total_ms,
                "bytes": stats.summary.bytes,
                "pages": stats.summary.pages,
                "zero_pages": stats.summary.zero_pages,
                "blocks_added": stats.summary.blocks_added,
                "blocks_removed": stats.summary.blocks_removed,
            }));
            if let (Some(s), Some(p)) = (i.stats.as_mut(), &stats.postcopy) {
                s["postcopy"] = serde_json::to_value(p).unwrap_or_default();
            }
        }
    }

    fn failed(&self, error: String) {
        self.tell("failed");
        if let Some(i) = self.lock().as_mut() {
            i.stage = IncomingStage::Failed;
            i.conn = None;
            i.error = Some(error);
        }
    }

    /// The VMM is ending: if the guest has not started here, the migration is abandoned
    /// (the source's connection shut down, so a load in progress fails at once) and this
    /// says true.
    pub fn abandon(&self) -> bool {
        let mut g = self.lock();
        let Some(i) = g.as_mut() else {
            return false;
        };
        if matches!(i.stage, IncomingStage::Completed | IncomingStage::Failed) {
            return false;
        }
        i.abandoned = true;
        if let Some(conn) = i.conn.take() {
            if let Err(e) = conn.shutdown() {
                log::debug!("shutting the incoming connection down: {e}");
            }
        }
        true
    }

    fn is_abandoned(&self) -> bool {
        self.lock().as_ref().is_some_and(|i| i.abandoned)
    }

    /// A source was refused (TLS) and the listener waits on.
    fn refused(&self, why: String) {
        if let Some(i) = self.lock().as_mut() {
            if i.refused.len() == REFUSALS_KEPT {
                i.refused.remove(0);
            }
            i.refused.push(why);
            i.refused_count += 1;
        }
    }

    /// The URI the incoming migration listens on (or `defer`), once one began.
    pub fn uri(&self) -> Option<String> {
        self.lock().as_ref().map(|i| i.uri.clone())
    }

    /// What `status` shows under `incoming`.
    pub fn status_json(&self) -> Option<serde_json::Value> {
        let g = self.lock();
        let i = g.as_ref()?;
        let mut v = json!({ "uri": i.uri, "stage": i.stage });
        if let Some(s) = &i.stats {
            v["stats"] = s.clone();
        }
        if let Some(e) = &i.error {
            v["error"] = e.clone().into();
        }
        if i.refused_count > 0 {
            v["refused"] = i.refused_count.into();
            v["refusals"] = i.refused.clone().into();
        }
        Some(v)
    }
}

/// Blocks the source hot-added (before or during the migration) or removed, placed here
/// as KVM slots where the guest saw them on the source (or, for a stream that gives no
/// address, above the boot RAM and 4 GiB, first fit, as `ram-add` would).
struct KvmHotplug<'a> {
    ram: &'a KvmRam,
    /// What backs RAM here.
    backend: &'a MemoryBackend,
    /// The machine's [`Machine::hotplug_base`].
    base: u64,
    /// The machine, whose boot RAM the source may replace (local migration) but never
    /// remove.
    machine: &'a Machine,
}

impl BlockHotplug for KvmHotplug<'_> {
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError> {
        self.add_block_placed(ram, id, len, None)
    }

    fn add_block_placed(
        &mut self,
        _: &RamList,
        id: &str,
        len: u64,
        guest_addr: Option<u64>,
    ) -> Result<(), HotplugError> {
        let addr = match guest_addr {
            Some(addr) => {
                check_hotplug_addr(self.base, addr, len)
                    .map_err(|e| format!("block {id:?}: {e}"))?;
                addr
            }
            None => free_guest_range(&self.ram.placed(), self.base, len).ok_or_else(|| {
                format!("no guest-physical range for block {id:?} ({len:#x} bytes)")
            })?,
        };
        add_block(self.ram, self.backend, id, len, addr)?;
        Ok(())
    }

    fn remove_block(&mut self, _: &RamList, id: &str) -> Result<(), HotplugError> {
        if self.machine.is_boot_block(id) {
            return Err("it is this VM's boot RAM, which the source cannot remove".into());
        }
        Ok(self.ram.remove(id)?)
    }

    /// A local migration: the source's file mapped as the block, where the source's guest
    /// saw it. A block built here from the same configuration (the boot RAM) must match
    /// it in length and address; its own fresh memory is replaced by the source's in
    /// place (`MAP_FIXED` at the same host address): its KVM slot stays as it is, since
    /// deleting and recreating a slot of several GiB costs milliseconds.
    fn map_shared(&mut self, _: &RamList, block: &SharedBlock) -> Result<(), HotplugError> {
        let (id, len) = (block.id.as_str(), block.len);
        let addr = match self.ram.find(id) {
            Some(here) => {
                if here.size != len {
                    return Err(format!(
                        "this destination's block has {:#x} bytes, the source's {len:#x}",
                        here.size
                    )
                    .into());
                }
                if block.guest_addr.is_some_and(|a| a != here.guest_addr) {
                    return Err(format!(
                        "this destination's block is at guest {:#x}, the source's at {:#x}",
                        here.guest_addr,
                        block.guest_addr.unwrap_or_default()
                    )
                    .into());
                }
                self.ram.adopt_fd(id, len, block.fd.as_fd(), block.offset)?;
                return Ok(());
            }
            None => match block.guest_addr {
                Some(addr) => {
                    // The caller names the block.
                    check_hotplug_addr(self.base, addr, len)?;
                    addr
                }
                None => free_guest_range(&self.ram.placed(), self.base, len)
                    .ok_or_else(|| format!("no guest-physical range of {len:#x} bytes"))?,
            },
        };
        self.ram.add_from_fd(
            id,
            len,
            addr,
            block.fd.as_fd(),
            block.offset,
            RamBlockOptions::default(),
        )?;
        Ok(())
    }
}

/// The machine, its vCPUs parked, as the incoming driver sees it.
struct DestVm<'a> {
    machine: &'a Machine,
    slot: &'a IncomingSlot,
    hotplug: KvmHotplug<'a>,
    /// The source's run state, from the restored state: a guest paused there stays
    /// paused here.
    running: bool,
    /// Post-copy: once the guest runs, its stage is `postcopy-active` until the last page
    /// is in (then `completed`).
    postcopy: bool,
    /// Post-copy paused: the listener on the incoming URI, kept from one reconnect
    /// attempt to the next (a peer refused in between must not make the URI vanish for
    /// the source), until post-copy goes on.
    relisten: Option<Listener>,
}

impl DestVm<'_> {
    /// The stage once the guest was started here.
    fn started_stage(&self) -> IncomingStage {
        if self.postcopy {
            IncomingStage::Postcopy
        } else {
            IncomingStage::Completed
        }
    }
}

impl RestorableVm for DestVm<'_> {
    fn running_since_ns(&self) -> Option<u64> {
        let ns = self.machine.run_control().released_at_ns();
        (self.running && ns > 0).then_some(ns)
    }

    fn ram(&self) -> Arc<RamList> {
        self.machine.ram().ram().clone()
    }

    fn postcopy_starting(&mut self) {
        self.postcopy = true;
    }

    fn postcopy_running(&mut self) {
        // Resumed (or started): the URI is free again.
        self.relisten = None;
        if let Err(e) = self.slot.advance(IncomingStage::Postcopy) {
            log::warn!("post-copy: {e}");
        }
    }

    fn postcopy_paused(&mut self, why: &str) {
        self.slot.postcopy_paused(why);
    }

    /// Listens on the incoming URI again (retrying while it cannot, the reason in
    /// `status`) and waits for the source; `None` only once the VMM is ending.
    fn postcopy_reconnect(&mut self) -> Option<Connection> {
        let uri: MigrationUri = self.slot.uri()?.parse().ok()?;
        loop {
            if self.slot.is_abandoned() {
                return None;
            }
            if self.relisten.is_none() {
                match migration::transport::listen(&uri) {
                    Ok(l) => {
                        log::info!("post-copy paused: listening on {uri} for the source to resume");
                        self.relisten = Some(l);
                    }
                    Err(e) => {
                        let why = format!("listening again on {uri}: {e}; retrying");
                        log::warn!("post-copy: {why}");
                        self.slot.postcopy_paused(&why);
                        std::thread::sleep(RELISTEN_RETRY);
                        continue;
                    }
                }
            }
            let listener = self.relisten.as_ref()?;
            match accept_source(self.slot, listener) {
                Ok(conn) => {
                    let control = conn.control().ok()?;
                    self.slot.reconnected(control).ok()?;
                    return Some(conn);
                }
                Err(NoSource::Abandoned) => return None,
                Err(NoSource::Failed(e)) => {
                    log::warn!("post-copy: waiting for the source on {uri}: {e}; listening anew");
                    self.relisten = None;
                    std::thread::sleep(RELISTEN_RETRY);
                }
            }
        }
    }

    fn postcopy_failed(&mut self) {
        if let Err(parked) = self.machine.pause_vcpus() {
            log::error!(
                "post-copy failed: only {parked} of {} vCPUs stopped",
                self.machine.vcpu_count()
            );
        }
    }

    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.hotplug
    }

    fn restore_state(&mut self, states: &[ComponentState]) -> Result<(), VmError> {
        self.slot.advance(IncomingStage::Restoring)?;
        let state = VmState::from_components(states, usize::from(self.machine.vcpu_count()))?;
        self.machine.restore_state(&state)?;
        self.running = state.running;
        Ok(())
    }

    /// Releases the vCPUs; returns once each has left its park (the driver confirms to
    /// the source after this), or parks them again and says why not.
    fn resume(&mut self) -> Result<(), VmError> {
        let slot = self.slot;
        slot.advance(IncomingStage::Starting)?;
        if !self.running {
            // Paused on the source: the vCPUs stay parked, as a `pause` leaves them, and
            // `vmm resume` here releases them (QEMU keeps the run state the same way).
            log::info!("the guest was paused on the source: it stays paused here");
            return Ok(slot.advance(self.started_stage())?);
        }
        let started = self
            .machine
            .release_parked()
            .and_then(|()| slot.advance(self.started_stage()));
        if let Err(e) = started {
            // Before the failure reply: the source resumes its guest, this one must not run.
            if let Err(parked) = self.machine.pause_vcpus() {
                log::error!(
                    "only {parked} of {} vCPUs parked again after a failed start",
                    self.machine.vcpu_count()
                );
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// How the receiving thread ended.
pub enum Outcome {
    /// The guest runs here.
    Received(IncomingStats),
    /// The stream or the start failed; the VMM must end.
    Failed(IncomingError),
    /// The VMM is ending and said so ([`IncomingSlot::abandon`]) before the guest ran.
    Abandoned,
}

/// The receiving thread: accept, load, restore, start, confirm. Any end but success
/// wakes the main loop so that the VMM ends.
pub fn receive(machine: &Machine, slot: &IncomingSlot, listener: Listener) -> Outcome {
    crate::host::logger::quiet_this_thread();
    let outcome = receive_stream(machine, slot, listener);
    match &outcome {
        Outcome::Received(stats) => {
            slot.completed(stats);
            log::info!(
                "incoming migration loaded in {:.1} ms; the guest runs",
                stats.load_ms
            );
        }
        Outcome::Failed(e) => {
            slot.failed(e.to_string());
            if matches!(e, IncomingError::Confirm(_)) {
                // The source may have resumed its copy: this one stops.
                let _ = machine.pause_vcpus();
            }
            machine.run_control().vm_ended();
        }
        Outcome::Abandoned => {
            slot.failed("abandoned".into());
            machine.run_control().vm_ended();
        }
    }
    outcome
}

/// Why no source came.
enum NoSource {
    /// The VMM is ending.
    Abandoned,
    /// Listening failed.
    Failed(TransportError),
}

/// Waits for the source. Over TLS, each connection's handshake runs on a thread of its
/// own (at most [`MAX_HANDSHAKES`] at once, each within its deadline), so peers that stall
/// or trickle cannot keep the right source out; the first to pass wins, the others are
/// shut down; each refusal is counted in `status`. An abandon shuts every handshake down.
fn accept_source(slot: &IncomingSlot, listener: &Listener) -> Result<Connection, NoSource> {
    let (done, finished) = mpsc::channel::<(String, Result<Connection, TransportError>)>();
    // Each handshake under way, by peer: shut down when another source wins or on abandon.
    let mut pending: Vec<(String, ConnectionControl)> = Vec::new();
    let shut_all = |pending: &mut Vec<(String, ConnectionControl)>, winner: Option<&str>| {
        for (peer, c) in pending.drain(..) {
            if Some(peer.as_str()) != winner {
                let _ = c.shutdown();
            }
        }
    };
    let mut running = 0usize;
    loop {
        if slot.is_abandoned() {
            shut_all(&mut pending, None);
            return Err(NoSource::Abandoned);
        }
        while let Ok((peer, result)) = finished.try_recv() {
            running -= 1;
            // Its socket closes now (the copy kept for shutting it down goes too).
            pending.retain(|(p, _)| *p != peer || result.is_ok());
            match result {
                Ok(conn) => {
                    shut_all(&mut pending, Some(conn.peer()));
                    return Ok(conn);
                }
                // Nothing of its stream was read: wait for the right source.
                Err(e) => {
                    log::warn!("{e}; still listening");
                    slot.refused(e.to_string());
                }
            }
        }
        match listener.accept_pending_timeout(ACCEPT_POLL) {
            Ok(Accepted::Ready(conn)) => {
                shut_all(&mut pending, None);
                return Ok(conn);
            }
            Ok(Accepted::Handshake(tls)) if running >= MAX_HANDSHAKES => {
                let why = format!(
                    "{}: refused, {MAX_HANDSHAKES} TLS handshakes already under way",
                    tls.peer()
                );
                log::warn!("{why}");
                slot.refused(why);
            }
            Ok(Accepted::Handshake(tls)) => {
                if let Ok(c) = tls.control() {
                    pending.push((tls.peer().to_string(), c));
                }
                let done = done.clone();
                let peer = tls.peer().to_string();
                let spawned = std::thread::Builder::new()
                    .name("tls-handshake".into())
                    .spawn(move || {
                        // The receiver is gone only once a source won or the VMM ends.
                        let _ = done.send((peer, tls.finish()));
                    });
                match spawned {
                    Ok(_) => running += 1,
                    Err(e) => log::warn!("a TLS handshake thread: {e}"),
                }
            }
            Err(TransportError::AcceptTimeout { .. }) => {}
            Err(e) => {
                shut_all(&mut pending, None);
                return Err(NoSource::Failed(e));
            }
        }
    }
}

fn receive_stream(machine: &Machine, slot: &IncomingSlot, listener: Listener) -> Outcome {
    let conn = match accept_source(slot, &listener) {
        Ok(conn) => conn,
        Err(NoSource::Abandoned) => return Outcome::Abandoned,
        Err(NoSource::Failed(e)) => return Outcome::Failed(e.into()),
    };
    // One source only; a unix socket's file goes with the listener.
    drop(listener);
    match conn.control() {
        Ok(control) => {
            if slot.connected(control).is_err() {
                return Outcome::Abandoned;
            }
        }
        Err(e) => return Outcome::Failed(IncomingError::Setup(e)),
    }
    let mut dest = DestVm {
        machine,
        slot,
        hotplug: KvmHotplug {
            ram: machine.ram(),
            backend: machine.memory_backend(),
            base: machine.hotplug_base(),
            machine,
        },
        running: true,
        postcopy: false,
        relisten: None,
    };
    // A unix socket may bring a local migration (the memory handed over): see
    // `migration::live::local`.
    match incoming_any(&mut dest, conn, &IncomingOptions::default()) {
        Ok(stats) => Outcome::Received(stats),
        // After the guest ran here (post-copy), an abandon loses it: say so.
        Err(e) if slot.is_abandoned() && !matches!(e, IncomingError::PostcopyLost(_)) => {
            Outcome::Abandoned
        }
        Err(e) => Outcome::Failed(e),
    }
}

#[cfg(test)]
mod tests;
