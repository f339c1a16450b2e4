//! The destination's start, in-process against KVM: `DestVm::resume` returns only once
//! every parked vCPU thread has left its park (what the confirmation to the source
//! promises), a vCPU still busy in its park holds the release up, and a migration
//! abandoned first is refused with the vCPUs still parked.

use super::*;
use crate::config::{SerialOutput, VmmConfig};
use crate::machine::build::Boot;
use crate::machine::{MachineParts, Start};
use crate::vcpu::VcpuReport;
use std::sync::mpsc;
use std::time::Instant;

fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// An incoming machine of `vcpus` vCPUs started parked, without its main loop, every vCPU
/// thread sitting in its park; its serial output goes to a scratch file.
struct Parked {
    machine: Arc<Machine>,
    slot: IncomingSlot,
    serial: std::path::PathBuf,
    _reports: mpsc::Receiver<VcpuReport>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.machine.stop_vcpus();
        rcu::drain_call_rcu();
        let _ = std::fs::remove_file(&self.serial);
    }
}

fn parked(name: &str, vcpus: u8) -> Parked {
    let serial =
        std::env::temp_dir().join(format!("vmm-incoming-{name}-{}.txt", std::process::id()));
    let config = VmmConfig {
        memory: 32 << 20,
        vcpus,
        serial: SerialOutput::File(serial.clone()),
        ..VmmConfig::default()
    };
    let parts = MachineParts::build(config, Boot::Incoming).unwrap();
    let events = Arc::new(crate::events::EventBus::new().unwrap());
    let (machine, fds) = Machine::new(parts, Start::Parked, events).unwrap();
    let (tx, reports) = mpsc::channel();
    let p = Parked {
        machine,
        slot: IncomingSlot::default(),
        serial,
        _reports: reports,
    };
    p.machine.spawn_vcpus(fds, &tx).unwrap();
    // Already paused: this waits until every thread sits parked.
    p.machine.pause_vcpus().unwrap();
    assert_eq!(p.machine.run_control().parked_now(), usize::from(vcpus));
    let uri: MigrationUri = "unix:/nonexistent/mig.sock".parse().unwrap();
    p.slot.begin(&uri);
    p
}

fn dest(p: &Parked) -> DestVm<'_> {
    DestVm {
        machine: &p.machine,
        slot: &p.slot,
        hotplug: KvmHotplug {
            ram: p.machine.ram(),
            backend: p.machine.memory_backend(),
            base: p.machine.hotplug_base(),
            machine: &p.machine,
        },
        running: true,
        postcopy: false,
        relisten: None,
    }
}

#[test]
fn resume_returns_once_every_vcpu_left_its_park() {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let p = parked("resume", 2);
    assert!(p.slot.in_progress());
    let t0 = Instant::now();
    dest(&p).resume().unwrap();
    println!("released 2 vCPUs in {:?}", t0.elapsed());
    assert_eq!(
        p.machine.run_control().parked_now(),
        0,
        "resume left vCPUs parked"
    );
    assert!(!p.machine.run_control().is_paused());
    assert!(!p.slot.in_progress());
    assert_eq!(p.slot.status_json().unwrap()["stage"], "completed");
}

#[test]
fn an_abandoned_migration_does_not_start_the_guest() {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let p = parked("abandoned", 1);
    assert!(p.slot.abandon());
    let err = dest(&p).resume().unwrap_err();
    assert!(err.to_string().contains("abandoned"), "{err}");
    assert!(p.machine.run_control().is_paused());
    assert_eq!(
        p.machine.run_control().parked_now(),
        1,
        "a vCPU left its park"
    );
}

/// A vCPU busy in its park (a job running on its thread) is not released yet: the wait
/// sees it, times out, and ends once the vCPU has left.
#[test]
fn the_release_waits_for_a_vcpu_still_in_its_park() {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let p = parked("busy", 2);
    let (started_tx, started) = std::sync::mpsc::channel();
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    p.machine.run_control().run_on_parked(
        1,
        Box::new(move |_| {
            let _ = started_tx.send(());
            let _ = wait_go.recv();
        }),
    );
    started.recv().unwrap();
    let control = p.machine.run_control();
    assert_eq!(control.resume_and_wait(Duration::from_millis(50)), Err(1));
    go.send(()).unwrap();
    let t0 = Instant::now();
    assert_eq!(control.resume_and_wait(Duration::from_secs(10)), Ok(()));
    // Woken by the last vCPU leaving, not by the timeout.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(control.parked_now(), 0);
}
