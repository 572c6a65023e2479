//! How kvd protects its migrations: the channel configuration both sides
//! build, from the environment.
//!
//! * By default the pre-shared key (`LMIG_KEY`) keys Noise on every stream
//!   ([`lmig_transport::Security::Psk`]).
//! * With [`TLS_CERT_ENV`], [`TLS_KEY_ENV`] and [`TLS_CA_ENV`] set (paths of
//!   PEM files: this side's certificate chain, its private key, the CA
//!   certificates the peer's chain must lead to), every stream is TLS 1.3
//!   with certificates verified both ways ([`lmig_transport::Security::Tls`]);
//!   the destination's certificate must name the address the source dials.
//!   Setting only some of the three is an error.
//! * With [`PLAINTEXT_ENV`] set to `1`, the key admits each stream and the
//!   frames then cross in clear
//!   ([`lmig_transport::Security::PlaintextTrustedLinkOnly`]): only for a
//!   private, trusted link, and for measuring what encryption costs.
//!
//! The cipher the last migration's channel used ([`record_cipher`],
//! [`last_cipher`]) goes into the source's answer (`cipher`).

use std::sync::Mutex;

use lmig_transport::{AuthKey, ChannelConfig, TlsIdentity, TransportError};

/// Path of this side's certificate chain (PEM).
pub const TLS_CERT_ENV: &str = "LMIG_TLS_CERT";
/// Path of this side's private key (PEM).
pub const TLS_KEY_ENV: &str = "LMIG_TLS_KEY";
/// Path of the CA certificates trusted for the peer's chain (PEM).
pub const TLS_CA_ENV: &str = "LMIG_TLS_CA";

/// Set to `1`: frames after the admission cross in clear (a trusted link
/// only). Refused together with certificates.
pub const PLAINTEXT_ENV: &str = "LMIG_PLAINTEXT_TRUSTED_LINK_ONLY";

/// The TLS identity the environment names, if it names one.
fn tls_from_env() -> Result<Option<TlsIdentity>, TransportError> {
    let vars = [TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV].map(std::env::var_os);
    match vars {
        [None, None, None] => Ok(None),
        [Some(cert), Some(key), Some(ca)] => TlsIdentity::from_pem_files(cert, key, ca).map(Some),
        _ => Err(TransportError::Config(format!(
            "TLS needs all of {TLS_CERT_ENV}, {TLS_KEY_ENV} and {TLS_CA_ENV}"
        ))),
    }
}

/// The channel configuration for a migration: TLS if the environment
/// names certificates, else Noise keyed by `key`.
pub fn channel_config(key: &[u8]) -> Result<ChannelConfig, TransportError> {
    let plaintext = std::env::var_os(PLAINTEXT_ENV).is_some_and(|v| v == "1");
    Ok(match (tls_from_env()?, plaintext) {
        (Some(_), true) => {
            return Err(TransportError::Config(format!(
                "{PLAINTEXT_ENV}=1 and TLS certificates exclude each other"
            )));
        }
        (Some(id), false) => ChannelConfig::tls(id),
        (None, true) => ChannelConfig::plaintext_trusted_link_only(AuthKey::new(key)?),
        (None, false) => ChannelConfig::new(AuthKey::new(key)?),
    })
}

static LAST_CIPHER: Mutex<String> = Mutex::new(String::new());

/// Remember what protected the channel just opened.
pub fn record_cipher(cipher: &str) {
    let mut last = LAST_CIPHER.lock().unwrap_or_else(|p| p.into_inner());
    *last = cipher.to_string();
}

/// What protected the last channel opened (empty before any).
pub fn last_cipher() -> String {
    LAST_CIPHER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}
