//! Test certificates for TLS migrations, made with rcgen in QEMU's x509 layout: a CA, a
//! server certificate for the destination's host names, a client certificate for the
//! source's name. `make-tls-creds` (a binary of this crate) writes a directory of them for
//! users; the tests write their own, including wrong ones (another CA, another name).

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::fs;
use std::io;
use std::path::Path;

/// A certificate authority that signs servers and clients.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(e)
}

impl Ca {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> io::Result<Ca> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(Ca { cert, key })
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA, for
    /// `usage`; its PEM and its key's PEM.
    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> io::Result<(String, String)> {
        let key = KeyPair::generate().map_err(rc)?;
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).map_err(rc)?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("peer"));
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(rc)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `dir/ca-cert.pem`.
    pub fn write_ca(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("ca-cert.pem"), self.cert.pem())
    }

    /// Writes `dir/server-cert.pem` and `dir/server-key.pem`, valid for `hosts`.
    pub fn write_server(&self, dir: &Path, hosts: &[&str]) -> io::Result<()> {
        let (cert, key) = self.issue(hosts, ExtendedKeyUsagePurpose::ServerAuth)?;
        fs::create_dir_all(dir)?;
        fs::write(dir.join("server-cert.pem"), cert)?;
        write_key(&dir.join("server-key.pem"), &key)
    }

    /// Writes `dir/client-cert.pem` and `dir/client-key.pem`, valid for `name`.
    pub fn write_client(&self, dir: &Path, name: &str) -> io::Result<()> {
        let (cert, key) = self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)?;
        fs::create_dir_all(dir)?;
        fs::write(dir.join("client-cert.pem"), cert)?;
        write_key(&dir.join("client-key.pem"), &key)
    }

    /// A whole credentials directory: this CA, a server for `hosts`, a client `client`.
    pub fn write_all(&self, dir: &Path, hosts: &[&str], client: &str) -> io::Result<()> {
        self.write_ca(dir)?;
        self.write_server(dir, hosts)?;
        self.write_client(dir, client)
    }
}

/// A private key, readable by its owner only.
fn write_key(path: &Path, pem: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem.as_bytes())
}
