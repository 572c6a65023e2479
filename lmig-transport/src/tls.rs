//! TLS 1.3 with mutual certificates ([`crate::Security::Tls`]), by rustls
//! with its `ring` provider.
//!
//! Both sides present a certificate chain and verify the other's against
//! the CA certificates they were told to trust; the dialer also checks that
//! the listener's certificate names the address it dialed (or the name
//! given with [`TlsIdentity::with_peer_name`]). Only TLS 1.3 is offered.
//! The admission handshake ([`crate::auth`]) then runs inside the TLS
//! connection, keyed by the TLS exporter, so a stream's identity (session,
//! role, lane, generation) is checked as in the other modes.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use crate::error::{Result, TransportError};

/// Exporter label of the key the admission handshake uses inside TLS.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-lmig-admission-v1";

/// This side's certificate chain and key, and the CA certificates it
/// trusts for the peer's; both ends of a channel need one.
///
/// Cheap to clone. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct TlsIdentity {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    peer_name: Option<ServerName<'static>>,
}

fn config_err(what: &str, e: impl fmt::Display) -> TransportError {
    TransportError::Config(format!("TLS {what}: {e}"))
}

/// rustls' `ring` provider. rustls deprecates it in favour of aws-lc-rs,
/// for post-quantum key exchange; aws-lc-rs needs cmake and a C toolchain
/// setup our machines do not have, and ring builds with gcc alone.
///
/// Its TLS 1.3 suites, AES-128-GCM first: both standard, both with a
/// 128-bit tag, and AES-128 does 10 rounds per block where AES-256 does 14,
/// so pages cross about 15% cheaper (the cipher is most of an encrypted
/// stream's cost). AES-256-GCM and ChaCha20-Poly1305 stay offered, for a
/// peer that prefers them. The dialer's order decides.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl TlsIdentity {
    /// From DER: `chain` is this side's certificate first, then any
    /// intermediates; `key` its private key (PKCS#8, PKCS#1 or SEC1);
    /// `trusted` the CA certificates the peer's chain must lead to.
    pub fn from_der(chain: Vec<Vec<u8>>, key: Vec<u8>, trusted: Vec<Vec<u8>>) -> Result<Self> {
        let chain: Vec<CertificateDer<'static>> =
            chain.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::try_from(key).map_err(|e| config_err("private key", e))?;
        let trusted: Vec<CertificateDer<'static>> =
            trusted.into_iter().map(CertificateDer::from).collect();
        Self::build(chain, key, trusted)
    }

    /// From PEM text: the chain (`CERTIFICATE` blocks, this side's first),
    /// the private key (one `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE
    /// KEY` block) and the trusted CA certificates.
    pub fn from_pem(chain: &[u8], key: &[u8], trusted: &[u8]) -> Result<Self> {
        let certs = |pem: &[u8], what: &str| {
            CertificateDer::pem_slice_iter(pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| config_err(what, e))
        };
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| config_err("private key", e))?;
        Self::build(
            certs(chain, "certificate chain")?,
            key,
            certs(trusted, "trusted certificates")?,
        )
    }

    /// [`TlsIdentity::from_pem`] from three files.
    pub fn from_pem_files(
        chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
        trusted: impl AsRef<Path>,
    ) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TransportError::io(format!("reading {}", p.display()), e))
        };
        Self::from_pem(
            &read(chain.as_ref())?,
            &read(key.as_ref())?,
            &read(trusted.as_ref())?,
        )
    }

    /// The name (DNS name or IP address) the listener's certificate must
    /// carry. Without it the dialer expects the IP address it dialed, which
    /// a Unix or in-memory channel does not have.
    pub fn with_peer_name(mut self, name: &str) -> Result<Self> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| config_err(&format!("peer name {name:?}"), e))?;
        self.peer_name = Some(name);
        Ok(self)
    }

    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trusted: Vec<CertificateDer<'static>>,
    ) -> Result<Self> {
        if chain.is_empty() {
            return Err(config_err("certificate chain", "no certificate"));
        }
        let mut roots = RootCertStore::empty();
        for c in trusted {
            roots
                .add(c)
                .map_err(|e| config_err("trusted certificate", e))?;
        }
        if roots.is_empty() {
            return Err(config_err("trusted certificates", "none given"));
        }
        let roots = Arc::new(roots);
        let versions = &[&rustls::version::TLS13];
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| config_err("client verifier", e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| config_err("server", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| config_err("certificate and key", e))?;
        // One connection per stream, never resumed.
        server.send_tls13_tickets = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| config_err("client", e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| config_err("certificate and key", e))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
            peer_name: None,
        })
    }

    /// A client connection to a peer at `ip` (or the configured name).
    pub(crate) fn client(&self, ip: Option<IpAddr>) -> Result<rustls::ClientConnection> {
        let name = match (&self.peer_name, ip) {
            (Some(n), _) => n.clone(),
            (None, Some(ip)) => ServerName::IpAddress(ip.into()),
            (None, None) => {
                return Err(TransportError::Config(
                    "TLS over a connection without an IP address needs TlsIdentity::with_peer_name"
                        .into(),
                ));
            }
        };
        rustls::ClientConnection::new(self.client.clone(), name).map_err(|e| TransportError::Tls {
            detail: e.to_string(),
        })
    }

    /// A server connection.
    pub(crate) fn server(&self) -> Result<rustls::ServerConnection> {
        rustls::ServerConnection::new(self.server.clone()).map_err(|e| TransportError::Tls {
            detail: e.to_string(),
        })
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("peer_name", &self.peer_name)
            .finish_non_exhaustive()
    }
}

/// A TLS failure (other than a record that does not authenticate) as the
/// `io::Error` source a TLS half returns; the connection layer names it in
/// its errors. Here, below both, so that neither imports the other.
#[derive(Debug)]
pub(crate) struct TlsFailure(pub(crate) String);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}
