//! What protects a stream after its handshake ([`Security`]), and the
//! connection halves that carry its bytes through Noise records or TLS.
//!
//! A stream is opened in three steps, on both sides:
//!
//! 1. [`open`]: in TLS mode the TLS 1.3 handshake on the raw connection
//!    (both certificates verified); nothing in the other modes.
//! 2. The admission handshake ([`crate::auth`]) on what `open` returned,
//!    with the key and [`KeyMode`] it chose; in PSK mode it also runs the
//!    Noise handshake.
//! 3. [`seal`]: in PSK mode the halves are wrapped in the Noise record layer
//!    ([`crate::noise`]) with the keys the admission agreed.
//!
//! The halves implement [`Conn`] like a socket, so framing, reader threads,
//! buffered data lanes and the urgent stream's direct reads run unchanged
//! over them. Their `try_clone_conn` gives a [`ControlHandle`]: it closes the
//! connection and sets its timeouts but carries no bytes (bytes must go
//! through the cipher, in order, on the one reading and one writing half).

use std::io::{self, IoSlice, Read, Write};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::conn::{Conn, FrameReader};
use crate::auth::{AuthKey, KeyMode};
use crate::error::{Result, TransportError};
use crate::noise::{IntegrityError, NOISE_PROTOCOL, RecordReader, RecordWriter, StreamKeys};
use crate::tls::{EXPORTER_LABEL, TlsFailure, TlsIdentity};

/// How every stream of a channel is protected after it is admitted. Both
/// sides must use the same mode (and key, or trusted CA); a mismatch fails
/// the handshake.
///
/// | mode | proves who connected | on-path attacker reads | on-path attacker changes |
/// |---|---|---|---|
/// | `Psk` (default) | pre-shared key | nothing | nothing: the stream fails |
/// | `Tls` | certificates, both ways | nothing | nothing: the stream fails |
/// | `PlaintextTrustedLinkOnly` | pre-shared key | everything | everything after the handshake |
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Security {
    /// The default: the pre-shared key admits each stream (HMAC-SHA256
    /// challenge-response, [`crate::auth`]) and keys a
    /// `Noise_NNpsk0_25519_AESGCM_SHA256` session per stream, bound to the
    /// stream's identity; every later byte is encrypted and authenticated
    /// ([`crate::noise`]).
    Psk(AuthKey),
    /// TLS 1.3 (rustls) with certificates verified on both sides, the
    /// admission handshake inside it. The dialer offers
    /// `TLS13_AES_128_GCM_SHA256` first (then AES-256-GCM and
    /// ChaCha20-Poly1305): a standard suite, about 15% cheaper per byte
    /// than AES-256-GCM ([`crate::tls`]).
    Tls(TlsIdentity),
    /// The pre-shared key admits each stream as in `Psk`, then frames cross
    /// **in clear**: anyone on the path reads pages, sockets and program
    /// state and can change them. Only for a link that is itself private
    /// and trusted (a tunnel, a back-to-back cable).
    PlaintextTrustedLinkOnly(AuthKey),
}

impl Security {
    /// What protects the bytes, for reports: the Noise protocol name, the
    /// TLS version and suite negotiated, or `"none"`.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Psk(_) => NOISE_PROTOCOL,
            Self::Tls(_) => "TLS 1.3",
            Self::PlaintextTrustedLinkOnly(_) => "none",
        }
    }

    /// Every byte after the handshake is authenticated by the record
    /// layer (Noise or TLS), so protocol frames carry checksum 0 instead of
    /// their CRC-32C and the receiver does not check it (the wire format,
    /// [`crate::wire`]).
    pub(super) fn seals(&self) -> bool {
        matches!(self, Self::Psk(_) | Self::Tls(_))
    }
}

/// A stream after step 1: its halves, and how to admit it.
pub(super) struct Opened {
    pub(super) reader: Box<dyn Conn>,
    pub(super) writer: Box<dyn Conn>,
    pub(super) key: AuthKey,
    pub(super) mode: KeyMode,
    /// What protects the bytes ([`Security::name`], with the TLS suite).
    pub(super) cipher: String,
}

/// Step 1 on a dialed (`client`) or accepted connection. Timeouts must be
/// set on `conn` already.
pub(super) fn open(conn: Box<dyn Conn>, security: &Security, client: bool) -> Result<Opened> {
    let io_err = |e| TransportError::io("preparing a stream", e);
    match security {
        Security::Psk(key) | Security::PlaintextTrustedLinkOnly(key) => Ok(Opened {
            writer: conn.try_clone_conn().map_err(io_err)?,
            reader: conn,
            key: key.clone(),
            mode: if matches!(security, Security::Psk(_)) {
                KeyMode::Noise
            } else {
                KeyMode::Plain
            },
            cipher: security.name().into(),
        }),
        Security::Tls(id) => {
            let tls: rustls::Connection = if client {
                id.client(conn.peer_ip())?.into()
            } else {
                id.server()?.into()
            };
            tls_handshake(conn, tls)
        }
    }
}

/// Step 3: wrap the halves in Noise records when the admission agreed keys.
/// On a sealed stream (Noise or TLS) the reader no longer checks protocol
/// frames' CRC-32C, which the writer leaves 0 ([`Security::seals`]).
pub(super) fn seal(
    mut reader: FrameReader,
    writer: Box<dyn Conn>,
    keys: Option<StreamKeys>,
    mode: KeyMode,
) -> (FrameReader, Box<dyn Conn>) {
    match keys {
        None => {
            if mode == KeyMode::Tls {
                reader.set_sealed();
            }
            (reader, writer)
        }
        Some(keys) => {
            let (r, w) = keys.split(reader.into_conn(), writer);
            let mut reader = FrameReader::new(Box::new(SealedReader(r)));
            reader.set_authenticated();
            reader.set_sealed();
            (reader, Box::new(SealedWriter(w)))
        }
    }
}

fn not_for_data() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this handle of an encrypted stream carries no data",
    )
}

/// A handle on a protected connection: closes it and sets its timeouts,
/// carries no bytes.
struct ControlHandle(Box<dyn Conn>);

impl Read for ControlHandle {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(not_for_data())
    }
}

impl Write for ControlHandle {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(not_for_data())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `Conn` methods every protected half passes to its raw connection
/// (`self.raw()`).
macro_rules! delegate_control {
    () => {
        fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
            Ok(Box::new(ControlHandle(self.raw().try_clone_conn()?)))
        }
        fn shutdown_conn(&self) {
            self.raw().shutdown_conn()
        }
        fn shutdown_read(&self) {
            self.raw().shutdown_read()
        }
        fn peer_name(&self) -> String {
            self.raw().peer_name()
        }
        fn peer_ip(&self) -> Option<IpAddr> {
            self.raw().peer_ip()
        }
        fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
            self.raw().set_timeouts(read, write)
        }
        fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
            self.raw().raw_fd()
        }
    };
}

impl ControlHandle {
    fn raw(&self) -> &dyn Conn {
        &*self.0
    }
}

impl Conn for ControlHandle {
    delegate_control!();
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        self.0.wait_readable(timeout)
    }
}

/// The reading half of a Noise-protected stream.
struct SealedReader(RecordReader<Box<dyn Conn>>);

impl Read for SealedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for SealedReader {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(not_for_data())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SealedReader {
    fn raw(&self) -> &dyn Conn {
        &**self.0.get_ref()
    }
}

impl Conn for SealedReader {
    delegate_control!();
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        if self.0.has_buffered() {
            return Ok(true);
        }
        self.0.get_ref().wait_readable(timeout)
    }
    fn holds_partial_input(&self) -> bool {
        self.0.holds_partial()
    }
}

/// The writing half of a Noise-protected stream.
struct SealedWriter(RecordWriter<Box<dyn Conn>>);

impl Read for SealedWriter {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(not_for_data())
    }
}

impl Write for SealedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl SealedWriter {
    fn raw(&self) -> &dyn Conn {
        &**self.0.get_ref()
    }
}

impl Conn for SealedWriter {
    delegate_control!();
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        self.0.get_ref().wait_readable(timeout)
    }
}

// ---------------------------------------------------------------- TLS

/// Plaintext rustls may hold for sending before a write returns short.
const TLS_SEND_BUFFER: usize = 256 << 10;
/// Plaintext the writing half gives rustls at once (4 records); their
/// ciphertext is gathered and sent per [`TLS_SEND_BUFFER`].
/// rustls seals each record into a fresh allocation; when 16 of them
/// (256 KiB) were freed at once, the allocator gave the memory back to the
/// kernel and faulted it in again for the next write: 7% of a 2-stream
/// transfer's CPU went to page faults. 64 KiB at a time stays below the
/// allocator's trim threshold.
const TLS_WRITE_PIECE: usize = 64 << 10;
/// Ciphertext the reading half takes from the socket at once.
const TLS_READ_BUFFER: usize = 64 << 10;

fn tls_io_error(e: rustls::Error) -> io::Error {
    match e {
        rustls::Error::DecryptError => io::Error::new(
            io::ErrorKind::InvalidData,
            IntegrityError("a TLS record does not authenticate (changed on the path)".into()),
        ),
        e => io::Error::new(io::ErrorKind::InvalidData, TlsFailure(e.to_string())),
    }
}

/// The TLS state both halves share, and the ordered writing handle.
struct TlsShared {
    tls: Mutex<rustls::Connection>,
    /// Records leave in the order they were made: whoever takes them from
    /// `tls` holds this lock until they are written.
    tx: Mutex<Box<dyn Conn>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsShared {
    /// Send whatever rustls has queued (alerts, key updates).
    fn flush_queued(&self) -> io::Result<()> {
        let mut tx = lock(&self.tx);
        let mut out = Vec::new();
        {
            let mut tls = lock(&self.tls);
            while tls.wants_write() {
                tls.write_tls(&mut out)?;
            }
        }
        tx.write_all(&out)
    }
}

/// Run the TLS handshake on `conn`, then split it.
fn tls_handshake(mut conn: Box<dyn Conn>, mut tls: rustls::Connection) -> Result<Opened> {
    let failed = |e: io::Error| match e.get_ref().and_then(|s| s.downcast_ref::<rustls::Error>()) {
        Some(t) => TransportError::Tls {
            detail: t.to_string(),
        },
        None => match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
                waiting_for: "the peer's next TLS handshake step",
                after: Duration::ZERO,
            },
            io::ErrorKind::UnexpectedEof => TransportError::Closed {
                during: "during the TLS handshake",
            },
            _ => TransportError::io("during the TLS handshake", e),
        },
    };
    while tls.is_handshaking() {
        match tls.complete_io(&mut conn) {
            Ok((0, 0)) if tls.is_handshaking() => {
                return Err(TransportError::Closed {
                    during: "during the TLS handshake",
                });
            }
            Ok(_) => {}
            Err(e) => return Err(failed(e)),
        }
    }
    let mut exported = [0u8; 32];
    tls.export_keying_material(&mut exported, EXPORTER_LABEL, None)
        .map_err(|e| TransportError::Tls {
            detail: e.to_string(),
        })?;
    let key = AuthKey::new(exported)?;
    let cipher = tls
        .negotiated_cipher_suite()
        .map_or_else(|| "TLS 1.3".into(), |s| format!("TLS 1.3 {:?}", s.suite()));
    tls.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let io_err = |e| TransportError::io("preparing a stream", e);
    let tx = conn.try_clone_conn().map_err(io_err)?;
    let control = conn.try_clone_conn().map_err(io_err)?;
    let shared = Arc::new(TlsShared {
        tls: Mutex::new(tls),
        tx: Mutex::new(tx),
    });
    Ok(Opened {
        reader: Box::new(TlsReader {
            shared: shared.clone(),
            raw: conn,
            input: vec![0u8; TLS_READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        }),
        writer: Box::new(TlsWriter {
            shared,
            control,
            out: Vec::new(),
        }),
        key,
        mode: KeyMode::Tls,
        cipher,
    })
}

/// The reading half of a TLS stream: reads ciphertext without holding the
/// TLS state, then feeds and decrypts it under its lock.
struct TlsReader {
    shared: Arc<TlsShared>,
    raw: Box<dyn Conn>,
    /// Ciphertext read, not yet given to rustls: `input[start..end]`.
    input: Box<[u8]>,
    start: usize,
    end: usize,
    /// The connection ended (rustls decides whether cleanly).
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (fed, queued) = {
                let mut tls = lock(&self.shared.tls);
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut rest = &self.input[self.start..self.end];
                    let took = tls.read_tls(&mut rest)?;
                    self.start += took;
                    tls.process_new_packets().map_err(tls_io_error)?;
                    (true, tls.wants_write())
                } else if self.eof {
                    tls.read_tls(&mut io::empty())?;
                    tls.process_new_packets().map_err(tls_io_error)?;
                    return match tls.reader().read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        // No close_notify (the peer's process ended, say):
                        // an end of stream as in the other modes, not a
                        // failure that would overtake messages still queued
                        // from its other streams; a frame cut short is still
                        // caught by the frame reader.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                        other => other,
                    };
                } else {
                    (false, false)
                }
            };
            if queued {
                self.shared.flush_queued()?;
            }
            if fed {
                continue;
            }
            let n = loop {
                match self.raw.read(&mut self.input) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            (self.start, self.end, self.eof) = (0, n, n == 0);
        }
    }
}

impl Write for TlsReader {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(not_for_data())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsReader {
    fn raw(&self) -> &dyn Conn {
        &*self.raw
    }
}

impl Conn for TlsReader {
    delegate_control!();
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        if self.start < self.end {
            return Ok(true);
        }
        let buffered = lock(&self.shared.tls)
            .process_new_packets()
            .map(|s| s.plaintext_bytes_to_read() > 0)
            .unwrap_or(true);
        if buffered {
            return Ok(true);
        }
        self.raw.wait_readable(timeout)
    }
}

/// The writing half of a TLS stream.
struct TlsWriter {
    shared: Arc<TlsShared>,
    control: Box<dyn Conn>,
    out: Vec<u8>,
}

impl Read for TlsWriter {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(not_for_data())
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Takes (and sends) everything, like a blocking socket write, so that
    /// nothing waits in a buffer above for a `flush`.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut left: Vec<IoSlice<'_>> = bufs.to_vec();
        let mut rest = &mut left[..];
        let mut tx = lock(&self.shared.tx);
        self.out.clear();
        // Plaintext sealed into `out` since it was last sent.
        let mut batched = 0;
        loop {
            let n = {
                // At most TLS_WRITE_PIECE bytes of the slices left.
                let mut room = TLS_WRITE_PIECE;
                let mut piece: Vec<IoSlice<'_>> = Vec::with_capacity(rest.len());
                for s in rest.iter() {
                    if room == 0 {
                        break;
                    }
                    let n = s.len().min(room);
                    piece.push(IoSlice::new(&s[..n]));
                    room -= n;
                }
                let mut tls = lock(&self.shared.tls);
                let n = tls.writer().write_vectored(&piece)?;
                while tls.wants_write() {
                    tls.write_tls(&mut self.out)?;
                }
                n
            };
            IoSlice::advance_slices(&mut rest, n);
            batched += n;
            // One socket write per TLS_SEND_BUFFER of plaintext, as when
            // rustls took it all at once.
            if rest.is_empty() || batched >= TLS_SEND_BUFFER || n == 0 {
                tx.write_all(&self.out)?;
                self.out.clear();
                batched = 0;
            }
            if rest.is_empty() {
                return Ok(total);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the TLS connection takes no more data",
                ));
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.shared.tx).flush()
    }
}

impl TlsWriter {
    fn raw(&self) -> &dyn Conn {
        &*self.control
    }
}

impl Conn for TlsWriter {
    delegate_control!();
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        self.control.wait_readable(timeout)
    }
}
