//! `make-tls-creds DIR [--host NAME]... [--client NAME]`: writes a CA, a server
//! certificate (default hosts `localhost` and `127.0.0.1`) and a client certificate
//! (default name `migration-source`) into DIR, in QEMU's x509 layout (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`), for
//! `vmm run --incoming tcp:... --tls-creds DIR` and `vmm migrate --tls-creds DIR`.
//! For trying TLS migrations out; a real deployment's certificates come from its own CA.

use minivmm_tests::tls::Ca;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut dir = None;
    let mut hosts = Vec::new();
    let mut client = "migration-source".to_string();
    let mut args = std::env::args().skip(1);
    let usage = || {
        eprintln!("usage: make-tls-creds DIR [--host NAME]... [--client NAME]");
        ExitCode::from(2)
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--host" => match args.next() {
                Some(h) => hosts.push(h),
                None => return usage(),
            },
            "--client" => match args.next() {
                Some(c) => client = c,
                None => return usage(),
            },
            _ if !a.starts_with("--") && dir.is_none() => dir = Some(PathBuf::from(&a)),
            _ => return usage(),
        }
    }
    let Some(dir) = dir else {
        return usage();
    };
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into()];
    }
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let made = Ca::new("minivmm test CA").and_then(|ca| ca.write_all(&dir, &hosts, &client));
    match made {
        Ok(()) => {
            println!(
                "{}: CA, server for {hosts:?}, client {client:?}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-tls-creds: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
