//! Certificates for a scenario run over TLS (`Options::tls`): a CA made for
//! the run and a certificate for each kvd, naming both hosts' addresses
//! (either side may dial or listen), as PEM files given to kvd through
//! [`crate::kvd::security`]'s environment variables.

use std::path::{Path, PathBuf};
use std::process::Command;

use lmig_net::topology::Topology;

use super::Error;
use crate::kvd::security::{TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV};

/// Make the CA and both kvds' certificates in `dir/tls`; the directory.
pub(super) fn certificates(dir: &Path) -> Result<PathBuf, Error> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(tls.join("ca.pem"), ca_cert.pem())?;
    for side in ["a", "b"] {
        let mut p =
            CertificateParams::new(vec![Topology::A_V4.to_string(), Topology::B_V4.to_string()])?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        std::fs::write(tls.join(format!("kvd-{side}.pem")), cert.pem())?;
        std::fs::write(tls.join(format!("kvd-{side}.key")), key.serialize_pem())?;
    }
    Ok(tls)
}

/// Have kvd `side` (`a` or `b`) migrate over TLS with its certificate in `tls`.
pub(super) fn use_certificates(cmd: &mut Command, tls: &Path, side: &str) {
    cmd.env(TLS_CERT_ENV, tls.join(format!("kvd-{side}.pem")))
        .env(TLS_KEY_ENV, tls.join(format!("kvd-{side}.key")))
        .env(TLS_CA_ENV, tls.join("ca.pem"));
}
