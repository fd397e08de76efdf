//! Test certificates for the admin API's mutual TLS: a CA and the certificates it signs, each
//! written as a directory laid out like a `kubernetes.io/tls` Secret with `ca.crt` (what
//! `--admin-tls-dir` reads).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};

/// The name a gateway's admin certificate carries for its clients by default
/// (`--admin-tls-server-name`).
pub const ADMIN_SERVER_NAME: &str = "concentrator-gateway";

/// A CA that signs test certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes `dir/tls.crt`, `dir/tls.key` (a new key, mode 0400) and `dir/ca.crt` (this CA)
    /// for a certificate with these DNS names, good for both TLS server and client use (as
    /// one Secret serves a pod in both roles).
    pub fn issue(&self, dir: &Path, dns_names: &[&str]) -> Result<PathBuf> {
        self.issue_trusting(dir, dns_names, &self.pem())
    }

    /// As [`Self::issue`], with `ca_pem` as the `ca.crt` that this end trusts.
    pub fn issue_trusting(&self, dir: &Path, dns_names: &[&str], ca_pem: &str) -> Result<PathBuf> {
        let names: Vec<String> = dns_names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        if let Some(first) = dns_names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("tls.crt"), cert.pem())?;
        write_private(&dir.join("tls.key"), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join("ca.crt"), ca_pem)?;
        Ok(dir.to_owned())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o400)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
