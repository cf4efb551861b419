//! TLS 1.3 for every link: loading PEM files and building rustls configs.
//!
//! One crypto provider (aws-lc-rs) is used everywhere and passed explicitly,
//! so a dependency that enables `ring` cannot make rustls pick another one.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}")]
    ReadCert {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate; expected a file made by `popupd ca issue`")]
    NoCert { path: String },
    #[error("cannot read private key {path}: {source}")]
    ReadKey {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid server name")]
    BadName(String),
    #[error("the key does not belong to the certificate (another server's key, or an old one)")]
    KeyMismatch,
}

/// The crypto provider of the whole process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs())
}

/// Makes ours the process default, for libraries that ask rustls for the
/// default provider. Safe to call more than once.
pub fn install_default_provider() {
    let _ = aws_lc_rs().install_default();
}

/// aws-lc-rs with TLS 1.3's AES-128-GCM-SHA256 suite first (rustls puts
/// AES-256-GCM-SHA384 first). Servers keep their own order whatever a
/// client prefers (`ignore_client_order`), so this order decides. AES-128 is what most TLS 1.3 stacks prefer, and its SHA-256 key
/// schedule runs on the CPU's SHA extensions where SHA-384 has none: SHA-384
/// was a tenth of a home's CPU during a login storm (docs/performance.md).
fn aws_lc_rs() -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    p
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            path: shown.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: shown });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::ReadKey {
        path: path.display().to_string(),
        source,
    })
}

/// Whether `key` is the private key of the first certificate of `chain`.
pub fn check_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    match rustls::sign::CertifiedKey::from_der(chain.to_vec(), key.clone_key(), &provider()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch),
        Err(e) => Err(e.into()),
    }
}

/// A root store holding the certificates of a PEM file.
pub fn roots_from(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// The operating system's trusted roots (for homes with a public certificate).
pub fn system_roots() -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("reading system certificates: {e}");
    }
    roots.add_parsable_certificates(found.certs);
    Arc::new(roots)
}

/// A server's identity: its certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Identity {
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// How a server treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate under the CA (global server).
    Required,
    /// Agents present none; homes present one under the CA (home server).
    Optional,
}

/// TLS 1.3 server config.
pub fn server_config(
    id: &Identity,
    ca: Arc<RootCertStore>,
    auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let p = provider();
    let mut verifier = WebPkiClientVerifier::builder_with_provider(ca, p.clone());
    if auth == ClientAuth::Optional {
        verifier = verifier.allow_unauthenticated();
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.build()?)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    // The server's suite order, not the client's: a client that lists
    // AES-256 first would otherwise get its costlier key schedule.
    cfg.ignore_client_order = true;
    // Session tickets would let an agent resume cheaply, but each costs
    // memory on the server; plain handshakes are fast enough with TLS 1.3.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// TLS 1.3 client config, optionally presenting a certificate (homes do).
pub fn client_config(
    roots: Arc<RootCertStore>,
    id: Option<&Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let cfg = match id {
        Some(id) => b.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A TLS server name from a configured name.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadName(name.to_owned()))
}

/// Whether a peer's (already CA-verified) leaf certificate is valid for the
/// DNS name it claims. This is how a home knows which home dialed it.
pub fn cert_is_for(leaf: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let Ok(sn) = ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&sn).is_ok()
}

/// A value that a reload may replace while readers keep using the old one
/// (TLS configs: live connections keep theirs, new ones get the new).
#[derive(Debug)]
pub struct Swap<T>(std::sync::RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(v: Arc<T>) -> Self {
        Swap(std::sync::RwLock::new(v))
    }

    pub fn load(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, v: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = v;
    }
}
