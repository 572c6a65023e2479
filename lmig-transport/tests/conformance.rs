//! lmig-transport's channels through the channel conformance kit: the
//! in-memory pair, Unix stream sockets and loopback TCP, each in every
//! security mode (the pre-shared-key default, TLS, and plaintext).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use lmig_core::conformance::channel;
use lmig_transport::{
    AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, TlsIdentity, connect, pair,
};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

const T: Duration = Duration::from_secs(20);
const LANES: usize = 3;

/// A CA and identities signed by it.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn identity(&self, names: &[&str]) -> TlsIdentity {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        TlsIdentity::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            self.cert.pem().as_bytes(),
        )
        .unwrap()
    }
}

#[derive(Copy, Clone, Debug)]
enum Mode {
    Psk,
    Tls,
    Plaintext,
}

/// The configs of the listening and the dialing side.
fn configs(mode: Mode, server_name: &str) -> (ChannelConfig, ChannelConfig) {
    let key = || AuthKey::new([7; 32]).unwrap();
    let (l, d) = match mode {
        Mode::Psk => (ChannelConfig::new(key()), ChannelConfig::new(key())),
        Mode::Plaintext => (
            ChannelConfig::plaintext_trusted_link_only(key()),
            ChannelConfig::plaintext_trusted_link_only(key()),
        ),
        Mode::Tls => {
            let ca = Ca::new();
            // The listener's identity also serves both ends of a memory pair.
            let named = |names: &[&str]| ca.identity(names).with_peer_name(server_name).unwrap();
            (
                ChannelConfig::tls(named(&[server_name])),
                ChannelConfig::tls(named(&["dialer.test"])),
            )
        }
    };
    (l.with_data_streams(LANES), d.with_data_streams(LANES))
}

fn dialed(endpoint: &Endpoint, mode: Mode, server_name: &str) -> (StreamChannel, StreamChannel) {
    let (l, d) = configs(mode, server_name);
    let listener = Listener::bind(endpoint, l).unwrap();
    let ep = listener.local_endpoint().clone();
    let dialer = thread::spawn(move || connect(&ep, d));
    let accepted = listener.accept_timeout(T).unwrap();
    (dialer.join().unwrap().unwrap(), accepted)
}

fn tcp(mode: Mode) -> (StreamChannel, StreamChannel) {
    dialed(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        mode,
        "127.0.0.1",
    )
}

fn unix(mode: Mode) -> (StreamChannel, StreamChannel) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "lmig-conformance-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let pair = dialed(&Endpoint::Unix(path.clone()), mode, "localhost");
    let _ = std::fs::remove_file(&path);
    pair
}

fn memory(mode: Mode) -> (StreamChannel, StreamChannel) {
    pair(configs(mode, "localhost").0).unwrap()
}

fn run(transport: &str, mode: Mode, make: fn(Mode) -> (StreamChannel, StreamChannel)) {
    channel::check(&format!("StreamChannel over {transport}, {mode:?}"), || {
        make(mode)
    })
    .unwrap();
}

#[test]
fn memory_pair_psk_conforms() {
    run("memory", Mode::Psk, memory);
}

#[test]
fn memory_pair_tls_conforms() {
    run("memory", Mode::Tls, memory);
}

#[test]
fn memory_pair_plaintext_conforms() {
    run("memory", Mode::Plaintext, memory);
}

#[test]
fn unix_psk_conforms() {
    run("Unix sockets", Mode::Psk, unix);
}

#[test]
fn unix_tls_conforms() {
    run("Unix sockets", Mode::Tls, unix);
}

#[test]
fn unix_plaintext_conforms() {
    run("Unix sockets", Mode::Plaintext, unix);
}

#[test]
fn tcp_psk_conforms() {
    run("loopback TCP", Mode::Psk, tcp);
}

#[test]
fn tcp_tls_conforms() {
    run("loopback TCP", Mode::Tls, tcp);
}

#[test]
fn tcp_plaintext_conforms() {
    run("loopback TCP", Mode::Plaintext, tcp);
}
