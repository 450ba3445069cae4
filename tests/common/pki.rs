//! A test CA and the certificates it signs, as PEM files.

use std::path::{Path, PathBuf};

/// A test CA and what it signs.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
    /// The CA certificate as a PEM file: the `tls_roots`.
    pub file: PathBuf,
}

pub fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let file = dir.join(format!("{name}.pem"));
    std::fs::write(&file, cert.pem()).unwrap();
    Ca { cert, key, file }
}

/// A certificate for `host` signed by `ca`, written as PEM files (the key 0600).
pub fn issue(
    ca: &Ca,
    dir: &Path,
    host: &str,
) -> (PathBuf, PathBuf, rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap();
    let (c, k) = (
        dir.join(format!("{host}.pem")),
        dir.join(format!("{host}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    (c, k, cert, key)
}
