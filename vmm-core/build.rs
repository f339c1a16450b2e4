//! Builds the tiny guest kernel (`guest/`) with the machine's gcc and ld into
//! `$OUT_DIR/tiny.elf`, which `src/tiny.rs` embeds in the `vmm` binary.
//!
//! `TINY_CC` and `TINY_LD` override the compiler and linker (default `gcc` and `ld`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["entry.S", "tiny.c", "dirty.c", "probe.c"];
const OTHER_INPUTS: &[&str] = &["tiny.h", "tiny.ld"];

const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-fno-zero-initialized-in-bss",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-nostdlib",
];

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("building the tiny guest: `{shown}` failed ({s})"),
        Err(e) => panic!(
            "building the tiny guest: cannot run `{shown}`: {e} (gcc and binutils are needed)"
        ),
    }
}

fn main() {
    let guest = Path::new("guest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cc = env::var("TINY_CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("TINY_LD").unwrap_or_else(|_| "ld".into());
    println!("cargo:rerun-if-env-changed=TINY_CC");
    println!("cargo:rerun-if-env-changed=TINY_LD");
    for f in SOURCES.iter().chain(OTHER_INPUTS) {
        println!("cargo:rerun-if-changed=guest/{f}");
    }

    let mut objects = Vec::new();
    for src in SOURCES {
        let obj = out.join(format!("{src}.o"));
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-c")
            .arg(guest.join(src))
            .arg("-o")
            .arg(&obj));
        objects.push(obj);
    }
    run(Command::new(&ld)
        .args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "--build-id=none",
        ])
        .args([
            "--no-warn-rwx-segments",
            "-z",
            "max-page-size=0x1000",
            "-z",
            "noexecstack",
        ])
        .arg("-T")
        .arg(guest.join("tiny.ld"))
        .arg("-o")
        .arg(out.join("tiny.elf"))
        .args(&objects));
}
