//! Mutual TLS of the admin API, shared by its server (the gateway) and its clients (the
//! gateway's `tunnels` command, the pods asking each other for the fleet-wide tunnel list, and
//! the operator).
//!
//! The files are those of a `kubernetes.io/tls` Secret as cert-manager writes it, in one
//! directory: `tls.crt` (this end's certificate chain), `tls.key` (its private key) and
//! `ca.crt` (the CA that signs the other end's certificate). A server admits only clients whose
//! certificate that CA signed; a client accepts only a server certificate signed by it that
//! carries the expected DNS name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// This end's certificate chain.
pub const CERT_FILE: &str = "tls.crt";
/// This end's private key.
pub const KEY_FILE: &str = "tls.key";
/// The CA bundle that signs the other end's certificates.
pub const CA_FILE: &str = "ca.crt";

/// The DNS name every gateway's admin certificate carries by default. Clients reach gateways
/// by pod IP (fleet members) or per-pod DNS name (the operator) and verify this one name
/// rather than either: one certificate can then serve every pod of a fleet, and no pod IP,
/// unknown before the pod exists, needs to be in it.
pub const DEFAULT_SERVER_NAME: &str = "concentrator-gateway";

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("admin TLS configuration: {0}")]
    Config(String),
}

/// The admin TLS files of one end, checked to parse. Its `Debug` names the directory only:
/// the key never reaches a log.
#[derive(Clone)]
pub struct AdminTls {
    dir: PathBuf,
    cert: Vec<u8>,
    key: zeroize::Zeroizing<Vec<u8>>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl AdminTls {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir` and checks that each holds what it
    /// should, so that a wrong file is named at start rather than by a failed handshake.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
        };
        let cert = read(CERT_FILE)?;
        let key = zeroize::Zeroizing::new(read(KEY_FILE)?);
        let ca = read(CA_FILE)?;
        Self::from_pem(dir, cert, key, ca)
    }

    /// The same files' contents as they are in a `kubernetes.io/tls` Secret (`origin` names
    /// where they came from in errors, e.g. `secret/ns/name`).
    pub fn from_pem(
        origin: &Path,
        cert: Vec<u8>,
        key: zeroize::Zeroizing<Vec<u8>>,
        ca: Vec<u8>,
    ) -> Result<Self, TlsError> {
        install_crypto_provider();
        let dir = origin;
        let pem_error = |name: &str, what: String| TlsError::Pem {
            path: dir.join(name),
            what,
        };
        for (name, pem) in [(CERT_FILE, &cert), (CA_FILE, &ca)] {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(name, format!("not a PEM certificate list: {e}")))?;
            if certs.is_empty() {
                return Err(pem_error(name, "holds no PEM certificate".into()));
            }
        }
        // Only whether it parses: the error of the PEM parser never quotes the key's bytes.
        PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| pem_error(KEY_FILE, format!("not a PEM private key: {e}")))?;
        Ok(Self {
            dir: dir.to_owned(),
            cert,
            key,
            ca,
        })
    }

    /// The directory the files came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, self.key.as_slice())
    }

    /// The server side: this end's certificate, and a client certificate signed by the CA
    /// required of every client (there is no anonymous access); HTTP/2 by ALPN, as gRPC needs.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca) {
            let ca = ca.map_err(|e| TlsError::Config(format!("{CA_FILE}: {e}")))?;
            roots.add(ca).map_err(config)?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(format!("{CA_FILE}: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Config(format!("{CERT_FILE}: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| TlsError::Config(format!("{KEY_FILE}: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("{CERT_FILE} and {KEY_FILE}: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(server))
    }

    /// Whether `other` holds the same files' contents.
    pub fn same_files(&self, other: &Self) -> bool {
        self.cert == other.cert && *self.key == *other.key && self.ca == other.ca
    }

    /// The client side: present this end's certificate, trust only the CA, and expect
    /// `server_name` in the server's certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity())
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name(server_name)
    }
}

/// Client TLS for one admin API: the files and the name its certificate must carry.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub files: AdminTls,
    pub server_name: String,
}

impl ClientTls {
    /// The same directory read again (certificates are renewed while processes run). The
    /// caller keeps using `self` when this fails.
    pub fn reloaded(&self) -> Result<Self, TlsError> {
        Ok(Self {
            files: AdminTls::load(self.files.dir())?,
            server_name: self.server_name.clone(),
        })
    }
}

/// The endpoint of an admin API at `authority` (`host:port`): `https` with `tls`, else plain
/// `http`.
pub fn endpoint(authority: &str, tls: Option<&ClientTls>) -> Result<Endpoint, TlsError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let e = Endpoint::from_shared(format!("{scheme}://{authority}"))
        .map_err(|e| TlsError::Config(format!("admin API address '{authority}': {e}")))?;
    match tls {
        None => Ok(e),
        Some(t) => e
            .tls_config(t.files.client_config(&t.server_name))
            .map_err(|e| TlsError::Config(e.to_string())),
    }
}

/// rustls needs one process-wide crypto provider when more than one is compiled in (kube's
/// client brings ring, this workspace uses aws-lc-rs): without it, building a server config
/// panics. Installing fails harmlessly when one is there already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
