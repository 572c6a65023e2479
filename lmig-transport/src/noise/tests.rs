use super::*;

/// Keys of both ends of one stream, from a real handshake.
fn keys(prologue_d: &[u8], prologue_l: &[u8]) -> Result<(StreamKeys, StreamKeys)> {
    let psk = [5u8; 32];
    let (init, m1) = Initiator::start(&psk, prologue_d)?;
    let (m2, l) = respond(&psk, prologue_l, &m1)?;
    Ok((init.finish(&m2)?, l))
}

fn sealed(keys: &StreamKeys, writes: &[&[u8]]) -> Vec<u8> {
    let (_, mut w) = keys.clone().split(io::empty(), Vec::new());
    for b in writes {
        w.write_all(b).unwrap();
    }
    w.inner
}

fn opened(keys: &StreamKeys, wire: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
    let (mut r, _) = keys.clone().split(wire, io::sink());
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&buf[..n]);
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[test]
fn records_round_trip_in_any_read_size() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let big = data(1_000_000);
    let wire = sealed(&d, &[b"hello", &big, &[], b"x"]);
    let mut want = b"hello".to_vec();
    want.extend_from_slice(&big);
    want.push(b'x');
    for chunk in [1, 16, 4096, MAX_PLAIN, MAX_RECORD, 1 << 20] {
        assert_eq!(opened(&l, &wire, chunk).unwrap(), want, "reads of {chunk}");
    }
    // Ciphertext does not show the plaintext.
    assert!(!wire.windows(64).any(|w| w == &big[4096..4160]));
}

#[test]
fn vectored_writes_gather_small_slices() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let big = data(300_000);
    let (_, mut w) = d.split(io::empty(), Vec::new());
    let left = [
        IoSlice::new(b"0123456789abcdef"),
        IoSlice::new(b"head"),
        IoSlice::new(&big),
    ];
    // One call takes (and sends) everything.
    assert_eq!(w.write_vectored(&left).unwrap(), 300_020);
    let mut want = b"0123456789abcdefhead".to_vec();
    want.extend_from_slice(&big);
    // 300,020 bytes: the two small slices gathered in one record, then
    // the big one sealed in place: 4 full records and one short one.
    assert_eq!(w.next, 6);
    assert_eq!(
        w.inner.len(),
        300_020 + 6 * (LEN_PREFIX + TAG_LEN),
        "no other record"
    );
    // Small slices between big ones are gathered, in order.
    let (d2, l2) = keys(b"q", b"q").unwrap();
    let (_, mut w2) = d2.split(io::empty(), Vec::new());
    let mixed = [
        IoSlice::new(b"a"),
        IoSlice::new(&big[..5000]),
        IoSlice::new(b"b"),
        IoSlice::new(b"c"),
        IoSlice::new(&big[5000..]),
    ];
    assert_eq!(w2.write_vectored(&mixed).unwrap(), 300_003);
    let mut want2 = b"a".to_vec();
    want2.extend_from_slice(&big[..5000]);
    want2.extend_from_slice(b"bc");
    want2.extend_from_slice(&big[5000..]);
    // "a", big[..5000], "bc", then 295,000 bytes: 4 full and one short.
    assert_eq!(w2.next, 8);
    assert_eq!(opened(&l2, &w2.inner, 1000).unwrap(), want2);
    assert_eq!(opened(&l, &w.inner, 4096).unwrap(), want);
}

#[test]
fn a_small_write_is_one_record() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let page = data(4096);
    let (_, mut w) = d.split(io::empty(), Vec::new());
    // A frame header, a message head and one page: one record.
    let reply = [
        IoSlice::new(b"0123456789abcdef"),
        IoSlice::new(b"head"),
        IoSlice::new(&page),
    ];
    assert_eq!(w.write_vectored(&reply).unwrap(), 4116);
    assert_eq!(w.next, 1);
    assert_eq!(w.inner.len(), 4116 + LEN_PREFIX + TAG_LEN);
    // Up to SMALL_WRITE in all is one record; one byte more is not
    // (its large slice is sealed in place, after the gathered head).
    let big = data(SMALL_WRITE);
    assert_eq!(
        w.write_vectored(&[IoSlice::new(&big)]).unwrap(),
        SMALL_WRITE
    );
    assert_eq!(w.next, 2);
    let over = [IoSlice::new(b"h"), IoSlice::new(&big)];
    assert_eq!(w.write_vectored(&over).unwrap(), SMALL_WRITE + 1);
    assert_eq!(w.next, 4);
    // Nothing at all writes nothing.
    assert_eq!(w.write_vectored(&[IoSlice::new(&[])]).unwrap(), 0);
    assert_eq!(w.next, 4);
    let mut want = b"0123456789abcdefhead".to_vec();
    want.extend_from_slice(&page);
    want.extend_from_slice(&big);
    want.push(b'h');
    want.extend_from_slice(&big);
    for chunk in [1, 16, 4096, MAX_RECORD] {
        assert_eq!(
            opened(&l, &w.inner, chunk).unwrap(),
            want,
            "reads of {chunk}"
        );
    }
}

#[test]
fn any_flipped_byte_fails_the_stream() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let wire = sealed(&d, &[&data(70_000), b"tail"]);
    for at in [0, 1, 2, 100, 65_536, wire.len() - 1] {
        let mut bad = wire.clone();
        bad[at] ^= 0x20;
        let e = opened(&l, &bad, 4096).unwrap_err();
        assert!(
            e.get_ref().is_some_and(|s| s.is::<IntegrityError>()),
            "byte {at}: {e}"
        );
    }
}

/// Gives `wire` up to `at`, then read timeouts until `at` moves on.
struct Trickle {
    wire: Vec<u8>,
    pos: usize,
    at: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.at {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.at - self.pos);
        buf[..n].copy_from_slice(&self.wire[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn a_record_read_in_part_is_held_until_it_is_whole() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let wire = sealed(&d, &[b"0123456789abcdef", b"xy"]);
    let (mut r, _) = l.split(
        Trickle {
            wire,
            pos: 0,
            at: 5,
        },
        io::sink(),
    );
    assert!(!r.holds_partial());
    let mut buf = [0u8; 16];
    // Part of the record: a timeout, nothing handed out, its bytes held.
    let e = r.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(r.holds_partial());
    // The rest: the record, then nothing held.
    r.inner.at = r.inner.wire.len();
    assert_eq!(r.read(&mut buf).unwrap(), 16);
    assert_eq!(&buf, b"0123456789abcdef");
    assert_eq!(r.read(&mut buf).unwrap(), 2);
    assert!(!r.holds_partial());
}

#[test]
fn dropped_replayed_and_truncated_records_fail() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let one = sealed(&d, &[b"first"]);
    let first_len = one.len();
    let (_, mut w) = d.split(io::empty(), Vec::new());
    w.write_all(b"first").unwrap();
    w.write_all(b"second").unwrap();
    let wire = w.inner;
    // Replayed first record instead of the second.
    let mut replayed = wire[..first_len].to_vec();
    replayed.extend_from_slice(&wire[..first_len]);
    assert!(opened(&l, &replayed, 64).is_err());
    // First record dropped.
    assert!(opened(&l, &wire[first_len..], 64).is_err());
    // Cut inside a record.
    assert!(opened(&l, &wire[..wire.len() - 3], 64).is_err());
    // Cut between records: a clean end after the first.
    assert_eq!(opened(&l, &wire[..first_len], 64).unwrap(), b"first");
}

#[test]
fn mismatched_prologue_or_key_fails_the_handshake() {
    assert!(keys(b"session A", b"session B").is_err());
    let (init, m1) = Initiator::start(&[1; 32], b"p").unwrap();
    assert!(matches!(
        respond(&[2; 32], b"p", &m1),
        Err(TransportError::AuthFailed { .. })
    ));
    let (m2, _) = respond(&[1; 32], b"p", &m1).unwrap();
    let mut bad = m2.clone();
    bad[40] ^= 1;
    assert!(init.finish(&bad).is_err());
}

#[test]
fn each_direction_has_its_own_keys() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let wire = sealed(&d, &[b"to the listener"]);
    // The dialer cannot read its own records back (a reflected stream fails).
    assert!(opened(&d, &wire, 64).is_err());
    assert_eq!(opened(&l, &wire, 64).unwrap(), b"to the listener");
}

/// Gives `wire` in reads of at most `step` bytes, with a read timeout
/// before every other one when `stall`.
struct Choppy {
    wire: Vec<u8>,
    pos: usize,
    step: usize,
    stall: bool,
    stalled: bool,
}

impl Read for Choppy {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stalled = self.stall && !self.stalled;
        if self.stalled && self.pos < self.wire.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.step).min(self.wire.len() - self.pos);
        buf[..n].copy_from_slice(&self.wire[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn frame_sized_reads_survive_timeouts_anywhere() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let big = data(1_000_000);
    let wire = sealed(&d, &[b"0123456789abcdef", &big, b"x"]);
    let mut want = b"0123456789abcdef".to_vec();
    want.extend_from_slice(&big);
    want.push(b'x');
    for (step, stall) in [(usize::MAX, false), (70_000, true), (1000, true), (7, true)] {
        let wire = wire.clone();
        let choppy = Choppy {
            wire,
            pos: 0,
            step,
            stall,
            stalled: false,
        };
        let (mut r, _) = l.clone().split(choppy, io::sink());
        let mut got = Vec::new();
        let mut header = [0u8; 16];
        let mut buf = vec![0u8; 1 << 20];
        // Bounded: each read hands out bytes, times out every other time,
        // or ends.
        for _ in 0..10_000_000 {
            // A frame's header, then its payload in large reads (records
            // opened straight into the caller's buffer).
            let into: &mut [u8] = if got.is_empty() {
                &mut header
            } else {
                &mut buf
            };
            match r.read(into) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&into[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("step {step}: {e}"),
            }
        }
        assert!(got == want, "step {step}");
        assert!(!r.holds_partial());
    }
}

#[test]
fn a_forged_record_leaves_no_plaintext_in_the_callers_buffer() {
    let (d, l) = keys(b"p", b"p").unwrap();
    let big = data(200_000);
    let mut wire = sealed(&d, &[&big]);
    // The second record's last byte (its tag).
    wire[2 * (LEN_PREFIX + MAX_RECORD) - 1] ^= 1;
    let (mut r, _) = l.split(&wire[..], io::sink());
    let mut buf = vec![0x55u8; 1 << 20];
    assert_eq!(r.read(&mut buf).unwrap(), MAX_PLAIN);
    assert!(buf[..MAX_PLAIN] == big[..MAX_PLAIN]);
    buf.fill(0x55);
    // The second record is opened in the caller's buffer, and fails: its
    // plaintext's place is left zeroed, and the stream stays failed.
    let e = r.read(&mut buf).unwrap_err();
    assert!(e.get_ref().is_some_and(|s| s.is::<IntegrityError>()), "{e}");
    assert!(
        buf[..MAX_PLAIN].iter().all(|&b| b == 0),
        "plaintext of a forged record left in the caller's buffer"
    );
    assert!(r.read(&mut buf).is_err());
}
