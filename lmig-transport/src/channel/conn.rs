//! One connection of a channel: the byte stream under a lane, and framed
//! reading and writing on it.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::auth::HandshakeIo;
use crate::error::{Result, TransportError};
use crate::noise::IntegrityError;
use crate::tls::TlsFailure;

use super::warm::WarmArea;
use crate::wire::{
    Frame, FrameRepr, HEADER_LEN, Handshake, MessageDecoder, WireError, WireItem, encode_handshake,
};

/// A reliable, ordered byte stream: a TCP or Unix connection or an in-memory pipe.
pub(crate) trait Conn: Read + Write + Send + Sync {
    /// A second handle on the same connection (one reads, one writes).
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>>;
    /// Close both directions; blocked readers and writers return.
    fn shutdown_conn(&self);
    /// Close the reading direction only: a blocked reader returns (end of
    /// stream) and the connection can still send a last frame.
    fn shutdown_read(&self);
    /// The peer, for reports: `198.51.100.3:41234`, `unix` or `memory`.
    fn peer_name(&self) -> String;
    /// The peer's IP address (TCP only): the name a TLS dialer expects
    /// in the listener's certificate by default.
    fn peer_ip(&self) -> Option<IpAddr> {
        None
    }
    /// This end's IP address (TCP only).
    fn local_ip(&self) -> Option<IpAddr> {
        None
    }
    /// Read and write timeouts (`None`: block).
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    /// Wait at most `timeout` until a read would not block (bytes, the end
    /// of the stream or an error are there); `false` when the time ran out.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool>;
    /// Bytes of the stream were read but are not readable yet (part of an
    /// encrypted record): a frame has begun even though no byte of it came
    /// out ([`FrameReader::next_within`]).
    fn holds_partial_input(&self) -> bool {
        false
    }
    /// The descriptor under the stream, for a consumer that polls it with
    /// others (`DirectUrgent::fd`); `None` (the default) for a stream
    /// without one (the in-memory pipe).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// `poll(2)` for `POLLIN` on one descriptor.
fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    // A zero timeout only looks; a shorter wait than 1 ms is rounded up.
    let ms = if timeout.is_zero() {
        0
    } else {
        i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX)
    };
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, timeout) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        if let Err(e) = self.shutdown(Shutdown::Both) {
            debug!(error = %e, "shutting down a tcp stream failed");
        }
    }
    fn shutdown_read(&self) {
        if let Err(e) = self.shutdown(Shutdown::Read) {
            debug!(error = %e, "shutting down the read side of a tcp stream failed");
        }
    }
    fn peer_name(&self) -> String {
        self.peer_addr()
            .map_or_else(|_| "tcp (peer address unknown)".into(), |a| a.to_string())
    }
    fn peer_ip(&self) -> Option<IpAddr> {
        self.peer_addr().ok().map(|a| a.ip())
    }
    fn local_ip(&self) -> Option<IpAddr> {
        self.local_addr().ok().map(|a| a.ip())
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        poll_readable(self.as_fd(), timeout)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        if let Err(e) = self.shutdown(Shutdown::Both) {
            debug!(error = %e, "shutting down a unix stream failed");
        }
    }
    fn shutdown_read(&self) {
        if let Err(e) = self.shutdown(Shutdown::Read) {
            debug!(error = %e, "shutting down the read side of a unix stream failed");
        }
    }
    fn peer_name(&self) -> String {
        "unix".into()
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        poll_readable(self.as_fd(), timeout)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// What one read from a connection produced.
pub(crate) enum ReadOutcome {
    /// A decoded item.
    Item(WireItem),
    /// The peer closed the connection at a frame boundary.
    Eof,
}

/// Reads frames from a connection: the header first (checked before any
/// allocation), then exactly the payload into a buffer of its own, which
/// the decoded message's page bytes point into.
pub(crate) struct FrameReader {
    conn: Box<dyn Conn>,
    decoder: MessageDecoder,
    /// Before authentication only small handshake frames are read; any
    /// other header ends the connection before its payload is read.
    authenticated: bool,
    pool: Arc<BufPool>,
    /// Memory written before the freeze for large frames (`warm.rs`).
    warm: Option<Arc<WarmArea>>,
}

/// Largest handshake frame payload (a `Hello` is 57 bytes).
const MAX_HANDSHAKE_PAYLOAD: usize = 256;

/// Receive buffers of this size are recycled: a whole chunk of 4 KiB pages
/// (64 pages, 256 KiB) with its headers fits.
const POOL_BUF: usize = (256 << 10) + 4096;
/// Recycled buffers kept per connection.
const POOL_MAX: usize = 96;

/// Receive buffers, allocated and zeroed once, handed out for one frame
/// each and given back when the last `Bytes` pointing into them is dropped
/// (whatever thread drops it). This keeps the receive path free of
/// per-frame allocation and zeroing.
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    fn take(&self) -> Vec<u8> {
        let recycled = self.free.lock().ok().and_then(|mut f| f.pop());
        recycled.unwrap_or_else(|| vec![0u8; POOL_BUF])
    }
}

/// A pooled buffer holding one frame; returns to the pool when dropped.
struct PooledFrame {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for PooledFrame {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledFrame {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            if free.len() < POOL_MAX {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

fn map_read_err(e: io::Error, during: &'static str) -> TransportError {
    if let Some(source) = e.get_ref() {
        if let Some(i) = source.downcast_ref::<IntegrityError>() {
            return TransportError::Integrity {
                detail: i.to_string(),
            };
        }
        if let Some(t) = source.downcast_ref::<TlsFailure>() {
            return TransportError::Tls {
                detail: t.to_string(),
            };
        }
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
            waiting_for: during,
            after: Duration::ZERO,
        },
        io::ErrorKind::UnexpectedEof => TransportError::Closed { during },
        _ => TransportError::io(format!("reading from the peer {during}"), e),
    }
}

impl FrameReader {
    pub(crate) fn new(conn: Box<dyn Conn>) -> Self {
        Self {
            conn,
            decoder: MessageDecoder::new(),
            authenticated: false,
            pool: Arc::default(),
            warm: None,
        }
    }

    /// Large frames are read into `area` while it has room.
    pub(crate) fn set_warm(&mut self, area: Arc<WarmArea>) {
        self.warm = Some(area);
    }

    /// The connection, for a reader that starts afresh on it (the
    /// handshake is over and nothing is half read).
    pub(crate) fn into_conn(self) -> Box<dyn Conn> {
        self.conn
    }

    /// The handshake succeeded: protocol messages may follow.
    pub(crate) fn set_authenticated(&mut self) {
        self.authenticated = true;
    }

    /// The connection is sealed (every byte authenticated below): protocol
    /// frames' checksum is not checked ([`MessageDecoder::sealed`]).
    pub(crate) fn set_sealed(&mut self) {
        self.decoder.sealed();
    }

    pub(crate) fn conn(&self) -> &dyn Conn {
        &*self.conn
    }

    /// A message is half read (its first frames are in, the rest is not).
    pub(crate) fn has_partial(&self) -> bool {
        self.decoder.has_partial()
    }

    /// The next item; `Eof` when the peer closed cleanly between messages.
    pub(crate) fn next(&mut self, during: &'static str) -> Result<ReadOutcome> {
        match self.read_item(during, None)? {
            Some(outcome) => Ok(outcome),
            // Without patience a read timeout is an error, never `None`.
            None => Err(TransportError::Timeout {
                waiting_for: during,
                after: Duration::ZERO,
            }),
        }
    }

    /// The next item, on a connection whose read timeout is the caller's
    /// wait: `None` when that wait passed before the next frame's first
    /// byte (nothing of it is lost: a partly decoded message or a partly
    /// read record stays for the next call). Once a frame has begun, reads
    /// that time out are tried again until `patience` has passed since the
    /// first of them; then the frame counts as stopped half-way (a
    /// timeout error).
    ///
    /// This is how the urgent stream is read without a `poll` before every
    /// message (one system call fewer per post-copy request and reply).
    pub(crate) fn next_within(
        &mut self,
        during: &'static str,
        patience: Duration,
    ) -> Result<Option<ReadOutcome>> {
        self.read_item(during, Some(patience))
    }

    fn read_item(
        &mut self,
        during: &'static str,
        patience: Option<Duration>,
    ) -> Result<Option<ReadOutcome>> {
        loop {
            let mut header = [0u8; HEADER_LEN];
            let mut got = 0;
            let mut stalled = None;
            while got < HEADER_LEN {
                match self.conn.read(&mut header[got..]) {
                    Ok(0) if got == 0 && !self.decoder.has_partial() => {
                        return Ok(Some(ReadOutcome::Eof));
                    }
                    Ok(0) => return Err(TransportError::Closed { during }),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if got == 0
                            && patience.is_some()
                            && timed_out(&e)
                            && !self.conn.holds_partial_input() =>
                    {
                        return Ok(None);
                    }
                    Err(e) if timed_out(&e) && still_patient(&mut stalled, patience) => {}
                    Err(e) => return Err(map_read_err(e, during)),
                }
            }
            let repr = FrameRepr::parse_header(&Frame::new_unchecked(&header[..]))?;
            let len = repr.length as usize;
            if !self.authenticated {
                if !repr.kind.is_handshake() {
                    return Err(TransportError::Unauthenticated {
                        got: repr.kind.name(),
                    });
                }
                if len > MAX_HANDSHAKE_PAYLOAD {
                    return Err(WireError::TooLong {
                        what: "handshake frame",
                        len,
                        cap: MAX_HANDSHAKE_PAYLOAD,
                    }
                    .into());
                }
            }
            let frame = if !self.authenticated {
                // A handshake frame (at most MAX_HANDSHAKE_PAYLOAD bytes): an
                // exact-size buffer, so a connection that has not proved
                // anything never costs a pool buffer.
                let mut buf = vec![0u8; HEADER_LEN + len];
                buf[..HEADER_LEN].copy_from_slice(&header);
                read_payload(&mut *self.conn, &mut buf[HEADER_LEN..], during, None)?;
                Bytes::from(buf)
            } else if HEADER_LEN + len <= POOL_BUF {
                let mut buf = self.pool.take();
                buf[..HEADER_LEN].copy_from_slice(&header);
                read_payload(
                    &mut *self.conn,
                    &mut buf[HEADER_LEN..HEADER_LEN + len],
                    during,
                    patience,
                )?;
                Bytes::from_owner(PooledFrame {
                    buf,
                    len: HEADER_LEN + len,
                    pool: self.pool.clone(),
                })
            } else if let Some(mut buf) = self.warm.as_ref().and_then(|w| w.take(HEADER_LEN + len))
            {
                // Memory written before the freeze (`warm.rs`).
                buf[..HEADER_LEN].copy_from_slice(&header);
                read_payload(&mut *self.conn, &mut buf[HEADER_LEN..], during, patience)?;
                buf.freeze()
            } else {
                // One exact read target (not `read_to_end`, which zeroes
                // its spare room and reads into it in small steps: an
                // encrypted stream then decrypts into its own buffer and
                // copies). A large zeroed allocation is fresh memory, not
                // written until the payload lands in it.
                let mut buf = vec![0u8; HEADER_LEN + len];
                buf[..HEADER_LEN].copy_from_slice(&header);
                read_payload(&mut *self.conn, &mut buf[HEADER_LEN..], during, patience)?;
                Bytes::from(buf)
            };
            if let Some(item) = self.decoder.decode_frame(frame)? {
                return Ok(Some(ReadOutcome::Item(item)));
            }
        }
    }
}

/// A read's timeout ran out (`SO_RCVTIMEO`).
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A read inside a frame timed out: try again while within `patience` of
/// the first such timeout (`stalled`, set here); never without patience.
fn still_patient(stalled: &mut Option<Instant>, patience: Option<Duration>) -> bool {
    let Some(patience) = patience else {
        return false;
    };
    stalled.get_or_insert_with(Instant::now).elapsed() < patience
}

/// Read exactly `buf`; reads that time out are tried again within
/// `patience` ([`FrameReader::next_within`]).
fn read_payload(
    conn: &mut dyn Conn,
    mut buf: &mut [u8],
    during: &'static str,
    patience: Option<Duration>,
) -> Result<()> {
    let mut stalled = None;
    while !buf.is_empty() {
        match conn.read(buf) {
            Ok(0) => return Err(TransportError::Closed { during }),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) && still_patient(&mut stalled, patience) => {}
            Err(e) => return Err(map_read_err(e, during)),
        }
    }
    Ok(())
}

/// A connection during its handshake: framed reads and writes of handshake
/// messages; a protocol message is refused.
pub(crate) struct HandshakeConn<'a> {
    pub(crate) reader: &'a mut FrameReader,
    pub(crate) writer: &'a mut dyn Conn,
    /// The read timeout set on the connection, for error messages.
    pub(crate) timeout: Duration,
    /// Set once a valid `Hello` arrived (the listener's measure of progress).
    pub(crate) hello_seen: Option<&'a AtomicBool>,
}

impl HandshakeIo for HandshakeConn<'_> {
    fn send(&mut self, hs: &Handshake) -> Result<()> {
        let frames = encode_handshake(hs)?;
        frames
            .write_to(&mut self.writer)
            .map_err(|e| TransportError::io("writing the handshake", e))?;
        self.writer
            .flush()
            .map_err(|e| TransportError::io("writing the handshake", e))
    }

    fn recv(&mut self) -> Result<Handshake> {
        match self.reader.next("during the handshake") {
            Ok(ReadOutcome::Item(WireItem::Handshake(h))) => {
                if let (Handshake::Hello(_), Some(seen)) = (&h, self.hello_seen) {
                    seen.store(true, Ordering::Release);
                }
                Ok(h)
            }
            Ok(ReadOutcome::Item(WireItem::Message(m))) => {
                if let Err(e) = self.send(&Handshake::Reject(crate::wire::Reject {
                    reason: crate::wire::RejectReason::Unexpected,
                })) {
                    debug!(error = %e, "telling the peer a message came before the handshake did not work");
                }
                Err(TransportError::Unauthenticated { got: m.name() })
            }
            Ok(ReadOutcome::Eof) => Err(TransportError::Closed {
                during: "during the handshake",
            }),
            Err(TransportError::Timeout { .. }) => Err(TransportError::Timeout {
                waiting_for: "the peer's next handshake step",
                after: self.timeout,
            }),
            Err(e @ (TransportError::Wire(_) | TransportError::Unauthenticated { .. })) => {
                if let Err(e) = self.send(&Handshake::Reject(crate::wire::Reject {
                    reason: crate::wire::RejectReason::Unexpected,
                })) {
                    debug!(error = %e, "telling the peer its handshake was malformed did not work");
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}
