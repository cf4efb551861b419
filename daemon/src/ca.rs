//! The network CA: `popupd ca init` and `popupd ca issue NAME`.
//!
//! Every home and the global server carry a certificate issued by the
//! network's CA; links between servers are mutual TLS under it. The CA key
//! never leaves the directory it was made in.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// CA errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("{0} already exists; refusing to overwrite a CA (remove it first if you mean it)")]
    Exists(PathBuf),
    #[error("cannot read the CA key {path}: {source}; run `popupd ca init` first")]
    NoCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0:?} is not a DNS name for a server certificate")]
    BadName(String),
}

const CA_CN: &str = "popupd network CA";

fn ca_params() -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, 20);
    Ok(p)
}

fn validity(p: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let year = 1970 + (now / 31_556_952) as i32;
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// Paths of the CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// Makes a new CA in `dir`: `ca.crt` (give to every server and agent) and
/// `ca.key` (keep secret).
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), CaError> {
    let (crt, key) = ca_paths(dir);
    for p in [&crt, &key] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    let kp = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&kp)?;
    write(&crt, cert.pem().as_bytes(), 0o644)?;
    write(&key, kp.serialize_pem().as_bytes(), 0o600)?;
    Ok((crt, key))
}

/// Issues a server certificate for `name` (valid as TLS server and client)
/// signed by the CA in `ca_dir`; writes `NAME.crt` and `NAME.key` to `out`.
pub fn issue(ca_dir: &Path, name: &str, out: &Path) -> Result<(PathBuf, PathBuf), CaError> {
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(CaError::BadName(name.to_owned()));
    }
    let (_, ca_key_path) = ca_paths(ca_dir);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|source| CaError::NoCa {
        path: ca_key_path.clone(),
        source,
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    // The issuer is rebuilt from the same fixed name and the same key as the
    // self-signed CA certificate, so chains verify without parsing it back.
    let issuer = Issuer::new(ca_params()?, ca_key);

    let mut p = CertificateParams::new(vec![name.to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, 2);
    let kp = KeyPair::generate()?;
    let cert = p.signed_by(&kp, &issuer)?;
    let crt = out.join(format!("{name}.crt"));
    let key = out.join(format!("{name}.key"));
    write(&crt, cert.pem().as_bytes(), 0o644)?;
    write(&key, kp.serialize_pem().as_bytes(), 0o600)?;
    Ok((crt, key))
}

/// The revocation list of the CA in `dir`: one server name a line.
pub fn revoked_path(dir: &Path) -> PathBuf {
    dir.join("revoked")
}

/// Adds `name` to the revocation list of the CA in `dir`; returns the
/// list's path.
pub fn revoke(dir: &Path, name: &str) -> Result<PathBuf, CaError> {
    use std::io::Write;
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(CaError::BadName(name.to_owned()));
    }
    let path = revoked_path(dir);
    let known = read_revoked(&path).map_err(|source| CaError::Write {
        path: path.clone(),
        source,
    })?;
    if !known.contains(name) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                writeln!(f, "{name}")?;
                Ok(f)
            })
            .map_err(|source| CaError::Write {
                path: path.clone(),
                source,
            })?;
        let _ = f.flush();
    }
    Ok(path)
}

/// The names in a revocation list (none if the file does not exist).
/// Blank lines and `#` comments are skipped.
pub fn read_revoked(path: &Path) -> std::io::Result<std::collections::HashSet<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e),
    }
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use popupd_protocol::net::tls;

    #[test]
    fn issued_certificates_verify_under_their_ca_only() {
        let base = std::env::temp_dir().join(format!("popupd-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (a, b) = (base.join("a"), base.join("b"));
        init(&a).unwrap();
        init(&b).unwrap();
        assert!(matches!(init(&a), Err(CaError::Exists(_))));
        let (crt, _) = issue(&a, "home-a.test", &a).unwrap();
        let leaf = tls::load_certs(&crt).unwrap().remove(0);
        assert!(tls::cert_is_for(&leaf, "home-a.test"));
        assert!(!tls::cert_is_for(&leaf, "home-b.test"));

        let verify = |ca_dir: &Path| {
            let roots = tls::roots_from(&ca_dir.join("ca.crt")).unwrap();
            let v =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
                    .build()
                    .unwrap();
            v.verify_client_cert(&leaf, &[], rustls_pki_types::UnixTime::now())
                .is_ok()
        };
        assert!(verify(&a), "verifies under its own CA");
        assert!(!verify(&b), "refused under another CA");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
