//! The Noise protocol under every stream in the default mode
//! ([`crate::Security::Psk`]): one `Noise_NNpsk0_25519_AESGCM_SHA256`
//! session per stream (the `snow` crate), and the record layer that carries
//! the stream's frames in Noise transport messages.
//!
//! # Handshake
//!
//! The two Noise handshake messages ride in `KeyExchange` frames of the
//! stream's admission handshake ([`crate::auth`]), pipelined with it so a
//! stream still costs two round trips:
//!
//! ```text
//! dialer                                         listener
//!   Hello ───────────────────────────────────────▶
//!   ◀─────────────────────────────────────── Challenge
//!   Proof, KeyExchange{-> psk, e} ───────────────▶ proof verified, stream fits,
//!                                                  Noise message 1 verified
//!   ◀───────────── Accept, KeyExchange{<- e, ee}
//!   Noise message 2 verified
//!   ═════════ records (Noise transport messages) both ways ═════════
//! ```
//!
//! * The PSK is the channel's [`crate::AuthKey`] hashed to 32 bytes
//!   (HMAC-SHA256 under a fixed label, `lmig noise psk v1`):
//!   only holders of the key can complete the handshake.
//! * The prologue is the admission transcript (protocol version, the whole
//!   `Hello`: session id, role, lane index, lane count, generation, the
//!   dialer's nonce; the listener's nonce) and the dialer's proof. Both
//!   sides must agree on every byte of it or the handshake fails, so a
//!   stream's keys belong to that stream of that session and generation
//!   only: streams cannot be spliced or swapped.
//! * Both sides use fresh ephemeral X25519 keys, so the transport keys are
//!   new for every stream: a recorded stream replayed to a listener does
//!   not decrypt (its first record fails), and a past stream's keys say
//!   nothing about another's (forward secrecy against a later key leak
//!   needs the PSK too, which an attacker who recorded the traffic lacks
//!   until it leaks; with it, recorded streams can be decrypted only by
//!   who also broke X25519).
//!
//! # Records
//!
//! After the handshake each direction of the stream is a sequence of
//! records: a little-endian `u16` length, then that many bytes of one Noise
//! transport message (AES-256-GCM ciphertext and its 16-byte tag), at most
//! 65,535 bytes, as the Noise specification caps them. The nonce is the
//! record's number in its direction, kept by each side and never sent: a
//! record changed, dropped, reordered, replayed or injected fails
//! authentication, and the reader fails the stream with
//! [`crate::TransportError::Integrity`] without handing out any byte of it.
//! A stream that ends inside a record fails the same way; one that ends
//! between records ends like a plain connection closing (a cut between
//! records loses whole messages only, which the session protocol notices).
//!
//! Record boundaries carry no meaning: the writer puts a frame's header and
//! message head (gathered from small slices) in a record of their own and
//! seals page data straight from its buffers in records of the full size
//! (a write of at most 16 KiB in all, such as a one-page reply, is one
//! record), and the reader hands out bytes whatever the records' sizes. The frames
//! inside carry checksum 0: the records' tags authenticate every byte, so a
//! CRC-32C would only repeat, weaker, what they check ([`crate::wire`]).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use crate::error::{Result, TransportError};

/// The Noise protocol every stream speaks in the default mode.
pub const NOISE_PROTOCOL: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";

/// Length of the AEAD tag at the end of every Noise message.
const TAG_LEN: usize = 16;
/// Longest Noise message (the specification's cap).
pub(crate) const MAX_RECORD: usize = 65_535;
/// Most plaintext bytes one record carries.
pub(crate) const MAX_PLAIN: usize = MAX_RECORD - TAG_LEN;
/// The record length prefix.
const LEN_PREFIX: usize = 2;
/// Records the writer seals before one write to the socket (256 KiB).
const WRITE_BATCH: usize = 4;
/// Slices (or what is left of one) shorter than this are gathered with
/// their neighbours into one record; longer ones are sealed straight from
/// the caller's memory, never copied first (a frame's header and message
/// head become a small record of their own before its pages).
const GATHER_BELOW: usize = 4096;
/// A write of at most this many bytes in all (a page request, a one-page
/// reply on the urgent stream) becomes one record: its slices are copied
/// together (about 0.1 µs for a 4 KiB page) rather than sealed, sent and
/// opened as two records (a second AEAD set-up, tag and length prefix on
/// each side of a post-copy fault's round trip).
const SMALL_WRITE: usize = 16 << 10;
/// Ciphertext bytes the reader asks the socket for at once.
const READ_BUFFER: usize = WRITE_BATCH * (LEN_PREFIX + MAX_RECORD);

/// Longest Noise handshake message we send or accept (both are 48 bytes).
pub(crate) const MAX_HANDSHAKE_MESSAGE: usize = 128;

fn noise_err(what: &'static str, e: snow::Error) -> TransportError {
    TransportError::Handshake {
        detail: format!("{what}: {e}"),
    }
}

fn builder<'a>(psk: &'a [u8; 32], prologue: &'a [u8]) -> Result<snow::Builder<'a>> {
    let params = NOISE_PROTOCOL
        .parse()
        .map_err(|e| noise_err("Noise parameters", e))?;
    snow::Builder::new(params)
        .prologue(prologue)
        .and_then(|b| b.psk(0, psk))
        .map_err(|e| noise_err("setting up Noise", e))
}

/// The dialer's side of the Noise handshake, after its first message.
pub(crate) struct Initiator(snow::HandshakeState);

impl Initiator {
    /// Start the handshake; returns the first message (`-> psk, e`) to send.
    pub(crate) fn start(psk: &[u8; 32], prologue: &[u8]) -> Result<(Self, Vec<u8>)> {
        let mut hs = builder(psk, prologue)?
            .build_initiator()
            .map_err(|e| noise_err("starting the Noise handshake", e))?;
        let mut msg = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = hs
            .write_message(&[], &mut msg)
            .map_err(|e| noise_err("writing the first Noise message", e))?;
        msg.truncate(n);
        Ok((Self(hs), msg))
    }

    /// Read the listener's message (`<- e, ee`) and derive the stream keys.
    pub(crate) fn finish(mut self, msg: &[u8]) -> Result<StreamKeys> {
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        self.0
            .read_message(msg, &mut payload)
            .map_err(|_| TransportError::AuthFailed {
                detail: "the listener's Noise message does not verify (wrong key or tampered handshake)",
            })?;
        StreamKeys::from_handshake(self.0)
    }
}

/// The listener's side: read the dialer's first message, answer it, and
/// derive the stream keys. Returns the answer to send.
pub(crate) fn respond(
    psk: &[u8; 32],
    prologue: &[u8],
    msg: &[u8],
) -> Result<(Vec<u8>, StreamKeys)> {
    let mut hs = builder(psk, prologue)?
        .build_responder()
        .map_err(|e| noise_err("starting the Noise handshake", e))?;
    let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
    hs.read_message(msg, &mut payload)
        .map_err(|_| TransportError::AuthFailed {
            detail: "the dialer's Noise message does not verify (wrong key or tampered handshake)",
        })?;
    let mut answer = vec![0u8; MAX_HANDSHAKE_MESSAGE];
    let n = hs
        .write_message(&[], &mut answer)
        .map_err(|e| noise_err("writing the second Noise message", e))?;
    answer.truncate(n);
    Ok((answer, StreamKeys::from_handshake(hs)?))
}

/// Both ends' keys of one stream from a real handshake with a fixed key
/// and prologue (for the fuzz target; fresh ephemeral keys every call).
#[cfg(feature = "fuzzing")]
pub(crate) fn keys_for_fuzzing() -> (StreamKeys, StreamKeys) {
    let psk = [0x5a; 32];
    let (init, first) = Initiator::start(&psk, b"fuzz").expect("Noise handshake");
    let (answer, listener) = respond(&psk, b"fuzz", &first).expect("Noise handshake");
    (init.finish(&answer).expect("Noise handshake"), listener)
}

/// The transport keys of one stream, both directions, shared by its
/// reading and writing halves (each keeps its own record counter).
#[derive(Clone)]
pub(crate) struct StreamKeys(Arc<snow::StatelessTransportState>);

impl StreamKeys {
    fn from_handshake(hs: snow::HandshakeState) -> Result<Self> {
        let t = hs
            .into_stateless_transport_mode()
            .map_err(|e| noise_err("finishing the Noise handshake", e))?;
        Ok(Self(Arc::new(t)))
    }

    /// The reading and writing halves of the record layer over `reader`
    /// and `writer` (two handles on the same connection).
    pub(crate) fn split<R: Read, W: Write>(
        self,
        reader: R,
        writer: W,
    ) -> (RecordReader<R>, RecordWriter<W>) {
        (
            RecordReader::new(reader, self.clone()),
            RecordWriter::new(writer, self),
        )
    }
}

impl fmt::Debug for StreamKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamKeys(<redacted>)")
    }
}

/// A record that failed its integrity check, as the `io::Error` source a
/// [`RecordReader`] returns (the channel turns it into
/// [`TransportError::Integrity`]).
#[derive(Debug, Clone)]
pub(crate) struct IntegrityError(pub(crate) String);

impl fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IntegrityError {}

fn integrity(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, IntegrityError(detail))
}

/// The reading half: reads records from `inner`, checks and decrypts them,
/// and hands out the plaintext bytes in order.
///
/// Buffers are allocated once per stream (about 320 KiB). A read of at
/// least a whole record's ciphertext length decrypts straight into the
/// caller's buffer; smaller reads are served from one record buffer.
pub(crate) struct RecordReader<R> {
    inner: R,
    keys: StreamKeys,
    /// Number of the next record (the AEAD nonce).
    next: u64,
    /// Ciphertext read ahead: `input[start..end]`.
    input: Box<[u8]>,
    start: usize,
    end: usize,
    /// Plaintext of the current record not yet handed out: `plain[pos..len]`.
    plain: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Once a record failed, every later read fails the same way.
    failed: Option<String>,
}

impl<R: Read> RecordReader<R> {
    fn new(inner: R, keys: StreamKeys) -> Self {
        Self {
            inner,
            keys,
            next: 0,
            input: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            plain: vec![0u8; MAX_RECORD].into_boxed_slice(),
            pos: 0,
            len: 0,
            failed: None,
        }
    }

    /// The connection under the records.
    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Plaintext or a whole record is buffered: a read returns without
    /// waiting for the connection.
    pub(crate) fn has_buffered(&self) -> bool {
        let have = self.end - self.start;
        self.pos < self.len
            || (have >= LEN_PREFIX
                && have
                    >= LEN_PREFIX
                        + usize::from(u16::from_le_bytes([
                            self.input[self.start],
                            self.input[self.start + 1],
                        ])))
            || self.failed.is_some()
    }

    /// Ciphertext of a record not yet whole is buffered (or the stream
    /// failed): a frame has begun, though none of it can be handed out.
    pub(crate) fn holds_partial(&self) -> bool {
        self.start < self.end || self.failed.is_some()
    }

    fn fail(&mut self, detail: String) -> io::Error {
        self.failed = Some(detail.clone());
        integrity(detail)
    }

    /// Decrypt the record at `input[start..]` (whose length prefix said
    /// `n`) into `out`, which has room for `n` bytes; the plaintext length.
    fn open(&mut self, n: usize, out: &mut [u8]) -> io::Result<usize> {
        let from = self.start + LEN_PREFIX;
        let opened = self
            .keys
            .0
            .read_message(self.next, &self.input[from..from + n], out);
        match opened {
            Ok(len) => {
                self.start += LEN_PREFIX + n;
                self.next += 1;
                Ok(len)
            }
            Err(_) => Err(self.fail(format!(
                "record {} of {} bytes does not authenticate (changed, reordered, replayed or injected on the path)",
                self.next, n
            ))),
        }
    }
}

impl<R: Read> Read for RecordReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.len {
                let n = buf.len().min(self.len - self.pos);
                buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(f) = &self.failed {
                return Err(integrity(f.clone()));
            }
            let have = self.end - self.start;
            if have >= LEN_PREFIX {
                let n = usize::from(u16::from_le_bytes([
                    self.input[self.start],
                    self.input[self.start + 1],
                ]));
                if n < TAG_LEN {
                    return Err(self.fail(format!(
                        "record {} of {n} bytes is shorter than its tag",
                        self.next
                    )));
                }
                if have >= LEN_PREFIX + n {
                    // The decryption needs room for the tag as well.
                    if buf.len() >= n {
                        let got = self.open(n, buf)?;
                        if got > 0 {
                            return Ok(got);
                        }
                    } else {
                        let mut plain = std::mem::take(&mut self.plain);
                        let opened = self.open(n, &mut plain);
                        self.plain = plain;
                        self.len = opened?;
                        self.pos = 0;
                    }
                    continue;
                }
            }
            // Need more ciphertext: make room for a whole record, then read.
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.input.len() - self.start < LEN_PREFIX + MAX_RECORD {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = loop {
                match self.inner.read(&mut self.input[self.end..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if got == 0 {
                if self.start == self.end {
                    return Ok(0);
                }
                return Err(self.fail(format!(
                    "the stream ended inside record {} ({} bytes of it arrived)",
                    self.next,
                    self.end - self.start
                )));
            }
            self.end += got;
        }
    }
}

/// The writing half: seals what is written into records and writes them.
///
/// Every `write` call seals and sends all it is given before returning
/// (nothing waits for a `flush`), in socket writes of up to [`WRITE_BATCH`]
/// records.
/// Plaintext is sealed straight from the caller's slices where they hold
/// at least [`GATHER_BELOW`] bytes, and gathered otherwise (small frame
/// headers).
pub(crate) struct RecordWriter<W> {
    inner: W,
    keys: StreamKeys,
    next: u64,
    /// Sealed records waiting for the socket.
    out: Box<[u8]>,
    out_len: usize,
    /// Plaintext gathered from several slices for one record.
    stage: Box<[u8]>,
    stage_len: usize,
    /// A write failed half-way: the peer would see a broken record next.
    broken: bool,
}

impl<W: Write> RecordWriter<W> {
    fn new(inner: W, keys: StreamKeys) -> Self {
        Self {
            inner,
            keys,
            next: 0,
            out: vec![0u8; (WRITE_BATCH + 1) * (LEN_PREFIX + MAX_RECORD)].into_boxed_slice(),
            out_len: 0,
            stage: vec![0u8; MAX_PLAIN].into_boxed_slice(),
            stage_len: 0,
            broken: false,
        }
    }

    /// The connection under the records.
    pub(crate) fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The connection under the records, taken back (the fuzz target reads
    /// what was written).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn into_inner(self) -> W {
        self.inner
    }

    /// Seal `plain` (at most [`MAX_PLAIN`] bytes) as the next record in `out`.
    fn seal(out: &mut [u8], out_len: &mut usize, next: &mut u64, keys: &StreamKeys, plain: &[u8]) {
        let at = *out_len + LEN_PREFIX;
        let n = keys
            .0
            .write_message(*next, plain, &mut out[at..at + plain.len() + TAG_LEN])
            // Length checked by the callers; the nonce cannot run out (2^64 records).
            .unwrap_or_else(|_| unreachable!("a record of at most MAX_PLAIN bytes seals"));
        out[*out_len..at].copy_from_slice(&(n as u16).to_le_bytes());
        *out_len = at + n;
        *next += 1;
    }

    /// Write the sealed records; a failure breaks the stream for good
    /// (the peer would see a broken record next).
    fn send_out(&mut self) -> io::Result<()> {
        let sent = self.inner.write_all(&self.out[..self.out_len]);
        self.out_len = 0;
        if sent.is_err() {
            self.broken = true;
        }
        sent
    }

    /// A small write ([`SMALL_WRITE`], `total` bytes in `bufs`): one record,
    /// one socket write.
    fn write_small(&mut self, bufs: &[IoSlice<'_>], total: usize) -> io::Result<usize> {
        if total == 0 {
            return Ok(0);
        }
        // Nothing stays staged between calls: the stage is free.
        let mut at = 0;
        for b in bufs {
            self.stage[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        self.stage_len = total;
        self.seal_stage();
        self.send_out()?;
        Ok(total)
    }

    fn seal_stage(&mut self) {
        if self.stage_len > 0 {
            Self::seal(
                &mut self.out,
                &mut self.out_len,
                &mut self.next,
                &self.keys,
                &self.stage[..self.stage_len],
            );
            self.stage_len = 0;
        }
    }
}

impl<W: Write> Write for RecordWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this encrypted stream failed",
            ));
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        if total <= SMALL_WRITE {
            return self.write_small(bufs, total);
        }
        let mut taken = 0;
        let record = LEN_PREFIX + MAX_RECORD;
        for b in bufs {
            let mut rest: &[u8] = b;
            while !rest.is_empty() {
                // Room for this record and for the staged one sealed at the end.
                if self.out.len() - self.out_len < 2 * record {
                    self.send_out()?;
                }
                if rest.len() >= GATHER_BELOW {
                    // Sealed from the caller's slice: what was gathered
                    // before it goes first, as a record of its own.
                    self.seal_stage();
                    let n = rest.len().min(MAX_PLAIN);
                    Self::seal(
                        &mut self.out,
                        &mut self.out_len,
                        &mut self.next,
                        &self.keys,
                        &rest[..n],
                    );
                    rest = &rest[n..];
                    taken += n;
                } else {
                    let n = rest.len().min(MAX_PLAIN - self.stage_len);
                    self.stage[self.stage_len..self.stage_len + n].copy_from_slice(&rest[..n]);
                    self.stage_len += n;
                    rest = &rest[n..];
                    taken += n;
                    if self.stage_len == MAX_PLAIN {
                        self.seal_stage();
                    }
                }
            }
        }
        self.seal_stage();
        self.send_out()?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests;
