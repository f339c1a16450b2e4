//! Saving a running tiny guest's CPU and device state and restoring it into a second VM in
//! the same process: the first VM ticks, is paused and saved; the state goes to bytes and
//! back; the second VM (built with `Vmm::new_incoming`) gets the first's RAM copied block
//! by block and the state restored, runs, and its serial output goes on with ticks above
//! the first VM's last one, without booting again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm_core::persist::VmState;
use vmm_core::{SerialOutput, Vmm, VmmConfig};

fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-persist-{}-{name}", std::process::id()))
}

/// The tick numbers in the serial output so far.
fn ticks(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// Waits until `path` shows a tick above `above`; returns the ticks.
fn wait_tick(path: &Path, above: u64, timeout: Duration) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let t = ticks(path);
        if t.last().is_some_and(|&n| n > above) || Instant::now() >= deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config(serial: &Path, vcpus: u8) -> VmmConfig {
    VmmConfig {
        memory: 32 << 20,
        vcpus,
        serial: SerialOutput::File(serial.to_path_buf()),
        ..VmmConfig::default()
    }
}

#[test]
fn a_saved_guest_resumes_in_a_second_vm() {
    save_and_restore(1);
}

/// The second vCPU never leaves its wait for INIT/SIPI: its mp_state and APIC travel too.
#[test]
fn a_saved_two_vcpu_guest_resumes_in_a_second_vm() {
    save_and_restore(2);
}

fn save_and_restore(vcpus: u8) {
    if !have_kvm() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let (out1, out2) = (
        scratch(&format!("src{vcpus}.txt")),
        scratch(&format!("dst{vcpus}.txt")),
    );
    let vm1 = Vmm::new(config(&out1, vcpus)).unwrap().start().unwrap();
    let before = wait_tick(&out1, 2, Duration::from_secs(8));
    assert!(
        before.last().is_some_and(|&n| n > 2),
        "no ticks: {before:?}"
    );

    vm1.pause().unwrap();
    let state = vm1.save_state().unwrap();
    // Nothing ticks while paused; the last tick printed is the last the guest counted.
    let last = *ticks(&out1).last().unwrap();
    assert!(!state.vcpus[0].msrs.is_empty());
    assert!(state.vcpus[0].xsave.len() >= 1024);

    // Bytes and back, whole and as the migration stream's components.
    let bytes = state.to_bytes().unwrap();
    let back = VmState::from_bytes(&bytes).unwrap();
    assert_eq!(back, state);
    let parts = state.to_components().unwrap();
    assert_eq!(state.vcpus.len(), usize::from(vcpus));
    assert_eq!(
        VmState::from_components(&parts, vcpus.into()).unwrap(),
        state
    );
    assert!(VmState::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(VmState::from_components(&parts[1..], vcpus.into()).is_err());
    // The run state: optional (running when absent), kept when sent, once at most.
    assert!(state.running);
    let runstate = vmm_core::persist::RUNSTATE_COMPONENT;
    let without: Vec<_> = parts
        .iter()
        .filter(|p| p.name != runstate)
        .cloned()
        .collect();
    assert!(
        VmState::from_components(&without, vcpus.into())
            .unwrap()
            .running
    );
    let paused = VmState {
        running: false,
        ..state.clone()
    };
    let paused_parts = paused.to_components().unwrap();
    assert!(
        !VmState::from_components(&paused_parts, vcpus.into())
            .unwrap()
            .running
    );
    let mut twice = paused_parts.clone();
    twice.extend(paused_parts.iter().filter(|p| p.name == runstate).cloned());
    assert!(VmState::from_components(&twice, vcpus.into()).is_err());
    println!(
        "state: {} bytes of JSON, {} MSRs, xsave {} bytes, last tick {last}",
        bytes.len(),
        state.vcpus[0].msrs.len(),
        state.vcpus[0].xsave.len() * 4
    );

    let vm2 = Vmm::new_incoming(config(&out2, vcpus)).unwrap();
    assert!(vm2.boot_entry().is_none());
    {
        let guard = rcu::read_lock();
        let src = vm1.ram().ram();
        let dst = vm2.ram().ram();
        let mut copied = 0;
        for b in src.blocks(&guard) {
            let d = dst
                .blocks(&guard)
                .find(|d| d.id() == b.id())
                .expect("the same block on the destination");
            assert_eq!(d.len(), b.len());
            // SAFETY: both blocks are mapped for `len` bytes while the read guard is held
            // (no block is removed meanwhile); the source's vCPUs are parked and the
            // destination's never ran, so neither side changes; distinct mappings.
            unsafe {
                std::ptr::copy_nonoverlapping(b.host(), d.host(), b.len() as usize);
            }
            copied += b.len();
        }
        assert_eq!(copied, 32 << 20);
    }
    vm2.restore_state(&back).unwrap();
    let vm2 = vm2.start().unwrap();
    let after = wait_tick(&out2, last + 2, Duration::from_secs(8));
    let out2_text = std::fs::read_to_string(&out2).unwrap_or_default();
    println!("destination ticks: {after:?}");
    assert!(
        !out2_text.contains("tiny: boot"),
        "the guest booted again: {out2_text}"
    );
    assert!(
        after.first().is_some_and(|&n| n > last) && after.last().is_some_and(|&n| n > last + 2),
        "ticks after restore {after:?}, source's last {last}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");

    // The source resumes too: a failed migration leaves it running.
    vm1.resume();
    let more = wait_tick(&out1, last, Duration::from_secs(8));
    assert!(more.last().is_some_and(|&n| n > last), "{more:?}");

    assert!(vm2.stop().is_none());
    assert!(vm1.stop().is_none());
    let _ = std::fs::remove_file(&out1);
    let _ = std::fs::remove_file(&out2);
}
