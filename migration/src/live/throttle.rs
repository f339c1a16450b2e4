//! Auto-converge: slowing the guest's vCPUs down when it dirties memory faster than the
//! link carries it, so that the pre-copy iterations converge (QEMU's `auto-converge`
//! capability and its `cpu-throttle-*` parameters).
//!
//! # The policy ([`AutoConverge`])
//!
//! After every iteration the driver hands the policy one *period* (from one dirty-log sync
//! to the next): the bytes the guest dirtied in it and the bytes sent in it. A period is
//! *high* when the bytes dirtied exceed [`ThrottleSettings::threshold_percent`] (50) of
//! the bytes sent. Two high periods in a row start the throttle at
//! [`ThrottleSettings::initial_percent`] (20%); every further two raise it by
//! [`ThrottleSettings::increment_percent`] (10%), up to [`ThrottleSettings::max_percent`]
//! (99%). After a raise the count starts again from zero, so the guest gets at least one
//! whole period at the new throttle before it is judged again.
//!
//! QEMU (`migration_trigger_throttle`) counts high periods without resetting the count on
//! a low one; the rule here asks for two *consecutive* high periods, so a guest whose
//! dirty rate only spikes now and then is not slowed down for it. QEMU also judges at
//! most once a second; here a period is one iteration, which at a tight bandwidth cap
//! lasts about as long as sending the working set takes.
//!
//! The throttle never goes down during a migration (as in QEMU); the driver sets it back
//! to 0 when the migration ends, completed or not ([`MigratableVm::set_throttle`]).
//!
//! # What a throttle of p% means
//!
//! Every vCPU spends p% of its time outside the guest: in QEMU, a timer kicks each vCPU
//! every `10 ms / (1 - p)`, and the vCPU then sleeps `p / (1 - p) × 10 ms`. The VMM
//! implements that behind [`MigratableVm::set_throttle`]; this module only decides p.
//!
//! [`MigratableVm::set_throttle`]: super::MigratableVm::set_throttle

use super::MigratableVm;

/// The knobs of auto-converge (QEMU's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// A period is high when the bytes dirtied in it exceed this percentage of the bytes
    /// sent in it (QEMU's `throttle-trigger-threshold`, 50).
    pub threshold_percent: u8,
    /// The first throttle (QEMU's `cpu-throttle-initial`, 20).
    pub initial_percent: u8,
    /// Added at each further raise (QEMU's `cpu-throttle-increment`, 10).
    pub increment_percent: u8,
    /// The most (QEMU's `max-cpu-throttle`, 99; never 100: the guest must make progress).
    pub max_percent: u8,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            threshold_percent: 50,
            initial_percent: 20,
            increment_percent: 10,
            max_percent: 99,
        }
    }
}

/// What [`MigratableVm::set_throttle`] returns by
/// default: this VM cannot slow its vCPUs down. The driver then migrates without
/// auto-converge (the iteration limit remains).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this VM cannot throttle its vCPUs (auto-converge unsupported)")]
pub struct ThrottleUnsupported;

/// High periods in a row that raise the throttle.
pub const HIGH_PERIODS_TO_RAISE: u32 = 2;

/// The throttle that follows one period: the pure rule of the module documentation.
/// `current` is the throttle in force (0: none), `high_in_a_row` the high periods seen in
/// a row before this one. Returns the new throttle and the new count.
pub fn next_throttle(
    settings: &ThrottleSettings,
    current: u8,
    high_in_a_row: u32,
    dirtied_bytes: u64,
    sent_bytes: u64,
) -> (u8, u32) {
    let threshold = u128::from(sent_bytes) * u128::from(settings.threshold_percent) / 100;
    if u128::from(dirtied_bytes) <= threshold {
        return (current, 0);
    }
    let high = high_in_a_row + 1;
    if high < HIGH_PERIODS_TO_RAISE {
        return (current, high);
    }
    let max = settings.max_percent.min(99);
    let raised = if current == 0 {
        settings.initial_percent
    } else {
        current.saturating_add(settings.increment_percent)
    };
    (raised.min(max).max(current), 0)
}

/// The policy's state over one migration.
#[derive(Debug, Clone)]
pub struct AutoConverge {
    settings: ThrottleSettings,
    percent: u8,
    high_in_a_row: u32,
}

impl AutoConverge {
    /// No throttle yet.
    pub fn new(settings: ThrottleSettings) -> AutoConverge {
        AutoConverge {
            settings,
            percent: 0,
            high_in_a_row: 0,
        }
    }

    /// The throttle decided so far.
    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// Takes one period; returns the new throttle when it changed.
    pub fn period(&mut self, dirtied_bytes: u64, sent_bytes: u64) -> Option<u8> {
        let (p, high) = next_throttle(
            &self.settings,
            self.percent,
            self.high_in_a_row,
            dirtied_bytes,
            sent_bytes,
        );
        self.high_in_a_row = high;
        let changed = p != self.percent;
        self.percent = p;
        changed.then_some(p)
    }
}

/// The driver's side: the policy, and what it set on the VM (so that it is undone).
pub(super) struct Throttler {
    /// None: auto-converge off, or the VM refused.
    policy: Option<AutoConverge>,
    /// The throttle the VM runs under (0: none).
    applied: u8,
    /// The highest it was during this migration.
    peak: u8,
}

impl Throttler {
    pub(super) fn new(on: bool, settings: ThrottleSettings) -> Throttler {
        Throttler {
            policy: on.then(|| AutoConverge::new(settings)),
            applied: 0,
            peak: 0,
        }
    }

    /// The throttle in force now (0: none).
    pub(super) fn percent(&self) -> u8 {
        self.applied
    }

    /// The highest throttle of this migration.
    pub(super) fn peak(&self) -> u8 {
        self.peak
    }

    /// One period seen by the driver: raises the VM's throttle when the policy says so. A
    /// VM that cannot throttle (or fails to) turns auto-converge off for this migration.
    pub(super) fn period(&mut self, vm: &dyn MigratableVm, dirtied_bytes: u64, sent_bytes: u64) {
        let Some(policy) = self.policy.as_mut() else {
            return;
        };
        let Some(p) = policy.period(dirtied_bytes, sent_bytes) else {
            return;
        };
        match vm.set_throttle(p) {
            Ok(()) => {
                self.applied = p;
                self.peak = self.peak.max(p);
                log::info!(
                    "migration: auto-converge: {dirtied_bytes} bytes dirtied while \
                     {sent_bytes} went; vCPUs throttled to {p}%"
                );
            }
            Err(e) => {
                if e.is::<ThrottleUnsupported>() {
                    log::info!("migration: {e}; going on without it");
                } else {
                    log::warn!(
                        "migration: throttling the vCPUs to {p}% failed: {e}; going on \
                         without auto-converge"
                    );
                }
                // What was set before (if anything) stays until `reset`.
                self.policy = None;
            }
        }
    }

    /// The guest at full speed again (the end of the migration, either way).
    pub(super) fn reset(&mut self, vm: &dyn MigratableVm) {
        if std::mem::take(&mut self.applied) != 0 {
            match vm.set_throttle(0) {
                Ok(()) => log::info!("migration: vCPU throttle lifted"),
                Err(e) => log::error!("migration: lifting the vCPU throttle failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// The throttles a run of periods produces.
    fn run(periods: &[(u64, u64)]) -> Vec<u8> {
        let mut ac = AutoConverge::new(ThrottleSettings::default());
        periods
            .iter()
            .map(|&(d, s)| {
                ac.period(d, s);
                ac.percent()
            })
            .collect()
    }

    #[test]
    fn two_high_periods_in_a_row_start_at_20_then_each_two_add_10() {
        let high = (8 * MB, 8 * MB);
        assert_eq!(
            run(&[high; 8]),
            [0, 20, 20, 30, 30, 40, 40, 50],
            "a raise every second high period"
        );
    }

    #[test]
    fn a_low_period_breaks_the_run() {
        let (high, low) = ((5 * MB, 8 * MB), (4 * MB, 8 * MB));
        // 5 of 8 is over half; 4 of 8 is exactly half: not over it.
        assert_eq!(
            run(&[high, low, high, low, high, high]),
            [0, 0, 0, 0, 0, 20]
        );
        assert_eq!(
            run(&[high, high, high, low, high, high]),
            [0, 20, 20, 20, 20, 30]
        );
    }

    #[test]
    fn the_throttle_stops_at_99_and_never_goes_down() {
        let mut ac = AutoConverge::new(ThrottleSettings::default());
        let mut seen = Vec::new();
        for _ in 0..40 {
            if let Some(p) = ac.period(MB, MB) {
                seen.push(p);
            }
        }
        assert_eq!(seen, [20, 30, 40, 50, 60, 70, 80, 90, 99]);
        assert_eq!(ac.period(0, MB), None, "a low period keeps it");
        assert_eq!(ac.percent(), 99);
    }

    #[test]
    fn nothing_sent_and_something_dirtied_is_high() {
        assert_eq!(
            next_throttle(&ThrottleSettings::default(), 0, 1, 1, 0),
            (20, 0)
        );
        assert_eq!(
            next_throttle(&ThrottleSettings::default(), 0, 1, 0, 0),
            (0, 0)
        );
    }

    #[test]
    fn settings_are_honoured_and_clamped() {
        let s = ThrottleSettings {
            threshold_percent: 100,
            initial_percent: 50,
            increment_percent: 60,
            max_percent: 100,
        };
        // Over 100% of the bytes sent.
        assert_eq!(next_throttle(&s, 0, 1, 10, 10), (0, 0));
        assert_eq!(next_throttle(&s, 0, 1, 11, 10), (50, 0));
        // 50 + 60 is capped at 99 even with a max of 100.
        assert_eq!(next_throttle(&s, 50, 1, 11, 10), (99, 0));
        // Huge figures do not overflow.
        assert_eq!(next_throttle(&s, 0, 1, u64::MAX, u64::MAX - 1), (50, 0));
    }
}
