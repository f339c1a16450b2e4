//! `rcutorture`: a user-level performance and stress test of the `rcu` crate, after QEMU's
//! tests/unit/rcutorture.c (read/update performance, the ten-slot stress pipeline) and
//! tests/unit/test-rcu-list.c (a list walked by readers while updaters churn it).
//!
//! ```text
//! cargo run --release -p rcu --bin rcutorture -- --seconds N --readers R --updaters U \
//!     [--mode all|perf|stress|list] [--fences] [--qsbr [--qs-every N]]
//! ```
//!
//! With `--qsbr` the readers are quiescent-state readers (`rcu::QsbrReader`) reporting a
//! quiescent state every `--qs-every` reads, sharing grace periods with the updaters'.
//!
//! Each phase prints its counts; the last line is one summary, `rcutorture: PASS ...` or
//! `rcutorture: FAIL ...`. Exit status: 0 on PASS, 1 on FAIL, 2 on bad arguments.

// A binary's root is its directory's module root, so the submodules need their path.
#[path = "rcutorture/cli.rs"]
mod cli;
#[path = "rcutorture/harness.rs"]
mod harness;
#[path = "rcutorture/list.rs"]
mod list;
#[path = "rcutorture/perf.rs"]
mod perf;
#[path = "rcutorture/stress.rs"]
mod stress;

use clap::Parser;
use cli::Cli;
use harness::Summary;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.fences {
        if let Err(e) = rcu::set_barrier_mode(rcu::BarrierMode::Fences) {
            eprintln!("rcutorture: cannot use fences: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mode = mode_name(rcu::barrier_mode());
    let flavor = cli.flavor();
    println!(
        "rcutorture: barrier mode: {mode}  readers: {} ({})  updaters: {}  mode: {:?}  seconds: {}",
        cli.readers,
        flavor.name(),
        cli.updaters,
        cli.mode,
        cli.seconds
    );

    let budget = cli.budget();
    let mut summary = Summary::default();
    if !budget.perf.is_zero() {
        perf::run(budget.perf, cli.readers, cli.updaters, flavor, &mut summary);
    }
    if !budget.stress.is_zero() {
        stress::run(
            budget.stress,
            cli.readers,
            cli.updaters,
            cli.inject_missing_sync,
            flavor,
            &mut summary,
        );
    }
    if !budget.list.is_zero() {
        list::run(budget.list, cli.readers, cli.updaters, flavor, &mut summary);
    }

    for f in &summary.failures {
        println!("rcutorture: error: {f}");
    }
    let verdict = if summary.failures.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let list = match summary.list {
        Some((removed, reclaimed)) => format!(" list removed={removed} reclaimed={reclaimed}"),
        None => String::new(),
    };
    println!(
        "rcutorture: {verdict} mode={mode} reads={} updates={} mberror={} ages>=2: {}{list} \
         readers={}",
        summary.reads,
        summary.updates,
        summary.mberror,
        summary.ages_ge2,
        flavor.name()
    );
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The name printed (and checked by tests) for a barrier mode.
fn mode_name(m: rcu::BarrierMode) -> &'static str {
    match m {
        rcu::BarrierMode::Membarrier => "membarrier",
        rcu::BarrierMode::Fences => "fences",
    }
}
