//! Mutual TLS on `tcp:`, at the transport: a good pair talks; a client from another CA, a
//! client with no certificate, a client whose name `--tls-authz` does not allow, and a
//! plain-TCP peer are each refused during the handshake, with nothing of their stream
//! read, and the listener takes the right client afterwards; a byte flipped in flight
//! breaks the stream instead of arriving; bad credentials are one clear error.

use migration::transport::{
    connect_tls, listen_tls, Listener, MigrationUri, TlsClient, TlsServer, TransportError,
};
use minivmm_tests::tls::Ca;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const CLIENT: &str = "source.example";

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The destination's credentials (and a good source's) from one CA, in `dir/good`.
fn good(dir: &Dir) -> (Ca, PathBuf) {
    let ca = Ca::new("test CA").unwrap();
    let good = dir.sub("good");
    ca.write_all(&good, &["localhost", "127.0.0.1"], CLIENT)
        .unwrap();
    (ca, good)
}

fn listener(creds: &std::path::Path, authz: Option<&str>) -> (Listener, MigrationUri) {
    let server = TlsServer::load(creds, authz).unwrap();
    let l = listen_tls(&"tcp:127.0.0.1:0".parse().unwrap(), server).unwrap();
    let uri = l.uri().clone();
    (l, uri)
}

/// Accepts one connection and echoes what it reads (up to 5 bytes) back.
fn echo_once(l: &Listener) -> Result<Vec<u8>, TransportError> {
    let mut conn = l.accept()?;
    let mut buf = [0u8; 5];
    conn.reader()
        .read_exact(&mut buf)
        .map_err(|source| TransportError::Accept {
            uri: "echo".into(),
            source,
        })?;
    conn.writer().write_all(&buf).unwrap();
    conn.writer().flush().unwrap();
    Ok(buf.to_vec())
}

fn talk(uri: &MigrationUri, client: &TlsClient) -> std::io::Result<Vec<u8>> {
    let mut conn = connect_tls(uri, client).map_err(std::io::Error::other)?;
    conn.writer().write_all(b"hello")?;
    conn.writer().flush()?;
    let mut back = [0u8; 5];
    conn.reader().read_exact(&mut back)?;
    Ok(back.to_vec())
}

fn refused(r: Result<Vec<u8>, TransportError>, why: &str) -> String {
    match r {
        Err(e @ TransportError::TlsRefused { .. }) => {
            let text = e.to_string();
            assert!(text.contains(why), "refused, but not for {why:?}: {text}");
            text
        }
        Err(e) => panic!("failed otherwise than a TLS refusal: {e}"),
        Ok(got) => panic!("accepted, and read {got:?}"),
    }
}

#[test]
fn a_good_pair_talks_and_the_right_name_is_authorised() {
    let dir = Dir::new("good");
    let (_ca, creds) = good(&dir);
    let (l, uri) = listener(&creds, Some(CLIENT));
    let server = thread::spawn(move || echo_once(&l));
    let client = TlsClient::load(&creds).unwrap();
    assert_eq!(talk(&uri, &client).unwrap(), b"hello");
    assert_eq!(server.join().unwrap().unwrap(), b"hello");
}

/// Each bad client is refused; then the same listener serves a good one.
#[test]
fn bad_clients_are_refused_and_the_listener_waits_for_the_right_one() {
    let dir = Dir::new("bad");
    let (ca, creds) = good(&dir);
    // Another CA's client.
    let other = Ca::new("another CA").unwrap();
    let wrong_ca = dir.sub("wrong-ca");
    ca.write_ca(&wrong_ca).unwrap();
    other.write_client(&wrong_ca, CLIENT).unwrap();
    // The right CA, another name.
    let intruder = dir.sub("intruder");
    ca.write_ca(&intruder).unwrap();
    ca.write_client(&intruder, "intruder.example").unwrap();

    let (l, uri) = listener(&creds, Some(CLIENT));
    let l = Arc::new(l);

    let (l2, u2) = (l.clone(), uri.clone());
    let s = thread::spawn(move || echo_once(&l2));
    let client = TlsClient::load(&wrong_ca).unwrap();
    assert!(
        talk(&u2, &client).is_err(),
        "another CA's client got through"
    );
    let why = refused(s.join().unwrap(), "UnknownIssuer");
    println!("another CA: {why}");

    let (l2, u2) = (l.clone(), uri.clone());
    let s = thread::spawn(move || echo_once(&l2));
    let client = TlsClient::load(&intruder).unwrap();
    assert!(
        talk(&u2, &client).is_err(),
        "an unauthorised name got through"
    );
    let why = refused(s.join().unwrap(), "--tls-authz");
    println!("unauthorised name: {why}");

    // No client certificate at all: a client rustls makes without one.
    let (l2, u2) = (l.clone(), uri.clone());
    let s = thread::spawn(move || echo_once(&l2));
    no_certificate_client(&creds, &u2);
    let why = refused(s.join().unwrap(), "");
    println!("no client certificate: {why}");

    // Plain TCP speaking the migration stream's first bytes.
    let (l2, u2) = (l.clone(), uri.clone());
    let s = thread::spawn(move || echo_once(&l2));
    let MigrationUri::Tcp { host, port } = &u2 else {
        unreachable!()
    };
    let mut plain = TcpStream::connect((host.as_str(), *port)).unwrap();
    plain.write_all(b"MVMSTRM\0hello, plain stream").unwrap();
    let why = refused(s.join().unwrap(), "");
    println!("plain tcp: {why}");

    // The listener still listens, and takes the right client.
    let (l2, u2) = (l.clone(), uri.clone());
    let s = thread::spawn(move || echo_once(&l2));
    let client = TlsClient::load(&creds).unwrap();
    assert_eq!(talk(&u2, &client).unwrap(), b"hello");
    assert_eq!(s.join().unwrap().unwrap(), b"hello");
}

fn no_certificate_client(creds: &std::path::Path, uri: &MigrationUri) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(creds.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let MigrationUri::Tcp { host, port } = uri else {
        unreachable!()
    };
    let mut tcp = TcpStream::connect((host.as_str(), *port)).unwrap();
    let name = ServerName::try_from(host.clone()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut s = rustls::Stream::new(&mut conn, &mut tcp);
    // The server refuses at the end of the handshake; writing may or may not fail here.
    let _ = s.write_all(b"hello");
    let mut back = [0u8; 5];
    assert!(
        s.read_exact(&mut back).is_err(),
        "a client with no certificate was answered"
    );
}

/// A proxy that flips one byte in the middle of what the client sends: the server's read
/// fails (the record does not authenticate) instead of handing the changed byte on.
#[test]
fn a_byte_flipped_in_flight_breaks_the_stream() {
    let dir = Dir::new("mitm");
    let (_ca, creds) = good(&dir);
    let (l, uri) = listener(&creds, Some(CLIENT));
    let MigrationUri::Tcp { host, port } = uri.clone() else {
        unreachable!()
    };
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_uri: MigrationUri = format!("tcp:127.0.0.1:{}", proxy.local_addr().unwrap().port())
        .parse()
        .unwrap();
    // Everything the client sends after its first 4 KiB (the handshake) gets one byte
    // flipped once; the way back is copied as is.
    thread::spawn(move || {
        let (mut from_client, _) = proxy.accept().unwrap();
        let mut to_server = TcpStream::connect((host.as_str(), port)).unwrap();
        let (mut back_from, mut back_to) = (
            to_server.try_clone().unwrap(),
            from_client.try_clone().unwrap(),
        );
        thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let mut seen = 0usize;
        let mut flipped = false;
        let mut buf = [0u8; 8192];
        loop {
            let n = match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !flipped && seen + n > 64 << 10 {
                let at = (64usize << 10).saturating_sub(seen).min(n - 1);
                buf[at] ^= 0x40;
                flipped = true;
            }
            seen += n;
            if to_server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let server = thread::spawn(move || {
        let mut conn = l.accept().unwrap();
        conn.set_timeouts(Some(Duration::from_secs(10)), None)
            .unwrap();
        let mut got = Vec::new();
        let r = conn.reader().read_to_end(&mut got);
        (r, got)
    });
    let client = TlsClient::load(&creds).unwrap();
    let mut conn = connect_tls(&proxy_uri, &client).unwrap();
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i * 7 + 3) as u8).collect();
    let _ = conn.writer().write_all(&data);
    let _ = conn.writer().flush();
    drop(conn);
    let (r, got) = server.join().unwrap();
    let e = r.expect_err("the server read a stream with a flipped byte to its end");
    println!("after {} good bytes: {e}", got.len());
    assert!(got.len() < data.len(), "all the data arrived");
    assert_eq!(got, data[..got.len()], "a changed byte was handed on");
}

#[test]
fn bad_credentials_are_one_clear_error() {
    let dir = Dir::new("creds");
    let e = TlsClient::load(&dir.sub("nothing-here"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");
    let (_ca, creds) = good(&dir);
    std::fs::write(creds.join("client-key.pem"), "not a key").unwrap();
    let e = TlsClient::load(&creds).unwrap_err().to_string();
    assert!(e.contains("client-key.pem"), "{e}");
    let e = TlsServer::load(&creds, Some("not a name!"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--tls-authz"), "{e}");
    let e = connect_tls(
        &"unix:/tmp/x".parse().unwrap(),
        &TlsClient::load(&good(&Dir::new("c2")).1).unwrap(),
    )
    .err()
    .expect("TLS over unix: accepted")
    .to_string();
    assert!(e.contains("tcp:"), "{e}");
}
