//! Every security mode over real loopback TCP: messages both ways and a
//! reconnect; refusals of a wrong key, an untrusted certificate and a mode
//! mismatch; a byte flipped on the wire after the handshake; a replayed
//! recorded stream; and no known plaintext on the wire.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmig_core::Channel;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_transport::{
    AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, TlsIdentity, TransportError, connect,
};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

const T: Duration = Duration::from_secs(20);

fn key(b: u8) -> AuthKey {
    AuthKey::new([b; 32]).unwrap()
}

/// A CA, and a certificate for `names` signed by it: PEM texts.
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

    /// An identity with a certificate for `names`, trusting `trusted`.
    fn identity(&self, names: &[&str], trusted: &Ca) -> TlsIdentity {
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
            trusted.cert.pem().as_bytes(),
        )
        .unwrap()
    }
}

/// The configs of the listening and the dialing side for each mode.
fn configs(mode: &str) -> (ChannelConfig, ChannelConfig) {
    let (l, d) = match mode {
        "psk" => (ChannelConfig::new(key(1)), ChannelConfig::new(key(1))),
        "plaintext" => (
            ChannelConfig::plaintext_trusted_link_only(key(1)),
            ChannelConfig::plaintext_trusted_link_only(key(1)),
        ),
        "tls" => {
            let ca = Ca::new();
            (
                ChannelConfig::tls(ca.identity(&["127.0.0.1"], &ca)),
                ChannelConfig::tls(ca.identity(&["dialer.test"], &ca)),
            )
        }
        m => panic!("mode {m}"),
    };
    (l.with_data_streams(2), d.with_data_streams(2))
}

/// A listener with a hook collecting the Debug of every refusal.
fn listen(mut cfg: ChannelConfig) -> (Listener, SocketAddr, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    cfg = cfg.on_reject(move |r| {
        let _ = tx.lock().unwrap().send(format!("{:?}", r.error));
    });
    let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), cfg).unwrap();
    let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
        unreachable!()
    };
    (l, addr, rx)
}

/// A channel pair dialed to `target` (the listener, or a proxy before it).
fn dial_pair(
    listener: &Listener,
    target: SocketAddr,
    dialer: ChannelConfig,
) -> (Arc<StreamChannel>, Arc<StreamChannel>) {
    let d = thread::spawn(move || connect(&Endpoint::Tcp(target), dialer));
    let b = listener.accept_timeout(T);
    let a = d.join().unwrap();
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("dialer: {:?}\nlistener: {:?}", a.err(), b.err()),
    };
    (Arc::new(a), Arc::new(b))
}

/// A page batch whose 4 KiB pages all hold `PATTERN` over and over.
const PATTERN: &[u8; 16] = b"KNOWN-PLAINTEXT!";

fn pattern_pages(chunk: u64) -> PageBatch {
    let data: Vec<u8> = PATTERN.iter().copied().cycle().take(16 * 4096).collect();
    PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), chunk * 16, 16),
        data: PageData::Raw(Bytes::from(data)),
    }
}

fn both_ways(a: &StreamChannel, b: &StreamChannel, tag: &str) {
    a.send(&Message::Ready).unwrap();
    assert_eq!(b.recv(Some(T)).unwrap(), Some(Message::Ready), "{tag}");
    b.send(&Message::Commit).unwrap();
    assert_eq!(a.recv(Some(T)).unwrap(), Some(Message::Commit), "{tag}");
    for lane in 0..2 {
        a.send_pages(lane, &pattern_pages(lane as u64)).unwrap();
    }
    a.flush().unwrap();
    for _ in 0..2 {
        match b.recv(Some(T)).unwrap() {
            Some(Message::Pages(p)) => assert_eq!(p, pattern_pages(p.run.first / 16), "{tag}"),
            other => panic!("{tag}: {other:?}"),
        }
    }
    b.send_urgent(&Message::Ready).unwrap();
    assert_eq!(a.recv(Some(T)).unwrap(), Some(Message::Ready), "{tag}");
}

#[test]
fn every_mode_carries_messages_both_ways_and_reconnects() {
    for mode in ["psk", "tls", "plaintext"] {
        let (lc, dc) = configs(mode);
        let (listener, addr, rejected) = listen(lc);
        let (a, b) = dial_pair(&listener, addr, dc);
        let want = match mode {
            "psk" => "Noise_NNpsk0_25519_AESGCM_SHA256",
            // Both sides offer the cheaper standard suite first.
            "tls" => "TLS 1.3 TLS13_AES_128_GCM_SHA256",
            _ => "none",
        };
        assert!(a.cipher().starts_with(want), "{mode}: {}", a.cipher());
        assert!(b.cipher().starts_with(want), "{mode}: {}", b.cipher());
        both_ways(&a, &b, mode);
        let bb = b.clone();
        let l = thread::spawn(move || bb.reconnect());
        a.reconnect().unwrap();
        l.join().unwrap().unwrap();
        assert_eq!((a.generation(), b.generation()), (1, 1));
        both_ways(&a, &b, mode);
        assert!(rejected.try_recv().is_err(), "{mode}: nothing refused");
    }
}

/// A relaying proxy in front of a listener. It records what each
/// connection's dialer sent (in accept order) and everything both ways,
/// and, once `corrupt` is set, flips one byte of the next chunk it relays
/// from a dialer.
struct Proxy {
    addr: SocketAddr,
    /// Dialer → listener bytes, per connection.
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Every byte relayed, both ways.
    all: Arc<Mutex<Vec<u8>>>,
    corrupt: Arc<AtomicBool>,
    flipped: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = Self {
            addr: l.local_addr().unwrap(),
            sent: Arc::default(),
            all: Arc::default(),
            corrupt: Arc::default(),
            flipped: Arc::default(),
        };
        let (sent, all, corrupt, flipped) = (
            p.sent.clone(),
            p.all.clone(),
            p.corrupt.clone(),
            p.flipped.clone(),
        );
        thread::spawn(move || {
            // Two channels of four streams at most; each relay ends when its sockets close.
            for c in l.incoming().take(8) {
                let Ok(c) = c else { return };
                let s = TcpStream::connect(target).unwrap();
                let i = {
                    let mut v = sent.lock().unwrap();
                    v.push(Vec::new());
                    v.len() - 1
                };
                let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                let (all2, sent2, corrupt2, flipped2) =
                    (all.clone(), sent.clone(), corrupt.clone(), flipped.clone());
                thread::spawn(move || relay(c, s, &all2, Some((&sent2, i, &corrupt2, &flipped2))));
                let all3 = all.clone();
                thread::spawn(move || relay(s2, c2, &all3, None));
            }
        });
        p
    }

    fn recorded(&self, i: usize) -> Vec<u8> {
        self.sent.lock().unwrap()[i].clone()
    }
}

type Upstream<'a> = (
    &'a Mutex<Vec<Vec<u8>>>,
    usize,
    &'a AtomicBool,
    &'a AtomicUsize,
);

fn relay(mut from: TcpStream, mut to: TcpStream, all: &Mutex<Vec<u8>>, up: Option<Upstream<'_>>) {
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        all.lock().unwrap().extend_from_slice(&buf[..n]);
        if let Some((sent, i, corrupt, flipped)) = up {
            sent.lock().unwrap()[i].extend_from_slice(&buf[..n]);
            if corrupt.swap(false, Ordering::AcqRel) {
                buf[n / 2] ^= 0x01;
                flipped.fetch_add(1, Ordering::AcqRel);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn frames_on_the_wire_hide_a_known_page_pattern() {
    for mode in ["psk", "tls", "plaintext"] {
        let (lc, dc) = configs(mode);
        let (listener, addr, _) = listen(lc);
        let proxy = Proxy::start(addr);
        let (a, b) = dial_pair(&listener, proxy.addr, dc);
        both_ways(&a, &b, mode);
        drop((a, b));
        let all = proxy.all.lock().unwrap().clone();
        assert!(
            all.len() > 2 * 16 * 4096,
            "{mode}: the pages crossed the proxy"
        );
        // The check itself works: in clear, the pattern is there.
        assert_eq!(contains(&all, PATTERN), mode == "plaintext", "{mode}");
    }
}

/// `pages` pages numbered from `first`, each byte telling its offset (so a
/// piece sealed from the wrong place, dropped or sent twice shows).
fn numbered_pages(first: u64, pages: u32) -> PageBatch {
    let data: Vec<u8> = (0..pages as usize * 4096)
        .map(|i| (i as u8) ^ ((i >> 8) as u8) ^ ((i >> 16) as u8) ^ (first as u8))
        .collect();
    PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), first, pages),
        data: PageData::Raw(Bytes::from(data)),
    }
}

/// Frames smaller and larger than a data lane's buffer, mixed on one lane:
/// they arrive whole and in order in every mode (a large frame leaves after
/// what the lane buffered, in pieces through the cipher).
#[test]
fn small_and_whole_chunk_frames_arrive_in_order_in_every_mode() {
    // 16 pages (buffered), 80 pages (above the 256 KiB lane buffer: written
    // directly), 1 page, 64 pages (exactly a chunk), 3 pages.
    let sizes = [16u32, 80, 1, 64, 3];
    for mode in ["psk", "tls", "plaintext"] {
        let (lc, dc) = configs(mode);
        let (listener, addr, _) = listen(lc);
        let (a, b) = dial_pair(&listener, addr, dc);
        let mut first = 0;
        let mut sent = Vec::new();
        for n in sizes {
            let batch = numbered_pages(first, n);
            a.send_pages(0, &batch).unwrap();
            sent.push(batch);
            first += u64::from(n);
        }
        a.flush().unwrap();
        for want in &sent {
            match b.recv(Some(T)).unwrap() {
                Some(Message::Pages(p)) => assert!(
                    p == *want,
                    "{mode}: got pages {}+{}, want {}+{} (or their bytes differ)",
                    p.run.first,
                    p.run.count,
                    want.run.first,
                    want.run.count
                ),
                other => panic!("{mode}: {other:?}"),
            }
        }
    }
}

/// `recv` until something other than a timeout: the message or the error.
fn next(b: &StreamChannel) -> lmig_core::Result<Option<Message>> {
    let deadline = Instant::now() + T;
    loop {
        match b.recv(Some(Duration::from_millis(100))) {
            Ok(None) if Instant::now() < deadline => {}
            other => return other,
        }
    }
}

#[test]
fn a_byte_flipped_on_the_wire_fails_the_stream_with_an_integrity_error() {
    for mode in ["psk", "tls"] {
        for what in ["control", "pages"] {
            let (lc, dc) = configs(mode);
            let (listener, addr, _) = listen(lc);
            let proxy = Proxy::start(addr);
            let (a, b) = dial_pair(&listener, proxy.addr, dc);
            both_ways(&a, &b, mode);
            proxy.corrupt.store(true, Ordering::Release);
            if what == "control" {
                a.send(&Message::Ready).unwrap();
            } else {
                a.send_pages(1, &pattern_pages(7)).unwrap();
                a.flush().unwrap();
            }
            let got = next(&b);
            assert_eq!(proxy.flipped.load(Ordering::Acquire), 1, "{mode} {what}");
            let e = match got {
                Err(e) => e.to_string(),
                Ok(m) => panic!("{mode} {what}: a corrupted stream delivered {m:?}"),
            };
            assert!(e.contains("integrity check failed"), "{mode} {what}: {e}");
            // The channel stays failed; nothing is delivered later.
            assert!(b.recv(Some(Duration::from_millis(200))).is_err());
        }
    }
}

#[test]
fn a_replayed_recorded_stream_is_refused() {
    let (lc, dc) = configs("psk");
    let (listener, addr, rejected) = listen(lc.clone());
    let proxy = Proxy::start(addr);
    let (a, b) = dial_pair(&listener, proxy.addr, dc);
    both_ways(&a, &b, "psk");
    drop((a, b));
    // The whole control stream as the dialer sent it: handshake and records.
    let recorded = proxy.recorded(0);
    assert!(recorded.len() > 200);
    // To the same listener (its replay cache) and to a fresh one with the
    // same key (fresh nonces): refused at the proof, nothing accepted.
    let (fresh, fresh_addr, fresh_rejected) = listen(lc);
    for (l, target, hook) in [
        (&listener, addr, &rejected),
        (&fresh, fresh_addr, &fresh_rejected),
    ] {
        let mut s = TcpStream::connect(target).unwrap();
        s.write_all(&recorded).unwrap();
        let e = hook.recv_timeout(T).unwrap();
        assert!(e.starts_with("AuthFailed"), "{e}");
        let e = l.accept_timeout(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
    }
}

#[test]
fn a_wrong_key_or_another_mode_is_refused_on_both_sides() {
    for (dialer, why) in [
        (ChannelConfig::new(key(2)), "wrong key"),
        (
            ChannelConfig::plaintext_trusted_link_only(key(1)),
            "plaintext dialer",
        ),
    ] {
        let (_listener, addr, rejected) = listen(ChannelConfig::new(key(1)));
        let e = connect(&Endpoint::Tcp(addr), dialer).unwrap_err();
        assert!(
            matches!(e, TransportError::Rejected { .. }),
            "{why}: dialer: {e}"
        );
        let l = rejected.recv_timeout(T).unwrap();
        assert!(l.starts_with("AuthFailed"), "{why}: listener: {l}");
    }
}

#[test]
fn an_untrusted_certificate_is_refused_on_both_sides() {
    let (ca, other) = (Ca::new(), Ca::new());
    let cases = [
        // The dialer's certificate is from a CA the listener does not trust.
        (
            ca.identity(&["127.0.0.1"], &ca),
            other.identity(&["dialer.test"], &ca),
            "dialer untrusted",
        ),
        // The listener's certificate is from a CA the dialer does not trust.
        (
            other.identity(&["127.0.0.1"], &ca),
            ca.identity(&["dialer.test"], &ca),
            "listener untrusted",
        ),
        // Trusted, but not for the address dialed.
        (
            ca.identity(&["elsewhere.test"], &ca),
            ca.identity(&["dialer.test"], &ca),
            "listener misnamed",
        ),
    ];
    for (lid, did, why) in cases {
        let (listener, addr, rejected) = listen(ChannelConfig::tls(lid));
        let e = connect(&Endpoint::Tcp(addr), ChannelConfig::tls(did)).unwrap_err();
        assert!(
            matches!(e, TransportError::Tls { .. }),
            "{why}: dialer: {e}"
        );
        let l = rejected.recv_timeout(T).unwrap();
        assert!(l.starts_with("Tls"), "{why}: listener: {l}");
        let e = listener
            .accept_timeout(Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }), "{why}: {e}");
    }
    // A TLS dialer at a PSK listener: refused, not hung.
    let (listener, addr, rejected) = listen(ChannelConfig::new(key(1)));
    let mut c = ChannelConfig::tls(ca.identity(&["dialer.test"], &ca));
    c.handshake_timeout = Duration::from_secs(5);
    assert!(connect(&Endpoint::Tcp(addr), c).is_err());
    assert!(rejected.recv_timeout(T).is_ok());
    drop(listener);
}

/// `n` bytes numbered from `seed` (no two queues alike).
fn queue_bytes(n: usize, seed: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// A TCP record (the samples' first) with id `id`, `send` bytes queued to
/// send (pattern `seed`, the first `unsent` of them never sent) and `recv`
/// bytes received (pattern `!(id as u8)`), its sequence numbers to match.
fn queued_record(
    id: u64,
    send: usize,
    seed: u8,
    unsent: usize,
    recv: usize,
) -> lmig_core::model::SocketRecord {
    use lmig_core::model::SocketRecord;
    let mut c = lmig_transport::fuzzing::sample_records()
        .into_iter()
        .find_map(|r| match r {
            SocketRecord::Tcp(c) => Some(c),
            _ => None,
        })
        .expect("the samples hold a TCP record");
    c.id = id;
    c.send_queue = queue_bytes(send, seed);
    c.unsent_len = unsent as u32;
    c.recv_queue = queue_bytes(recv, !(id as u8));
    let wup = c.window.map_or(0, |w| w.rcv_wup);
    c.rcv_seq = wup.wrapping_sub(recv as u32);
    SocketRecord::Tcp(c)
}

/// Socket records whose queues are several MiB (shared with the frames
/// rather than copied into the message, and read at the other end into one
/// buffer per frame) arrive whole and in order in every mode: each queue's
/// every byte once, in its place, and the message after them.
#[test]
fn megabyte_socket_queues_arrive_whole_in_every_mode() {
    use lmig_core::model::SocketRecord;
    let template = lmig_transport::fuzzing::sample_records()
        .into_iter()
        .find_map(|r| match r {
            SocketRecord::Tcp(c) => Some(c),
            _ => None,
        })
        .expect("the samples hold a TCP record");
    // (send queue, receive queue) per record: large, small, and one of each.
    let sizes = [(6 << 20, 3 << 20), (100, 0), (0, 5 << 20), (9 << 20, 4096)];
    let records: Vec<SocketRecord> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(send, recv))| {
            let mut c = template.clone();
            c.id = i as u64;
            c.send_queue = queue_bytes(send, i as u8);
            c.unsent_len = (send / 3) as u32;
            c.recv_queue = queue_bytes(recv, !(i as u8));
            // The sample's window was updated at the end of its queue.
            let wup = c.window.map_or(0, |w| w.rcv_wup);
            c.rcv_seq = wup.wrapping_sub(recv as u32);
            SocketRecord::Tcp(c)
        })
        .collect();
    let batches = [records[..2].to_vec(), records[2..].to_vec()];
    for mode in ["psk", "tls", "plaintext"] {
        let (lc, dc) = configs(mode);
        let (listener, addr, _) = listen(lc);
        let (a, b) = dial_pair(&listener, addr, dc);
        for (i, batch) in batches.iter().enumerate() {
            a.send(&Message::Sockets {
                records: batch.clone(),
                last: i + 1 == batches.len(),
            })
            .unwrap();
        }
        a.send(&Message::Ready).unwrap();
        for (i, batch) in batches.iter().enumerate() {
            match next(&b).unwrap() {
                Some(Message::Sockets { records, last }) => {
                    assert_eq!(last, i + 1 == batches.len(), "{mode}");
                    assert!(records == *batch, "{mode}: batch {i} differs");
                }
                other => panic!("{mode}: batch {i}: {other:?}"),
            }
        }
        assert_eq!(next(&b).unwrap(), Some(Message::Ready), "{mode}");
    }
}

/// With receive memory warmed for the queues ([`Channel::warm_receive`],
/// the destination's answer to the source's `QueueEstimate`), a socket
/// batch that fits is read into it and one larger than what is left gets a
/// buffer of its own; after an estimate of zero nothing is warmed. Every
/// queue arrives whole and in order in every mode.
#[test]
fn socket_queues_arrive_whole_through_the_warmed_receive_area() {
    let record = |i: usize, send: usize, recv: usize| {
        queued_record(i as u64, send, 3 * i as u8, send / 2, recv)
    };
    // 9 MiB that fit the 10 MiB warmed for an estimate of 8 MiB, then 7 MiB
    // that do not fit what is left.
    let fits = vec![record(0, 6 << 20, 3 << 20)];
    let too_big = vec![record(1, 5 << 20, 0), record(2, 0, 2 << 20)];
    for mode in ["psk", "tls", "plaintext"] {
        let (lc, dc) = configs(mode);
        let (listener, addr, _) = listen(lc);
        let (a, b) = dial_pair(&listener, addr, dc);
        b.warm_receive(8 << 20);
        assert_eq!(b.warm_left(), 10 << 20, "{mode}: a quarter more than asked");
        let send_both = |a: &StreamChannel| {
            for (records, last) in [(&fits, false), (&too_big, true)] {
                a.send(&Message::Sockets {
                    records: records.clone(),
                    last,
                })
                .unwrap();
            }
            a.send(&Message::Ready).unwrap();
        };
        let receive_both = |b: &StreamChannel| {
            for (i, (batch, last)) in [(&fits, false), (&too_big, true)].into_iter().enumerate() {
                match next(b).unwrap() {
                    Some(Message::Sockets { records, last: l }) => {
                        assert_eq!(l, last, "{mode}");
                        assert!(records == *batch, "{mode}: batch {i} differs");
                    }
                    other => panic!("{mode}: batch {i}: {other:?}"),
                }
            }
            assert_eq!(next(b).unwrap(), Some(Message::Ready), "{mode}");
        };
        send_both(&a);
        receive_both(&b);
        let used = (10 << 20) - b.warm_left();
        assert!(
            (9 << 20..(9 << 20) + (64 << 10)).contains(&used),
            "{mode}: the first batch (9 MiB) came from the area, the second did not: {used} used"
        );
        // An estimate of zero gives the area back; the queues still arrive.
        b.warm_receive(0);
        assert_eq!(b.warm_left(), 0, "{mode}");
        send_both(&a);
        receive_both(&b);
        assert_eq!(b.warm_left(), 0, "{mode}");
    }
}

/// A `QueueEstimate` over the protocol's cap is refused by the sender and
/// by the receiver's decoder (it sizes memory the receiver writes at once).
#[test]
fn a_hostile_queue_estimate_is_refused() {
    use lmig_core::protocol::MAX_QUEUE_ESTIMATE;
    use lmig_transport::wire::{Kind, parse_message_body};
    let ok = parse_message_body(
        Kind::QueueEstimate,
        Bytes::copy_from_slice(&MAX_QUEUE_ESTIMATE.to_le_bytes()),
    );
    assert_eq!(
        ok.unwrap(),
        Message::QueueEstimate {
            bytes: MAX_QUEUE_ESTIMATE
        }
    );
    for bad in [MAX_QUEUE_ESTIMATE + 1, u64::MAX] {
        let e = parse_message_body(
            Kind::QueueEstimate,
            Bytes::copy_from_slice(&bad.to_le_bytes()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("queue estimate"), "{e}");
    }
    let short = parse_message_body(Kind::QueueEstimate, Bytes::from_static(&[1, 2, 3]));
    assert!(short.is_err(), "a short estimate is refused");
    let (lc, dc) = configs("psk");
    let (listener, addr, _) = listen(lc);
    let (a, b) = dial_pair(&listener, addr, dc);
    let e = a
        .send(&Message::QueueEstimate {
            bytes: MAX_QUEUE_ESTIMATE + 1,
        })
        .unwrap_err();
    assert!(
        format!("{e} {e:?}").contains("queue estimate"),
        "refused by the encoder: {e:?}"
    );
    a.send(&Message::QueueEstimate { bytes: 4096 }).unwrap();
    assert_eq!(
        next(&b).unwrap(),
        Some(Message::QueueEstimate { bytes: 4096 }),
        "the channel still works"
    );
}

/// The freeze's socket batches spread over the data lanes
/// (`Channel::send_lane`), sent from one thread per lane at once as the
/// source's freeze does, through the warmed receive area: in every mode
/// each record arrives exactly once and whole, each lane's batches in the
/// order they were sent, each lane's end after its own batches; pages sent
/// on the same lanes meanwhile arrive whole too.
#[test]
fn socket_batches_on_the_data_lanes_arrive_whole_once_and_in_lane_order_in_every_mode() {
    use lmig_core::model::SocketRecord;
    let record =
        |id: u64, send: usize, recv: usize| queued_record(id, send, id as u8, send / 4, recv);
    // Per lane: batches of about a MiB (ids lane*100 + i), one small.
    let batches = |lane: u64| -> Vec<Vec<SocketRecord>> {
        (0..5u64)
            .map(|i| {
                let id = lane * 100 + i;
                let size = if i == 2 {
                    64
                } else {
                    (1 << 20) + 4096 * i as usize
                };
                vec![record(id, size, size / 3)]
            })
            .collect()
    };
    let id_of = |r: &SocketRecord| match r {
        SocketRecord::Tcp(c) => c.id,
        other => panic!("{other:?}"),
    };
    for mode in ["psk", "tls", "plaintext"] {
        let (lc, dc) = configs(mode);
        let (listener, addr, _) = listen(lc);
        let (a, b) = dial_pair(&listener, addr, dc);
        assert_eq!((a.data_lanes(), b.data_lanes()), (2, 2), "{mode}");
        b.warm_receive(8 << 20);
        thread::scope(|s| {
            for lane in 0..2u64 {
                let a = &a;
                s.spawn(move || {
                    for (i, records) in batches(lane).into_iter().enumerate() {
                        a.send_lane(
                            lane as usize,
                            &Message::Sockets {
                                records,
                                last: false,
                            },
                        )
                        .unwrap();
                        a.send_pages(lane as usize, &numbered_pages(lane * 64 + i as u64, 1))
                            .unwrap();
                    }
                    let end = Message::Sockets {
                        records: Vec::new(),
                        last: true,
                    };
                    a.send_lane(lane as usize, &end).unwrap();
                    a.flush().unwrap();
                });
            }
        });
        // Lane of an id: id / 100; per lane, what arrived in order.
        let mut got: [Vec<SocketRecord>; 2] = Default::default();
        let mut ended = [false; 2];
        let mut pages = 0;
        while ended != [true, true] || pages < 10 {
            match next(&b).unwrap() {
                Some(Message::Sockets { records, last }) if last => {
                    assert!(records.is_empty(), "{mode}");
                    // Which lane ended: the one whose batches are all in
                    // (an end never overtakes its own lane's batches).
                    let lane = (0..2).find(|&l| !ended[l] && got[l].len() == 5);
                    ended[lane.unwrap_or_else(|| panic!("{mode}: an end before its batches"))] =
                        true;
                }
                Some(Message::Sockets { records, .. }) => {
                    for r in records {
                        let lane = (id_of(&r) / 100) as usize;
                        assert!(!ended[lane], "{mode}: a batch after its lane's end");
                        got[lane].push(r);
                    }
                }
                Some(Message::Pages(p)) => {
                    assert_eq!(p, numbered_pages(p.run.first, 1), "{mode}");
                    pages += 1;
                }
                other => panic!("{mode}: {other:?}"),
            }
        }
        for lane in 0..2u64 {
            let want: Vec<SocketRecord> = batches(lane).into_iter().flatten().collect();
            assert!(
                got[lane as usize] == want,
                "{mode}: lane {lane}'s records differ or came out of order"
            );
        }
        b.warm_receive(0);
    }
}
