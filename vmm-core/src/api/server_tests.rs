//! The API server against a fake [`Control`], on a loop running in a thread of the test:
//! every command, every bad request, silent and greedy clients, many clients at once.

use super::*;
use crate::api::{BlockInfo, Status, VmState};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;

#[derive(Default)]
struct Fake {
    paused: AtomicBool,
    quit: AtomicBool,
    blocks: Mutex<Vec<BlockInfo>>,
}

impl Control for Fake {
    fn status(&self) -> Status {
        let blocks = lock(&self.blocks).clone();
        Status {
            state: if self.paused.load(SeqCst) {
                VmState::Paused
            } else {
                VmState::Running
            },
            memory_bytes: blocks.iter().map(|b| b.size).sum(),
            boot_memory_bytes: 0,
            vcpus: 1,
            blocks,
            cpu_throttle_percent: 0,
            migration: None,
            incoming: None,
        }
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.paused.store(true, SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.paused.store(false, SeqCst);
        Ok(())
    }
    fn quit(&self) {
        self.quit.store(true, SeqCst);
    }
    fn ram_add(&self, id: &str, size: u64) -> Result<BlockInfo, ApiError> {
        let mut blocks = lock(&self.blocks);
        if blocks.iter().any(|b| b.id == id) {
            return Err(
                ramlist::kvm::KvmRamError::from(ramlist::RamError::DuplicateId(id.into())).into(),
            );
        }
        let b = BlockInfo {
            id: id.into(),
            size,
            guest_addr: None,
            hotplugged: true,
        };
        blocks.push(b.clone());
        Ok(b)
    }
    fn ram_remove(&self, id: &str) -> Result<(), ApiError> {
        let mut blocks = lock(&self.blocks);
        let i = blocks
            .iter()
            .position(|b| b.id == id)
            .ok_or_else(|| ramlist::kvm::KvmRamError::UnknownId(id.into()))?;
        blocks.remove(i);
        Ok(())
    }
}

struct Harness {
    path: PathBuf,
    fake: Arc<Fake>,
    lp: Arc<EventLoop>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Harness {
    fn new(name: &str, limits: Limits) -> Harness {
        let dir = std::env::temp_dir().join(format!("vmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api");
        let fake = Arc::new(Fake::default());
        let lp = Arc::new(EventLoop::new().unwrap());
        let socket = ApiSocket::bind(&path).unwrap();
        let server = ApiServer::start(&lp, socket, fake.clone(), limits).unwrap();
        let l = lp.clone();
        let thread = thread::spawn(move || {
            l.run().unwrap();
            server.shutdown(&l);
        });
        Harness {
            path,
            fake,
            lp,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> Conn {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            stream: s,
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.lp.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next answer; None at end of stream.
    fn answer(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("an answer is JSON")),
        }
    }

    fn ask(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.answer().expect("an answer")
    }
}

fn refused(v: &Value, class: &str) {
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["class"], class, "{v}");
    assert!(!v["error"].as_str().unwrap().is_empty(), "{v}");
}

#[test]
fn every_command_and_its_refusals() {
    let h = Harness::new("cmds", Limits::default());
    let mut c = h.connect();
    let st = c.ask(r#"{"cmd":"status"}"#);
    assert_eq!(
        (st["ok"].clone(), st["state"].clone()),
        (true.into(), "running".into())
    );
    assert_eq!(c.ask(r#"{"cmd":"pause"}"#)["state"], "paused");
    assert_eq!(c.ask(r#"{"cmd":"status"}"#)["state"], "paused");
    assert_eq!(c.ask(r#"{"cmd":"resume"}"#)["state"], "running");
    let added = c.ask(r#"{"cmd":"ram-add","id":"x","size":"2M"}"#);
    assert_eq!(
        (added["id"].clone(), added["size"].clone()),
        ("x".into(), (2u64 << 20).into())
    );
    refused(
        &c.ask(r#"{"cmd":"ram-add","id":"x","size":4096}"#),
        "duplicate-id",
    );
    assert_eq!(c.ask(r#"{"cmd":"status"}"#)["blocks"][0]["id"], "x");
    assert_eq!(c.ask(r#"{"cmd":"ram-remove","id":"x"}"#)["ok"], true);
    refused(&c.ask(r#"{"cmd":"ram-remove","id":"x"}"#), "unknown-id");
    refused(&c.ask(r#"{"cmd": "ram-add", "id": "#), "malformed-json");
    refused(&c.ask(r#"{"cmd":"fly"}"#), "unknown-command");
    refused(&c.ask("42"), "not-a-request");
    // Pipelined requests are answered in order; blank lines are ignored.
    c.send(b"{\"cmd\":\"status\"}\r\n\n{\"cmd\":\"bogus\"}\n");
    assert_eq!(c.answer().unwrap()["ok"], true);
    refused(&c.answer().unwrap(), "unknown-command");
    assert_eq!(c.ask(r#"{"cmd":"quit"}"#)["ok"], true);
    assert!(c.answer().is_none(), "the connection closes after quit");
    assert!(h.fake.quit.load(SeqCst));
}

#[test]
fn an_oversized_line_is_refused_and_the_client_dropped() {
    let h = Harness::new("long", Limits::default());
    let mut c = h.connect();
    let mut big = vec![b'x'; (64 << 10) + 10];
    big.push(b'\n');
    // The server may close while we still send: a broken pipe is fine.
    let _ = c.stream.write_all(&big);
    refused(&c.answer().unwrap(), "line-too-long");
    assert!(c.answer().is_none());
    // The server runs on for others.
    assert_eq!(h.connect().ask(r#"{"cmd":"status"}"#)["ok"], true);
}

#[test]
fn a_silent_client_blocks_nobody_and_times_out() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let h = Harness::new("idle", limits);
    let mut silent = h.connect();
    silent.send(b"{\"cmd\":");
    let mut busy = h.connect();
    for _ in 0..5 {
        assert_eq!(busy.ask(r#"{"cmd":"status"}"#)["ok"], true);
    }
    refused(&silent.answer().unwrap(), "idle-timeout");
    assert!(silent.answer().is_none());
}

#[test]
fn many_clients_at_once_and_too_many() {
    let limits = Limits {
        max_clients: 40,
        ..Limits::default()
    };
    let h = Harness::new("many", limits);
    let path = h.path.clone();
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let path = path.clone();
            thread::spawn(move || {
                let s = UnixStream::connect(&path).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut c = Conn {
                    reader: BufReader::new(s.try_clone().unwrap()),
                    stream: s,
                };
                let id = format!("b{i}");
                let v = c.ask(&format!(r#"{{"cmd":"ram-add","id":"{id}","size":4096}}"#));
                assert_eq!(v["ok"], true, "{v}");
                assert_eq!(c.ask(r#"{"cmd":"status"}"#)["ok"], true);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(lock(&h.fake.blocks).len(), 32);
    // Fill every slot, then one more is refused with an error and closed.
    let mut held: Vec<Conn> = (0..40).map(|_| h.connect()).collect();
    assert_eq!(held[0].ask(r#"{"cmd":"status"}"#)["ok"], true);
    let mut extra = h.connect();
    refused(&extra.answer().unwrap(), "too-many-clients");
    assert!(extra.answer().is_none());
    held.truncate(10);
    // Closed clients free their slots.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = h.connect();
        c.send(b"{\"cmd\":\"status\"}\n");
        let v = c.answer().unwrap();
        if v["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed: {v}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_request_without_newline_before_eof_is_answered() {
    let h = Harness::new("eof", Limits::default());
    let mut c = h.connect();
    c.send(br#"{"cmd":"status"}"#);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.answer().unwrap()["ok"], true);
    assert!(c.answer().is_none());
}

#[test]
fn shutdown_removes_the_socket_file() {
    let mut h = Harness::new("shutdown", Limits::default());
    let _c = h.connect();
    h.lp.stop();
    h.thread.take().unwrap().join().unwrap();
    assert!(!h.path.exists());
}
