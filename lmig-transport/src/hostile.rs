//! Hostile connections to an lmig listener, one function per kind (feature
//! `test-util`, not stable API): for this crate's tests, the `hostile`
//! benchmark and the end-to-end tests of programs that listen
//! (`kvd --incoming`).
//!
//! Each function opens its own TCP connection to `target`, does its harm
//! and returns the connection (held open) so the caller can keep it and
//! read what the listener answered with [`answer`]. None of them waits for
//! the listener, except [`wrong_key`] (a whole dialer) and [`replay`]
//! (which first records a genuine handshake on a throwaway local listener).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crate::wire::{
    Frame, FrameDecoder, HEADER_LEN, Handshake, Hello, Kind, RejectReason, StreamRole,
    encode_handshake, encode_message,
};
use crate::{AuthKey, ChannelConfig, Endpoint, Listener, TransportError, connect};
use bytes::BytesMut;
use lmig_core::protocol::{Message, PROTOCOL_VERSION};

/// How long the helpers wait on a socket before giving up.
const WAIT: Duration = Duration::from_secs(10);

/// 4 KiB of pseudo-random bytes (no frame magic): the listener refuses them
/// as corrupt (`Reject(Unexpected)`, or a reset if it closes before reading
/// them all).
pub fn garbage(target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(target)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    s.write_all(&bytes)?;
    Ok(s)
}

/// A well-formed frame header (magic, version, kind `Hello`) claiming a
/// payload of 4 GiB - 1 bytes, and nothing after it: the listener must
/// refuse it from the header alone (`Reject(Unexpected)`), allocating nothing.
pub fn huge_header(target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(target)?;
    let mut h = [0u8; HEADER_LEN];
    let mut f = Frame::new_unchecked(&mut h[..]);
    f.set_magic();
    f.set_version(PROTOCOL_VERSION);
    f.set_kind(Kind::Hello);
    f.set_length(u32::MAX);
    s.write_all(&h)?;
    Ok(s)
}

/// A valid protocol message (`Ready`) before any handshake: refused
/// (`Reject(Unexpected)`), its bytes never decoded as a message.
pub fn message_before_auth(target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(target)?;
    let frames = encode_message(&Message::Ready).map_err(io::Error::other)?;
    s.write_all(&frames.to_vec())?;
    Ok(s)
}

/// A genuine dialer ([`connect`]) with a fresh random key. Returns the
/// dialer's error (a `Rejected { reason: AuthFailed }` from a listener that
/// does its job), or `None` if the listener accepted it.
pub fn wrong_key(target: SocketAddr) -> Option<TransportError> {
    let key = match AuthKey::generate() {
        Ok(k) => k,
        Err(e) => return Some(e),
    };
    let mut config = ChannelConfig::new(key);
    config.handshake_timeout = WAIT;
    connect(&Endpoint::Tcp(target), config).err()
}

/// Half of a valid `Hello` frame, then the writing side closed: the
/// listener sees the connection end mid-frame and closes it (no `Reject`:
/// the peer has gone).
pub fn truncated(target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(target)?;
    let frame = encode_handshake(&Handshake::Hello(Hello {
        session: [3; 16],
        role: StreamRole::Control,
        index: 0,
        data_streams: 1,
        generation: 0,
        nonce: [4; 32],
    }))
    .map_err(io::Error::other)?
    .to_vec();
    s.write_all(&frame[..frame.len() / 2])?;
    s.shutdown(Shutdown::Write)?;
    Ok(s)
}

/// A connection that sends nothing: the listener cuts it at its handshake
/// deadline (`Reject(Timeout)`) or sooner to make room (`Reject(Busy)`).
pub fn idle(target: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect(target)
}

/// `n` [`idle`] connections, all held open.
pub fn idle_many(target: SocketAddr, n: usize) -> io::Result<Vec<TcpStream>> {
    (0..n).map(|_| idle(target)).collect()
}

/// The bytes a genuine dialer with `key` sends on its first stream up to
/// and including its `Proof` (a `Hello` frame then a `Proof` frame),
/// recorded through a relaying proxy in front of a throwaway local
/// [`Listener`] with the same key (both on Unix sockets in the temporary
/// directory, removed afterwards).
pub fn record_handshake(key: &AuthKey) -> io::Result<Vec<u8>> {
    // On a Unix socket, so it works wherever it runs (a network namespace
    // without loopback included): the bytes do not depend on the transport.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let real = dir.join(format!("lmig-hostile-{pid}-{n}.sock"));
    let relay = dir.join(format!("lmig-hostile-{pid}-{n}-relay.sock"));
    let _ = std::fs::remove_file(&real);
    let _ = std::fs::remove_file(&relay);
    let mut config = ChannelConfig::new(key.clone());
    config.handshake_timeout = WAIT;
    let throwaway =
        Listener::bind(&Endpoint::Unix(real.clone()), config.clone()).map_err(io::Error::other)?;
    let proxy = UnixListener::bind(&relay)?;
    config.handshake_timeout = Duration::from_secs(2);
    let dial_to = Endpoint::Unix(relay.clone());
    let dialer = thread::Builder::new()
        .name("hostile-record".into())
        .spawn(move || {
            // Only its first stream gets through; the channel never forms.
            let _ = connect(&dial_to, config);
        })?;
    let recorded = relay_first_stream(&proxy, &real);
    drop(proxy);
    let _ = std::fs::remove_file(&relay);
    let _ = dialer.join();
    drop(throwaway);
    let _ = std::fs::remove_file(&real);
    recorded
}

/// Relay one connection from `proxy` to `real`, recording what the client
/// sends until it sent two frames.
fn relay_first_stream(proxy: &UnixListener, real: &Path) -> io::Result<Vec<u8>> {
    let (mut client, _) = proxy.accept()?;
    let mut server = UnixStream::connect(real)?;
    let (mut client_w, mut server_r) = (client.try_clone()?, server.try_clone()?);
    let back = thread::Builder::new()
        .name("hostile-relay".into())
        .spawn(move || {
            let _ = io::copy(&mut server_r, &mut client_w);
        })?;
    client.set_read_timeout(Some(WAIT))?;
    let mut rec = Vec::new();
    let mut buf = [0u8; 4096];
    let mut done = false;
    // A Hello and a Proof are 73 + 48 bytes; a few reads at most.
    for _ in 0..64 {
        let n = client.read(&mut buf)?;
        if n == 0 {
            break;
        }
        rec.extend_from_slice(&buf[..n]);
        server.write_all(&buf[..n])?;
        if frames(&rec).len() >= 2 {
            done = true;
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
    let _ = back.join();
    match frames(&rec)[..] {
        [Kind::Hello, Kind::Proof, ..] if done => Ok(rec),
        _ => Err(io::Error::other(
            "the dialer did not send a Hello and a Proof",
        )),
    }
}

/// The kinds of the whole frames at the start of `bytes`.
fn frames(bytes: &[u8]) -> Vec<Kind> {
    let mut b = BytesMut::from(bytes);
    let mut dec = FrameDecoder::new();
    let mut kinds = Vec::new();
    while let Ok(Some((repr, _))) = dec.decode(&mut b) {
        kinds.push(repr.kind);
    }
    kinds
}

/// A replayed handshake: a genuine dialer's `Hello` and `Proof` for `key`
/// ([`record_handshake`]) sent again to `target`. The listener answers the
/// `Hello` with a fresh `Challenge`, which the old `Proof` does not answer:
/// `Reject(AuthFailed)`.
pub fn replay(target: SocketAddr, key: &AuthKey) -> io::Result<TcpStream> {
    replay_recorded(target, &record_handshake(key)?)
}

/// [`replay`] of bytes [`record_handshake`] returned earlier (to replay one
/// recording many times).
pub fn replay_recorded(target: SocketAddr, recorded: &[u8]) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(target)?;
    s.write_all(recorded)?;
    Ok(s)
}

/// One connection of each hostile kind, held open (see [`every_kind`]).
#[derive(Debug)]
pub struct Strangers {
    /// [`garbage`], [`huge_header`], [`message_before_auth`], [`truncated`],
    /// [`replay`] and [`idle`], in that order.
    pub held: Vec<TcpStream>,
    /// What the [`wrong_key`] dialer got (`None`: it was accepted).
    pub wrong_key: Option<TransportError>,
}

/// One connection of each kind at `target`, for a listener whose
/// pre-shared key is `key` (needed for the replay): six of them are refused
/// at once (garbage, huge header, message before authentication, truncated,
/// replay, wrong key); the idle one at the listener's handshake deadline.
/// Drop the result to close them.
pub fn every_kind(target: SocketAddr, key: &[u8]) -> io::Result<Strangers> {
    let key = AuthKey::new(key).map_err(io::Error::other)?;
    let held = vec![
        garbage(target)?,
        huge_header(target)?,
        message_before_auth(target)?,
        truncated(target)?,
        replay(target, &key)?,
        idle(target)?,
    ];
    Ok(Strangers {
        held,
        wrong_key: wrong_key(target),
    })
}

/// What a hostile connection got back from the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// A `Reject` frame with its reason (after whatever came first, e.g. a
    /// `Challenge`).
    Reject(RejectReason),
    /// The connection ended (closed or reset) without a `Reject`.
    Closed,
    /// Nothing within the wait: the listener still holds the connection.
    Pending,
}

/// Read what the listener sent on `s` until it closes the connection (at
/// most `wait`, at most 64 KiB) and say how it ended.
pub fn answer(s: &mut TcpStream, wait: Duration) -> Answer {
    if s.set_read_timeout(Some(wait)).is_err() {
        return Answer::Closed;
    }
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let mut ended = false;
    for _ in 0..16 {
        match s.read(&mut buf) {
            Ok(0) => {
                ended = true;
                break;
            }
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    let mut b = BytesMut::from(&all[..]);
    let mut dec = FrameDecoder::new();
    while let Ok(Some((repr, payload))) = dec.decode(&mut b) {
        if repr.kind == Kind::Reject {
            if let Ok(Handshake::Reject(r)) = Handshake::parse(Kind::Reject, payload) {
                return Answer::Reject(r.reason);
            }
        }
    }
    if ended {
        Answer::Closed
    } else {
        Answer::Pending
    }
}
