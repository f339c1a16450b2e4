//! The QMP codec against a fake [`Control`]: framing (objects with no separator, split
//! across reads, broken JSON), negotiation, answers with ids, argument checks, events only
//! after negotiation.

use super::*;
use crate::api::{BlockInfo, Status, VmState};
use crate::events::ShutdownCause;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;

#[derive(Default)]
struct Fake {
    paused: AtomicBool,
    added: Mutex<Vec<(String, u64)>>,
    migrations: Mutex<Vec<crate::api::MigrationParams>>,
}

impl Control for Fake {
    fn status(&self) -> Status {
        Status {
            state: if self.paused.load(SeqCst) {
                VmState::Paused
            } else {
                VmState::Running
            },
            memory_bytes: 0,
            boot_memory_bytes: 0,
            vcpus: 1,
            blocks: vec![BlockInfo {
                id: "extra".into(),
                size: 1 << 20,
                guest_addr: Some(1 << 32),
                hotplugged: true,
            }],
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
    fn quit(&self) {}
    fn ram_add(&self, id: &str, size: u64) -> Result<BlockInfo, ApiError> {
        self.added.lock().unwrap().push((id.into(), size));
        Ok(BlockInfo {
            id: id.into(),
            size,
            guest_addr: Some(1 << 32),
            hotplugged: true,
        })
    }
    fn ram_remove(&self, id: &str) -> Result<(), ApiError> {
        Err(ramlist::kvm::KvmRamError::UnknownId(id.into()).into())
    }
    fn migrate(&self, params: &crate::api::MigrationParams) -> Result<(), ApiError> {
        self.migrations.lock().unwrap().push(params.clone());
        Ok(())
    }
}

struct Conn {
    session: QmpSession,
    fake: Fake,
    input: Vec<u8>,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            session: QmpSession::new(Arc::default()),
            fake: Fake::default(),
            input: Vec::new(),
        }
    }

    /// Feeds `bytes`; the answers, one JSON value each.
    fn send(&mut self, bytes: &str) -> (Vec<Value>, After) {
        self.input.extend_from_slice(bytes.as_bytes());
        let mut out = Vec::new();
        let fed = self.session.feed(
            &mut self.input,
            false,
            &self.fake,
            &Limits::default(),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        let answers = text
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (answers, fed.after)
    }

    fn one(&mut self, bytes: &str) -> Value {
        let (mut a, _) = self.send(bytes);
        assert_eq!(a.len(), 1, "{a:?}");
        a.remove(0)
    }

    fn negotiated() -> Conn {
        let mut c = Conn::new();
        assert_eq!(
            c.one(r#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
        c
    }
}

fn class(v: &Value) -> &str {
    v["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

#[test]
fn the_greeting_names_the_protocol() {
    let g: Value = serde_json::from_str(greeting().trim_end()).unwrap();
    assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    let mut s = QmpSession::new(Arc::default());
    assert_eq!(s.greeting().unwrap(), greeting());
}

#[test]
fn nothing_but_qmp_capabilities_before_negotiation() {
    let mut c = Conn::new();
    let v = c.one(r#"{"execute":"query-status","id":1}"#);
    assert_eq!(class(&v), "CommandNotFound");
    assert_eq!(v["id"], 1);
    assert!(v["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("qmp_capabilities"));
    let v = c.one(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#);
    assert_eq!(class(&v), "GenericError");
    assert_eq!(
        c.one(r#"{"execute":"qmp_capabilities","id":"a"}"#),
        json!({"return": {}, "id": "a"})
    );
    let v = c.one(r#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(class(&v), "CommandNotFound");
}

#[test]
fn objects_without_separators_split_anywhere_are_each_answered() {
    let mut c = Conn::negotiated();
    let two = r#"{"execute":"stop","id":1}{"execute":"query-status","id":2}"#;
    let (half, rest) = two.split_at(20);
    let (a, after) = c.send(half);
    assert!(a.is_empty());
    assert_eq!(after, After::Open);
    let (a, _) = c.send(rest);
    assert_eq!(a.len(), 2);
    assert_eq!(a[0], json!({"return": {}, "id": 1}));
    assert_eq!(a[1]["return"]["status"], "paused");
    assert_eq!(a[1]["return"]["running"], false);
}

#[test]
fn broken_json_is_refused_and_the_next_line_still_runs() {
    let mut c = Conn::negotiated();
    let (a, after) = c.send("{\"execute\": nope}\n{\"execute\":\"cont\",\"id\":3}");
    assert_eq!(after, After::Open);
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(class(&a[0]), "GenericError");
    assert_eq!(a[1], json!({"return": {}, "id": 3}));
    let v = c.one("[1,2]");
    assert!(v["error"]["desc"].as_str().unwrap().contains("JSON object"));
    let v = c.one(r#"{"execute":"cont","bogus":1}"#);
    assert!(v["error"]["desc"].as_str().unwrap().contains("'bogus'"));
}

#[test]
fn an_endless_request_is_refused_and_closes() {
    let mut c = Conn::negotiated();
    let huge = format!(
        "{{\"execute\":\"{}",
        "x".repeat(Limits::default().max_line + 1)
    );
    let (a, after) = c.send(&huge);
    assert_eq!(after, After::Close);
    assert_eq!(class(&a[0]), "GenericError");
}

#[test]
fn arguments_are_checked_before_anything_runs() {
    let mut c = Conn::negotiated();
    let v = c.one(r#"{"execute":"x-ram-add","arguments":{"id":"a"}}"#);
    assert_eq!(v["error"]["desc"], "Parameter 'size' is missing");
    let v = c.one(r#"{"execute":"x-ram-add","arguments":{"id":5,"size":1}}"#);
    assert_eq!(
        v["error"]["desc"],
        "Invalid parameter type for 'id', expected: string"
    );
    let v = c.one(r#"{"execute":"x-ram-add","arguments":{"id":"a","size":"2M","x":1}}"#);
    assert_eq!(v["error"]["desc"], "Parameter 'x' is unexpected");
    assert!(c.fake.added.lock().unwrap().is_empty());
    let v = c.one(r#"{"execute":"x-ram-add","arguments":{"id":"a","size":"2M"}}"#);
    assert_eq!(v["return"]["size"], 2 << 20);
    assert_eq!(
        *c.fake.added.lock().unwrap(),
        vec![("a".to_string(), 2 << 20)]
    );
    let v = c.one(r#"{"execute":"x-ram-remove","arguments":{"id":"nope"}}"#);
    assert_eq!(class(&v), "DeviceNotFound");
    let v = c.one(r#"{"execute":"no-such-thing"}"#);
    assert_eq!(class(&v), "CommandNotFound");
}

#[test]
fn migrate_takes_the_shared_parameters_and_capabilities() {
    let mut c = Conn::negotiated();
    let v = c.one(r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":0}}"#);
    assert_eq!(class(&v), "GenericError");
    let v = c.one(r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":50,"max-bandwidth":1000000}}"#);
    assert_eq!(v, json!({"return": {}}));
    // migrate-start-postcopy needs postcopy-ram first, as in QEMU.
    let v = c.one(r#"{"execute":"migrate-start-postcopy"}"#);
    assert!(
        v["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("Enable postcopy"),
        "{v}"
    );
    let v = c.one(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}"#);
    assert_eq!(v, json!({"return": {}}));
    let v = c.one(r#"{"execute":"migrate-start-postcopy"}"#);
    assert!(
        v["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("no migration"),
        "the VMM's own answer: {v}"
    );
    let v = c.one(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":false}]}}"#);
    assert_eq!(v, json!({"return": {}}));
    let v = c.one(r#"{"execute":"query-migrate-capabilities"}"#);
    assert_eq!(
        v["return"][0],
        json!({"capability": "auto-converge", "state": false})
    );
    assert_eq!(
        v["return"][1],
        json!({"capability": "events", "state": false})
    );
    let v = c.one(r#"{"execute":"migrate","arguments":{"uri":"unix:/tmp/x","blk":true}}"#);
    assert_eq!(class(&v), "GenericError");
    let v = c.one(r#"{"execute":"migrate","arguments":{"uri":"unix:/tmp/x","detach":true}}"#);
    assert_eq!(v, json!({"return": {}}));
    let m = c.fake.migrations.lock().unwrap().clone();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].uri, "unix:/tmp/x");
    assert_eq!(m[0].downtime_ms, Some(50));
    assert_eq!(m[0].max_bandwidth, Some(1_000_000));
    assert_eq!(m[0].auto_converge, Some(false));
    assert!(!m[0].local);
    assert_eq!(
        c.one(r#"{"execute":"query-migrate"}"#),
        json!({"return": {}})
    );
    // x-ignore-shared: QEMU's way to leave shared RAM out; here a local migration.
    let v = c.one(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}"#);
    assert_eq!(v, json!({"return": {}}));
    let v = c.one(r#"{"execute":"migrate","arguments":{"uri":"unix:/tmp/y"}}"#);
    assert_eq!(v, json!({"return": {}}));
    let m = c.fake.migrations.lock().unwrap().clone();
    assert!(m[1].local, "{:?}", m[1]);
}

#[test]
fn quit_answers_then_quits() {
    let mut c = Conn::negotiated();
    let (a, after) = c.send(r#"{"execute":"quit","id":9}{"execute":"cont"}"#);
    assert_eq!(a, vec![json!({"return": {}, "id": 9})]);
    assert_eq!(after, After::Quit);
}

#[test]
fn events_flow_only_after_negotiation() {
    let at = |event| Timestamped {
        event,
        seconds: 7,
        microseconds: 8,
    };
    let mut s = QmpSession::new(Arc::default());
    assert!(s.event(&at(VmEvent::Stop)).is_none());
    s.negotiated = true;
    let v: Value = serde_json::from_str(s.event(&at(VmEvent::Stop)).unwrap().trim_end()).unwrap();
    assert_eq!(
        v,
        json!({"event": "STOP", "timestamp": {"seconds": 7, "microseconds": 8}})
    );
    let line = s
        .event(&at(VmEvent::Shutdown(ShutdownCause::GuestReset)))
        .unwrap();
    let v: Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(v["data"], json!({"guest": true, "reason": "guest-reset"}));
    assert!(
        s.event(&at(VmEvent::Migration { status: "active" }))
            .is_none(),
        "MIGRATION without the events capability"
    );
    let caps = json!([{"capability": "events", "state": true}]);
    s.settings.set_capabilities(&caps).unwrap();
    let line = s
        .event(&at(VmEvent::Migration { status: "active" }))
        .unwrap();
    assert!(line.contains(r#""event":"MIGRATION""#), "{line}");
}
