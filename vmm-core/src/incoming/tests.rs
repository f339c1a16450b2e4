//! The destination's start, in-process against KVM: `DestVm::resume` returns only once
//! every parked vCPU thread has left its park (what the confirmation to the source
//! promises), a vCPU still busy in its park holds the release up, and a migration
//! abandoned first is refused with the vCPUs still parked.

use super::*;
use crate::config::SerialOutput;
use std::time::Instant;

fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// An incoming VM of `vcpus` vCPUs started parked, without its main loop, every vCPU
/// thread sitting in its park; its serial output goes to a scratch file.
fn parked(name: &str, vcpus: u8) -> (Runner, Arc<Machine>, std::path::PathBuf) {
    let serial =
        std::env::temp_dir().join(format!("vmm-incoming-{name}-{}.txt", std::process::id()));
    let config = VmmConfig {
        memory: 32 << 20,
        vcpus,
        serial: SerialOutput::File(serial.clone()),
        ..VmmConfig::default()
    };
    let vmm = Vmm::new_incoming(config).unwrap();
    let runner = Runner::start(vmm.into_parts(), Start::Parked).unwrap();
    let machine = runner.machine().clone();
    // Already paused: this waits until every thread sits parked.
    machine.pause_vcpus().unwrap();
    assert_eq!(machine.control.parked_now(), usize::from(vcpus));
    let uri: MigrationUri = "unix:/nonexistent/mig.sock".parse().unwrap();
    machine.incoming.begin(&uri);
    (runner, machine, serial)
}

fn dest(machine: &Machine) -> DestVm<'_> {
    DestVm {
        machine,
        hotplug: KvmHotplug {
            ram: &machine.ram,
            base: machine.hotplug_base,
        },
        running: true,
    }
}

#[test]
fn resume_returns_once_every_vcpu_left_its_park() {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let (runner, machine, serial) = parked("resume", 2);
    assert!(machine.incoming.in_progress());
    let t0 = Instant::now();
    dest(&machine).resume().unwrap();
    println!("released 2 vCPUs in {:?}", t0.elapsed());
    assert_eq!(machine.control.parked_now(), 0, "resume left vCPUs parked");
    assert!(!machine.control.is_paused());
    assert!(!machine.incoming.in_progress());
    assert_eq!(
        machine.incoming.status_json().unwrap()["stage"],
        "completed"
    );
    drop(machine);
    let _ = runner.finish(Ok(()));
    let _ = std::fs::remove_file(serial);
}

#[test]
fn an_abandoned_migration_does_not_start_the_guest() {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let (runner, machine, serial) = parked("abandoned", 1);
    assert!(machine.incoming.abandon());
    let err = dest(&machine).resume().unwrap_err();
    assert!(err.to_string().contains("abandoned"), "{err}");
    assert!(machine.control.is_paused());
    assert_eq!(machine.control.parked_now(), 1, "a vCPU left its park");
    drop(machine);
    let _ = runner.finish(Ok(()));
    let _ = std::fs::remove_file(serial);
}

/// A vCPU busy in its park (a job running on its thread) is not released yet: the wait
/// sees it, times out, and ends once the vCPU has left.
#[test]
fn the_release_waits_for_a_vcpu_still_in_its_park() {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let (runner, machine, serial) = parked("busy", 2);
    let (started_tx, started) = std::sync::mpsc::channel();
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    machine.control.run_on_parked(
        1,
        Box::new(move |_| {
            let _ = started_tx.send(());
            let _ = wait_go.recv();
        }),
    );
    started.recv().unwrap();
    let control = &machine.control;
    assert_eq!(control.resume_and_wait(Duration::from_millis(50)), Err(1));
    go.send(()).unwrap();
    let t0 = Instant::now();
    assert_eq!(control.resume_and_wait(Duration::from_secs(10)), Ok(()));
    // Woken by the last vCPU leaving, not by the timeout.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(control.parked_now(), 0);
    drop(machine);
    let _ = runner.finish(Ok(()));
    let _ = std::fs::remove_file(serial);
}
