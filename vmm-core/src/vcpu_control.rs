//! [`RunControl`]: how the main thread stops, pauses and resumes the vCPU threads, and how
//! a vCPU thread tells the main loop that the VM ended.
//!
//! A vCPU thread calls [`RunControl::checkpoint`] before every KVM_RUN. To pause, the main
//! thread sets the pause request, then kicks every vCPU thread with the kick signal until
//! all of them are parked in `checkpoint` (Firecracker's and Cloud Hypervisor's way): the
//! signal's handler sets `immediate_exit` in the thread's `kvm_run` (see `vcpu.rs`), so a
//! signal that lands between the check and the ioctl still makes KVM_RUN return at once
//! instead of being lost while the guest runs. Resume clears the request and wakes them.
//!
//! Work for a parked vCPU ([`RunControl::run_on_parked`]): a job queued for vCPU `n` runs
//! on that vCPU's own thread, with its fd, while it sits in
//! [`RunControl::checkpoint_vcpu`] — never while it is in KVM_RUN. Saving vCPU state for
//! a snapshot or a migration goes this way.

use crate::error::VmmError;
use kvm_ioctls::VcpuFd;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How often a pause re-kicks the vCPUs that have not parked yet.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// Work run by a parked vCPU thread with its own fd.
pub type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Shared by the main thread and every vCPU thread of one VM.
///
/// The stop and pause flags are read without a lock on every pass of a vCPU loop; they
/// change, and parked threads wait, under `parked`'s mutex, so a wake-up cannot be lost.
pub struct RunControl {
    stop: AtomicBool,
    pause: AtomicBool,
    /// How many vCPU threads sit in `checkpoint` waiting for a resume.
    parked: Mutex<usize>,
    cond: Condvar,
    /// Threads that left their loop (for the status of a VM with vCPUs ended).
    exited: AtomicUsize,
    /// Written by a vCPU thread that ended the VM: wakes the main loop.
    ended: EventFd,
    /// Jobs for parked vCPUs, by vCPU index; changed under `parked`'s mutex (taken
    /// first), so a parked thread cannot miss one.
    jobs: Mutex<Vec<(u8, VcpuJob)>>,
}

impl RunControl {
    /// Running, not paused.
    pub fn new() -> Result<RunControl, VmmError> {
        RunControl::with_pause(false)
    }

    /// Paused from the start: vCPU threads park at their first checkpoint, before their
    /// first KVM_RUN (a migration destination's, until the state is restored).
    pub fn new_paused() -> Result<RunControl, VmmError> {
        RunControl::with_pause(true)
    }

    fn with_pause(pause: bool) -> Result<RunControl, VmmError> {
        Ok(RunControl {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(pause),
            parked: Mutex::new(0),
            cond: Condvar::new(),
            exited: AtomicUsize::new(0),
            ended: EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("creating an eventfd"))?,
            jobs: Mutex::new(Vec::new()),
        })
    }

    fn parked(&self) -> MutexGuard<'_, usize> {
        // The count stays consistent across a panicking vCPU thread (one store each way).
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU side, before every KVM_RUN: parks while a pause is requested. False once the
    /// VM is stopping (the loop must end).
    pub fn checkpoint(&self) -> bool {
        self.checkpoint_inner(None)
    }

    /// [`RunControl::checkpoint`] for vCPU `cpu`, which also runs, while parked, the jobs
    /// queued for it ([`RunControl::run_on_parked`]) with `vcpu`.
    pub fn checkpoint_vcpu(&self, cpu: u8, vcpu: &VcpuFd) -> bool {
        self.checkpoint_inner(Some((cpu, vcpu)))
    }

    fn checkpoint_inner(&self, me: Option<(u8, &VcpuFd)>) -> bool {
        if self.stop.load(Acquire) {
            return false;
        }
        if !self.pause.load(Acquire) {
            return true;
        }
        let mut parked = self.parked();
        *parked += 1;
        self.cond.notify_all();
        loop {
            if let Some((cpu, vcpu)) = me {
                if let Some(job) = self.take_job(cpu) {
                    // Still counted as parked: not in KVM_RUN while the job runs.
                    drop(parked);
                    job(vcpu);
                    parked = self.parked();
                    continue;
                }
            }
            if !self.pause.load(Acquire) || self.stop.load(Acquire) {
                break;
            }
            parked = self.cond.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        // For `resume_and_wait`, which waits for the last one to leave.
        self.cond.notify_all();
        !self.stop.load(Acquire)
    }

    fn jobs(&self) -> MutexGuard<'_, Vec<(u8, VcpuJob)>> {
        // A job is pushed or taken in one step.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_job(&self, cpu: u8) -> Option<VcpuJob> {
        let mut jobs = self.jobs();
        let i = jobs.iter().position(|(c, _)| *c == cpu)?;
        Some(jobs.remove(i).1)
    }

    /// Queues `job` for vCPU `cpu`: it runs on that vCPU's thread once it is parked (at
    /// once if it is). Jobs still queued at the next resume are dropped unrun.
    pub fn run_on_parked(&self, cpu: u8, job: VcpuJob) {
        let _parked = self.parked();
        self.jobs().push((cpu, job));
        self.cond.notify_all();
    }

    /// Whether the VM is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Acquire)
    }

    /// Whether a pause is in force (requested; see [`RunControl::pause`]).
    pub fn is_paused(&self) -> bool {
        self.pause.load(Acquire)
    }

    /// Asks every vCPU to park and waits until `vcpus` of them did, calling `kick` every
    /// few milliseconds meanwhile (it should signal the threads still in KVM_RUN). On
    /// timeout the pause is withdrawn and the number parked is returned as the error.
    pub fn pause(&self, vcpus: usize, timeout: Duration, kick: impl Fn()) -> Result<(), usize> {
        self.pause.store(true, Release);
        let deadline = Instant::now() + timeout;
        let mut parked = self.parked();
        // Threads that already left their loop never park.
        while *parked + self.exited.load(Acquire) < vcpus {
            let now = Instant::now();
            if now >= deadline {
                let n = *parked;
                drop(parked);
                self.resume();
                return Err(n);
            }
            drop(parked);
            kick();
            parked = self.parked();
            let wait = KICK_INTERVAL.min(deadline - now);
            parked = self
                .cond
                .wait_timeout(parked, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _parked = self.parked();
        self.jobs().clear();
        self.pause.store(false, Release);
        self.cond.notify_all();
    }

    /// [`RunControl::resume`], then waits (up to `timeout`) until every parked vCPU thread
    /// has left its checkpoint: each is then on its way into KVM_RUN, with nothing left
    /// to wait for. `Err(parked)`: how many still sat parked at the timeout (they stay
    /// released). A stop meanwhile also releases them; the caller checks
    /// [`RunControl::is_stopping`].
    pub fn resume_and_wait(&self, timeout: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + timeout;
        let mut parked = self.parked();
        self.jobs().clear();
        self.pause.store(false, Release);
        self.cond.notify_all();
        while *parked > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(*parked);
            }
            parked = self
                .cond
                .wait_timeout(parked, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// How many vCPU threads sit parked now.
    pub fn parked_now(&self) -> usize {
        *self.parked()
    }

    /// Makes every vCPU loop end at its next checkpoint, parked ones included.
    pub fn stop(&self) {
        let _parked = self.parked();
        self.stop.store(true, Release);
        self.cond.notify_all();
    }

    /// vCPU side: the thread left its loop.
    pub fn exited(&self) {
        self.exited.fetch_add(1, Release);
        self.cond.notify_all();
    }

    /// vCPU side: the VM ended (a report was sent); wakes the main loop.
    pub fn vm_ended(&self) {
        if let Err(e) = self.ended.write(1) {
            log::error!("waking the main loop at the VM's end: {e}");
        }
    }

    /// The descriptor [`RunControl::vm_ended`] makes readable.
    pub fn ended_fd(&self) -> RawFd {
        self.ended.as_raw_fd()
    }

    /// Consumes the wake-up of [`RunControl::vm_ended`].
    pub fn clear_ended(&self) {
        // Already drained is fine.
        let _ = self.ended.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::thread;

    /// Threads that count passes of a fake vCPU loop until stopped.
    fn spawn(control: &Arc<RunControl>, n: usize) -> (Arc<AtomicU64>, Vec<thread::JoinHandle<()>>) {
        let passes = Arc::new(AtomicU64::new(0));
        let handles = (0..n)
            .map(|_| {
                let (c, p) = (control.clone(), passes.clone());
                thread::spawn(move || {
                    while c.checkpoint() {
                        p.fetch_add(1, Release);
                        thread::sleep(Duration::from_millis(1));
                    }
                    c.exited();
                })
            })
            .collect();
        (passes, handles)
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let control = Arc::new(RunControl::new().unwrap());
        let (passes, handles) = spawn(&control, 3);
        control.pause(3, Duration::from_secs(10), || {}).unwrap();
        assert!(control.is_paused());
        let before = passes.load(Acquire);
        thread::sleep(Duration::from_millis(30));
        assert_eq!(passes.load(Acquire), before, "a paused thread ran");
        control.resume();
        while passes.load(Acquire) == before {
            thread::yield_now();
        }
        control.pause(3, Duration::from_secs(10), || {}).unwrap();
        // Stop wakes parked threads.
        control.stop();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn threads_start_parked_and_resume_and_wait_sees_every_one_leave() {
        let control = Arc::new(RunControl::new_paused().unwrap());
        let (passes, handles) = spawn(&control, 3);
        // Already paused: this only waits until all three sit parked.
        control.pause(3, Duration::from_secs(10), || {}).unwrap();
        assert_eq!(passes.load(Acquire), 0, "a thread ran before its release");
        assert_eq!(control.parked_now(), 3);
        control.resume_and_wait(Duration::from_secs(10)).unwrap();
        assert_eq!(
            control.parked_now(),
            0,
            "returned with threads still parked"
        );
        control.stop();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_pause_that_cannot_complete_is_withdrawn() {
        let control = RunControl::new().unwrap();
        // Two vCPUs that never reach a checkpoint.
        assert_eq!(control.pause(2, Duration::from_millis(30), || {}), Err(0));
        assert!(!control.is_paused());
        assert!(control.checkpoint());
    }

    #[test]
    fn ended_wakes() {
        let control = RunControl::new().unwrap();
        control.vm_ended();
        control.clear_ended();
        control.clear_ended();
    }
}
