//! Boot time of the tiny guest: process start to the `tiny: boot` line on the serial
//! console, under our `vmm` and under QEMU (`-M microvm`, optionally `-M pc`) booting the
//! very same ELF (`vmm tiny-kernel`), runs alternated so both see the same machine load.
//!
//! `bench-boot [--runs N] [--vmm PATH] [--with-pc]`: prints each run, the medians and the
//! ratio to QEMU microvm; exits 1 when ours is above half of QEMU microvm's median (the
//! project's target), 2 on a setup error. `scripts/bench-boot.sh` builds and runs it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Milliseconds from spawning `cmd` to `tiny: boot` on its stdout (the child is killed).
fn time_to_boot(mut cmd: Command) -> Result<f64, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning {cmd:?}: {e}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let result = loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break Err(format!("{cmd:?} ended before `tiny: boot`")),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(10).any(|w| w == b"tiny: boot") {
            break Ok(start.elapsed().as_secs_f64() * 1e3);
        }
        if start.elapsed() > TIMEOUT {
            break Err(format!("{cmd:?}: no `tiny: boot` within {TIMEOUT:?}"));
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn qemu(machine: &str, kernel: &PathBuf) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", machine, "-enable-kvm", "-m", "128M"])
        .args(["-cpu", "host,-arch-capabilities"])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel);
    c
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run() -> Result<bool, String> {
    let mut runs = 7usize;
    let mut vmm = None;
    let mut with_pc = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--runs takes a positive number")?
            }
            "--vmm" => vmm = Some(PathBuf::from(args.next().ok_or("--vmm takes a path")?)),
            "--with-pc" => with_pc = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let vmm = vmm.unwrap_or_else(|| minivmm_tests::vmm_bin().to_path_buf());
    let kernel = std::env::temp_dir().join(format!("bench-boot-tiny-{}.elf", std::process::id()));
    let status = Command::new(&vmm)
        .arg("tiny-kernel")
        .arg(&kernel)
        .status()
        .map_err(|e| format!("running {}: {e}", vmm.display()))?;
    if !status.success() {
        return Err(format!("{} tiny-kernel failed: {status}", vmm.display()));
    }

    let mut kinds = vec![("vmm", None), ("qemu microvm", Some("microvm"))];
    if with_pc {
        kinds.push(("qemu pc", Some("pc")));
    }
    let command = |machine: Option<&str>| match machine {
        None => {
            let mut c = Command::new(&vmm);
            c.arg("run");
            c
        }
        Some(m) => qemu(m, &kernel),
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..runs {
        for (i, &(name, machine)) in kinds.iter().enumerate() {
            let ms = time_to_boot(command(machine))?;
            println!("run {round}: {name:<13} {ms:8.1} ms");
            times[i].push(ms);
        }
    }
    let _ = std::fs::remove_file(&kernel);
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    println!();
    for ((name, _), m) in kinds.iter().zip(&medians) {
        println!(
            "median {name:<13} {m:8.1} ms  (vmm / this: {:.3}x)",
            medians[0] / m
        );
    }
    let ratio = medians[0] / medians[1];
    let ok = ratio <= 0.5;
    println!(
        "target: vmm at most 0.5x QEMU microvm to `tiny: boot`: {ratio:.2}x {}",
        if ok { "MET" } else { "MISSED" }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench-boot: {e}");
            ExitCode::from(2)
        }
    }
}
