//! The command line of `rcutorture`: which phases run, for how long, with how many threads.

use clap::{Parser, ValueEnum};
use std::time::Duration;

/// Most threads of one kind: enough to oversubscribe any test machine, few enough that a
/// typo (`--readers 40000`) is refused instead of exhausting the process.
const MAX_THREADS: u32 = 256;

/// A user-level torture test of the `rcu` crate, after QEMU's tests/unit/rcutorture.c and
/// tests/unit/test-rcu-list.c. Exits 0 on PASS, 1 on FAIL, 2 on bad arguments.
#[derive(Debug, Parser)]
#[command(name = "rcutorture", version)]
pub struct Cli {
    /// Total run time in seconds (fractions allowed); `--mode all` splits it among phases.
    #[arg(long, default_value = "3", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub seconds: f64,

    /// Reader threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    pub readers: u32,

    /// Updater threads (each stress updater owns a pipeline of its own).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    pub updaters: u32,

    /// Which phases to run.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    pub mode: Mode,

    /// Use full fences on both sides instead of membarrier (rcu::BarrierMode::Fences).
    #[arg(long)]
    pub fences: bool,

    /// Readers are quiescent-state readers (rcu::QsbrReader) instead of read_lock ones.
    #[arg(long)]
    pub qsbr: bool,

    /// With --qsbr: reads between two quiescent states.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub qs_every: u32,

    /// Self-check of the checker: stress updaters skip synchronize(), which a correct run
    /// must report as FAIL. Not for normal use.
    #[arg(long, hide = true)]
    pub inject_missing_sync: bool,
}

impl Cli {
    /// How readers read.
    pub fn flavor(&self) -> crate::harness::Flavor {
        if self.qsbr {
            crate::harness::Flavor::Qsbr {
                every: self.qs_every,
            }
        } else {
            crate::harness::Flavor::Memb
        }
    }
}

/// The phases `--mode` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// perf, then stress, then list.
    All,
    /// Read-side and update-side performance.
    Perf,
    /// The pipeline stress test (age histogram, memory-barrier errors).
    Stress,
    /// RcuList insert/remove under walking readers, with reclamation accounting.
    List,
}

/// How long each phase runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Zero when the phase is not selected.
    pub perf: Duration,
    /// Zero when the phase is not selected.
    pub stress: Duration,
    /// Zero when the phase is not selected.
    pub list: Duration,
}

impl Cli {
    /// Splits `--seconds` among the selected phases: in `all`, stress (the correctness
    /// check that most benefits from time) gets half, perf and list a quarter each.
    pub fn budget(&self) -> Budget {
        let total = Duration::from_secs_f64(self.seconds);
        let zero = Duration::ZERO;
        match self.mode {
            Mode::All => Budget {
                perf: total / 4,
                stress: total / 2,
                list: total / 4,
            },
            Mode::Perf => Budget {
                perf: total,
                stress: zero,
                list: zero,
            },
            Mode::Stress => Budget {
                perf: zero,
                stress: total,
                list: zero,
            },
            Mode::List => Budget {
                perf: zero,
                stress: zero,
                list: total,
            },
        }
    }
}

/// A positive, finite number of seconds, at most a day (a guard against typos).
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a number of seconds: {e}"))?;
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        return Err(format!("`{s}` seconds: must be > 0 and at most 86400"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parser_refuses_nonsense() {
        assert_eq!(parse_seconds("1.5"), Ok(1.5));
        for bad in ["0", "-1", "abc", "inf", "NaN", "100000"] {
            let e = parse_seconds(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn all_gives_stress_the_largest_share() {
        let cli = Cli::parse_from(["rcutorture", "--seconds", "4"]);
        let b = cli.budget();
        assert!(b.stress > b.perf && b.stress > b.list);
        assert_eq!(b.perf + b.stress + b.list, Duration::from_secs(4));
        let cli = Cli::parse_from(["rcutorture", "--seconds", "4", "--mode", "list"]);
        assert_eq!(cli.budget().list, Duration::from_secs(4));
        assert_eq!(cli.budget().stress, Duration::ZERO);
    }
}
