//! Admission of every stream: mutual authentication with a pre-shared key,
//! the stream's identity, and (by default) its Noise key exchange.
//!
//! # Handshake
//!
//! Each stream of a channel (control, every data lane, urgent) is a separate
//! connection and is admitted on its own, before any other frame:
//!
//! ```text
//! dialer                                              listener
//!   Hello{session, role, index, data_streams,
//!         generation, nonce_d} ──────────────────────▶ checks the stream fits; nonce_d unseen
//!   ◀────────────────────────────────────────────── Challenge{nonce_l}
//!   Proof{HMAC(K, "dialer" ‖ T)}
//!   [KeyExchange{Noise -> psk, e}] ──────────────────▶ verify (constant time), then Noise
//!   ◀──────────────────── Accept{HMAC(K, "listener" ‖ T ‖ proof)}
//!                         [KeyExchange{Noise <- e, ee}]
//!   verify (constant time), then Noise
//!   ══ Psk mode: every later byte in Noise records (crate::noise) ══
//! ```
//!
//! `T` is the transcript: a domain label naming the security mode, the
//! protocol version, the whole `Hello` body (session id, role, lane index,
//! number of lanes, generation, `nonce_d`) and `nonce_l`. Both nonces are
//! 32 fresh random bytes from the OS, so:
//!
//! * **no replay**: a recorded `Proof` does not verify against a new
//!   `nonce_l`, a recorded `Accept` not against a new `nonce_d`; the listener
//!   also refuses a `nonce_d` it has already seen;
//! * **no splicing**: the tag covers the session id and the stream's role
//!   and index, so an authenticated stream cannot be presented as another
//!   lane or for another session or generation;
//! * **the failing peer gets nothing**: the dialer proves first, and the
//!   listener sends its own proof only after the dialer's verified. A
//!   dialer with the wrong key receives a random nonce and a `Reject`; a
//!   listener with the wrong key receives a tag over a nonce it chose,
//!   which a role label keeps from being reflected;
//! * **no mode confusion**: the label differs per [`crate::Security`] mode,
//!   so two sides configured differently fail the proof (`AuthFailed`)
//!   instead of one of them talking in clear.
//!
//! Any other frame before `Accept` (a protocol message, a handshake step out
//! of order) ends the connection with [`TransportError::Unauthenticated`] or
//! [`TransportError::Handshake`] on the side that sees it, and a `Reject`
//! frame gives the other side a clear [`TransportError::Rejected`].
//!
//! # Encryption
//!
//! The handshake itself only proves who connected. What protects the bytes
//! after it depends on [`crate::Security`]:
//!
//! * `Psk` (the default): the `KeyExchange` frames carry a Noise `NNpsk0`
//!   handshake keyed by the same pre-shared key, whose prologue is `T` and
//!   the dialer's proof; every later byte of the stream travels in
//!   AES-256-GCM records under its fresh keys ([`crate::noise`]). The
//!   listener reads the dialer's Noise message only after the proof
//!   verified and the stream was found to fit, so a stranger never gets
//!   that far.
//! * `Tls`: this whole handshake runs inside a TLS 1.3 connection with
//!   mutual certificates, keyed by 32 bytes of the TLS exporter in place of
//!   the pre-shared key (a channel binding: it proves both ends share that
//!   TLS session), so the identity checks above apply unchanged.
//! * `PlaintextTrustedLinkOnly`: as above without `KeyExchange`; frames then
//!   cross in clear, protected by CRC-32C against accidents only.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use lmig_core::protocol::PROTOCOL_VERSION;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{Result, TransportError};
use crate::noise::{self, StreamKeys};
use crate::wire::{
    Accept, Challenge, Handshake, Hello, KeyExchange, NONCE_LEN, Proof, Reject, RejectReason,
    TAG_LEN,
};

type HmacSha256 = Hmac<Sha256>;

/// Shortest pre-shared key accepted.
pub const MIN_KEY_LEN: usize = 16;

/// The pre-shared key both sides hold. Its `Debug` output never shows it.
#[derive(Clone)]
pub struct AuthKey(Arc<[u8]>);

impl AuthKey {
    /// A key from bytes; at least [`MIN_KEY_LEN`] of them (use 32 random bytes).
    pub fn new(key: impl AsRef<[u8]>) -> Result<Self> {
        let key = key.as_ref();
        if key.len() < MIN_KEY_LEN {
            return Err(TransportError::Config(format!(
                "pre-shared key of {} bytes; at least {MIN_KEY_LEN} required",
                key.len()
            )));
        }
        Ok(Self(key.into()))
    }

    /// A fresh random 32-byte key (to hand to both sides out of band).
    pub fn generate() -> Result<Self> {
        let mut k = [0u8; 32];
        fill_random(&mut k)?;
        Self::new(k)
    }

    /// The 32-byte Noise pre-shared key derived from this key
    /// (HMAC-SHA256 under a fixed label; Noise wants exactly 32 bytes).
    pub(crate) fn noise_psk(&self) -> [u8; 32] {
        tag(self, &[b"lmig noise psk v1"])
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        TransportError::io(
            "reading random bytes from the OS",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Fresh random nonce.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n)?;
    Ok(n)
}

/// What the admission handshake sets up besides authentication, per
/// [`crate::Security`] mode. Each has its own transcript label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyMode {
    /// Nothing: frames cross in clear afterwards.
    Plain,
    /// A Noise key exchange, pipelined with the proofs.
    Noise,
    /// Nothing more: the handshake runs inside TLS.
    Tls,
}

impl KeyMode {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Plain => b"lmig-auth-v1",
            Self::Noise => b"lmig-auth-v1/noise",
            Self::Tls => b"lmig-auth-v1/tls",
        }
    }
}

/// The transcript both tags cover.
fn transcript(mode: KeyMode, hello: &Hello, nonce_l: &[u8; NONCE_LEN]) -> Vec<u8> {
    let body = Handshake::Hello(hello.clone()).emit();
    let label = mode.label();
    let mut t = Vec::with_capacity(label.len() + 2 + body.len() + NONCE_LEN);
    t.extend_from_slice(label);
    t.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    t.extend_from_slice(&body);
    t.extend_from_slice(nonce_l);
    t
}

fn tag(key: &AuthKey, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut m = key.mac();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn verify(expected: &[u8; TAG_LEN], got: &[u8; TAG_LEN]) -> bool {
    bool::from(expected.ct_eq(got))
}

/// The Noise prologue: the transcript and the dialer's proof.
fn prologue(t: &[u8], proof: &[u8]) -> Vec<u8> {
    [b"lmig-noise-v1".as_slice(), t, proof].concat()
}

/// The result of a successful handshake.
pub(crate) struct Authenticated {
    /// The dialer's hello (session, role, lane, generation).
    pub(crate) hello: Hello,
    /// The stream's Noise keys ([`KeyMode::Noise`] only).
    pub(crate) keys: Option<StreamKeys>,
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("hello", &self.hello)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

/// One side's view of a handshake in progress: what to send, what came.
pub(crate) trait HandshakeIo {
    fn send(&mut self, hs: &Handshake) -> Result<()>;
    /// The next handshake message; a protocol message is an error.
    fn recv(&mut self) -> Result<Handshake>;
}

/// A `Reject` from the peer ends the handshake with its reason.
fn not_rejected(got: Handshake) -> Result<Handshake> {
    match got {
        Handshake::Reject(r) => Err(TransportError::Rejected { reason: r.reason }),
        other => Ok(other),
    }
}

fn refuse(io: &mut dyn HandshakeIo, reason: RejectReason) {
    if let Err(e) = io.send(&Handshake::Reject(Reject { reason })) {
        debug!(error = %e, "telling the peer why it was refused did not work");
    }
}

/// Run the dialer's side on a fresh connection.
pub(crate) fn dial(
    io: &mut dyn HandshakeIo,
    key: &AuthKey,
    mode: KeyMode,
    hello: Hello,
) -> Result<Authenticated> {
    io.send(&Handshake::Hello(hello.clone()))?;
    let nonce_l = match not_rejected(io.recv()?)? {
        Handshake::Challenge(c) => c.nonce,
        other => return Err(unexpected(io, &other, "Challenge")),
    };
    if nonce_l == hello.nonce {
        refuse(io, RejectReason::AuthFailed);
        return Err(TransportError::AuthFailed {
            detail: "the listener reflected our nonce",
        });
    }
    let t = transcript(mode, &hello, &nonce_l);
    let proof = tag(key, &[b"dialer", &t]);
    io.send(&Handshake::Proof(Proof { tag: proof }))?;
    let (initiator, sent) = match mode {
        KeyMode::Noise => {
            let (init, first) = noise::Initiator::start(&key.noise_psk(), &prologue(&t, &proof))?;
            let sent = io.send(&Handshake::KeyExchange(KeyExchange {
                message: first.into(),
            }));
            (Some(init), sent)
        }
        KeyMode::Plain | KeyMode::Tls => (None, Ok(())),
    };
    // A listener that refused the proof may have closed before our Noise
    // message arrived: its Reject says more than the failed send.
    let accept = match not_rejected(io.recv()?)? {
        Handshake::Accept(a) => {
            sent?;
            a.tag
        }
        other => return Err(unexpected(io, &other, "Accept")),
    };
    let expected = tag(key, &[b"listener", &t, &proof]);
    if !verify(&expected, &accept) {
        refuse(io, RejectReason::AuthFailed);
        return Err(TransportError::AuthFailed {
            detail: "the listener's proof does not verify (wrong key, replayed handshake or another security mode)",
        });
    }
    let keys = match initiator {
        Some(init) => {
            let answer = match not_rejected(io.recv()?)? {
                Handshake::KeyExchange(k) => k.message,
                other => return Err(unexpected(io, &other, "KeyExchange")),
            };
            match init.finish(&answer) {
                Ok(keys) => Some(keys),
                Err(e) => {
                    refuse(io, RejectReason::AuthFailed);
                    return Err(e);
                }
            }
        }
        None => None,
    };
    Ok(Authenticated { hello, keys })
}

fn unexpected(io: &mut dyn HandshakeIo, got: &Handshake, want: &'static str) -> TransportError {
    if let Err(e) = io.send(&Handshake::Reject(Reject {
        reason: RejectReason::Unexpected,
    })) {
        debug!(error = %e, "telling the peer why the handshake failed did not work");
    }
    TransportError::Handshake {
        detail: format!("expected {want}, got {}", got.kind().name()),
    }
}

/// Run the listener's side on a freshly accepted connection. `check` says
/// whether the announced stream fits (session, role, lane, generation);
/// `replay` remembers the dialer nonces already seen.
pub(crate) fn accept(
    io: &mut dyn HandshakeIo,
    key: &AuthKey,
    mode: KeyMode,
    replay: &std::sync::Mutex<ReplayCache>,
    check: &dyn Fn(&Hello) -> Result<()>,
) -> Result<Authenticated> {
    let hello = match not_rejected(io.recv()?)? {
        Handshake::Hello(h) => h,
        other => return Err(unexpected(io, &other, "Hello")),
    };
    let fresh = replay
        .lock()
        .map(|mut r| r.insert(hello.nonce))
        .unwrap_or(false);
    // Answer a replayed hello like any other and fail it at the proof, so
    // the peer learns nothing from the timing of the refusal.
    let nonce_l = nonce()?;
    io.send(&Handshake::Challenge(Challenge { nonce: nonce_l }))?;
    let proof = match not_rejected(io.recv()?)? {
        Handshake::Proof(p) => p.tag,
        other => return Err(unexpected(io, &other, "Proof")),
    };
    let t = transcript(mode, &hello, &nonce_l);
    let expected = tag(key, &[b"dialer", &t]);
    if !verify(&expected, &proof) || !fresh {
        refuse(io, RejectReason::AuthFailed);
        return Err(TransportError::AuthFailed {
            detail: if fresh {
                "the dialer's proof does not verify (wrong key, replayed handshake or another security mode)"
            } else {
                "the dialer's nonce was seen before (replayed handshake)"
            },
        });
    }
    if let Err(e) = check(&hello) {
        refuse(io, RejectReason::BadStream);
        return Err(e);
    }
    // Only a keyholder gets here: its Noise message is read now.
    let keyed = match mode {
        KeyMode::Noise => {
            let first = match not_rejected(io.recv()?)? {
                Handshake::KeyExchange(k) => k.message,
                other => return Err(unexpected(io, &other, "KeyExchange")),
            };
            match noise::respond(&key.noise_psk(), &prologue(&t, &proof), &first) {
                Ok(keyed) => Some(keyed),
                Err(e) => {
                    refuse(io, RejectReason::AuthFailed);
                    return Err(e);
                }
            }
        }
        KeyMode::Plain | KeyMode::Tls => None,
    };
    let accept = tag(key, &[b"listener", &t, &proof]);
    io.send(&Handshake::Accept(Accept { tag: accept }))?;
    let keys = match keyed {
        Some((answer, keys)) => {
            io.send(&Handshake::KeyExchange(KeyExchange {
                message: answer.into(),
            }))?;
            Some(keys)
        }
        None => None,
    };
    Ok(Authenticated { hello, keys })
}

/// The dialer nonces a listener has seen (the most recent 65 536).
#[derive(Debug, Default)]
pub(crate) struct ReplayCache {
    seen: HashSet<[u8; NONCE_LEN]>,
    order: VecDeque<[u8; NONCE_LEN]>,
}

impl ReplayCache {
    const CAP: usize = 65_536;

    /// Remember `nonce`; false if it was already there.
    pub(crate) fn insert(&mut self, nonce: [u8; NONCE_LEN]) -> bool {
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back(nonce);
        if self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, Sender, channel};

    use super::*;
    use crate::wire::StreamRole;

    struct Pipe {
        tx: Sender<Handshake>,
        rx: Receiver<Handshake>,
    }

    impl HandshakeIo for Pipe {
        fn send(&mut self, hs: &Handshake) -> Result<()> {
            self.tx
                .send(hs.clone())
                .map_err(|_| TransportError::Closed { during: "test" })
        }
        fn recv(&mut self) -> Result<Handshake> {
            self.rx
                .recv()
                .map_err(|_| TransportError::Closed { during: "test" })
        }
    }

    fn pipes() -> (Pipe, Pipe) {
        let (a_tx, b_rx) = channel();
        let (b_tx, a_rx) = channel();
        (Pipe { tx: a_tx, rx: a_rx }, Pipe { tx: b_tx, rx: b_rx })
    }

    fn hello() -> Hello {
        Hello {
            session: [1; 16],
            role: StreamRole::Control,
            index: 0,
            data_streams: 1,
            generation: 0,
            nonce: nonce().unwrap(),
        }
    }

    fn run_modes(
        dial_key: &AuthKey,
        dial_mode: KeyMode,
        accept_key: &AuthKey,
        accept_mode: KeyMode,
    ) -> (Result<Authenticated>, Result<Authenticated>) {
        let (mut d, mut l) = pipes();
        let accept_key = accept_key.clone();
        let t = std::thread::spawn(move || {
            let cache = Mutex::new(ReplayCache::default());
            let r = accept(&mut l, &accept_key, accept_mode, &cache, &|_| Ok(()));
            drop(l);
            r
        });
        let r = dial(&mut d, dial_key, dial_mode, hello());
        drop(d);
        (r, t.join().unwrap())
    }

    fn run(
        dial_key: &AuthKey,
        accept_key: &AuthKey,
    ) -> (Result<Authenticated>, Result<Authenticated>) {
        run_modes(dial_key, KeyMode::Noise, accept_key, KeyMode::Noise)
    }

    #[test]
    fn same_key_agrees_on_noise_keys() {
        use std::io::{Read, Write};
        let k = AuthKey::new([7u8; 32]).unwrap();
        let (d, l) = run(&k, &k);
        let (d, l) = (d.unwrap(), l.unwrap());
        let (_, mut w) = d.keys.unwrap().split(std::io::empty(), Vec::new());
        w.write_all(b"sealed by the dialer").unwrap();
        let wire = w.get_ref().clone();
        let (mut r, _) = l.keys.unwrap().split(&wire[..], std::io::sink());
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "sealed by the dialer");
        assert_eq!(format!("{k:?}"), "AuthKey(<redacted>)");
    }

    #[test]
    fn plain_mode_has_no_keys() {
        let k = AuthKey::new([7u8; 32]).unwrap();
        let (d, l) = run_modes(&k, KeyMode::Plain, &k, KeyMode::Plain);
        assert!(d.unwrap().keys.is_none());
        assert!(l.unwrap().keys.is_none());
    }

    #[test]
    fn different_modes_fail_at_the_proof() {
        let k = AuthKey::new([7u8; 32]).unwrap();
        let (d, l) = run_modes(&k, KeyMode::Plain, &k, KeyMode::Noise);
        assert!(matches!(d, Err(TransportError::Rejected { .. })), "{d:?}");
        assert!(matches!(l, Err(TransportError::AuthFailed { .. })), "{l:?}");
    }

    #[test]
    fn wrong_key_fails_both_sides() {
        let (d, l) = run(
            &AuthKey::new([1u8; 32]).unwrap(),
            &AuthKey::new([2u8; 32]).unwrap(),
        );
        assert!(
            matches!(
                d,
                Err(TransportError::Rejected {
                    reason: RejectReason::AuthFailed
                })
            ),
            "{d:?}"
        );
        assert!(matches!(l, Err(TransportError::AuthFailed { .. })), "{l:?}");
    }

    #[test]
    fn short_key_refused() {
        assert!(AuthKey::new([0u8; 15]).is_err());
    }

    #[test]
    fn replay_cache_is_bounded() {
        let mut c = ReplayCache::default();
        assert!(c.insert([1; 32]));
        assert!(!c.insert([1; 32]));
        for i in 0..ReplayCache::CAP as u32 + 1 {
            let mut n = [0u8; 32];
            n[..4].copy_from_slice(&i.to_le_bytes());
            n[31] = 9;
            c.insert(n);
        }
        assert_eq!(c.order.len(), ReplayCache::CAP);
        assert!(c.insert([1; 32]), "oldest evicted");
    }
}
