//! Fuzz target bodies, shared by `fuzz/fuzz_targets/*.rs` (cargo-fuzz) and
//! by `tests/fuzz_corpus.rs`, which replays the checked-in corpus and a
//! bounded random run on stable.
//!
//! Every body decodes arbitrary bytes; when they decode, it encodes the
//! result, decodes that again and asserts both values are equal. Decoders
//! must return errors, never panic; a panic here is a bug.
//!
//! Compiled only with the feature `fuzzing` (fuzz/ and this crate's tests
//! turn it on); not stable API.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use lmig_core::model::{
    PageRun, ProgramState, RegionId, RegionInfo, RegionLayout, SockOpts, SocketKind, SocketPrep,
    SocketRecord, TcpConnState, TcpListenState, TcpOpts, TcpRepairWindow, TcpStateKind,
    UdpDatagram, UdpSockState,
};
use lmig_core::protocol::{
    Handover, Message, PageBatch, PageData, RegionDigest, RoundSummary, Verification,
};
use lmig_core::split::{HostId, SplitMessage};

use crate::wire::{
    Accept, Challenge, Codec, Frame, FrameDecoder, FrameRepr, Handshake, Hello, KeyExchange, Kind,
    MessageDecoder, Proof, Reject, RejectReason, StreamRole, WireItem, encode_handshake,
    encode_message, parse_message_body,
};

/// Every fuzz target, as named in `fuzz/fuzz_targets/` and `fuzz/targets.txt`.
pub const TARGETS: &[&str] = &[
    "frame",
    "stream",
    "msg_regions",
    "msg_pages",
    "msg_round_end",
    "msg_socket_plan",
    "msg_sockets",
    "msg_state",
    "msg_handover",
    "msg_ready",
    "msg_commit",
    "msg_page_request",
    "msg_digests",
    "msg_resync",
    "msg_prepared",
    "msg_done",
    "msg_abort",
    "msg_split",
    "msg_queue_estimate",
    "msg_sockets_active",
    "msg_demand_settled",
    "sock_tcp_conn",
    "sock_tcp_listen",
    "sock_udp",
    "sock_record",
    "sock_prep",
    "handshake",
    "noise_record",
];

/// Run target `name` on `data`; false if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "frame" => frame(data),
        "stream" => stream(data),
        "sock_tcp_conn" => record::<TcpConnState>(data),
        "sock_tcp_listen" => record::<TcpListenState>(data),
        "sock_udp" => record::<UdpSockState>(data),
        "sock_record" => record::<SocketRecord>(data),
        "sock_prep" => record::<SocketPrep>(data),
        "handshake" => handshake(data),
        "noise_record" => noise_record(data),
        other => match message_kind(other) {
            Some(kind) => message(kind, data),
            None => return false,
        },
    }
    true
}

fn message_kind(target: &str) -> Option<Kind> {
    Some(match target {
        "msg_regions" => Kind::Regions,
        "msg_pages" => Kind::Pages,
        "msg_round_end" => Kind::RoundEnd,
        "msg_socket_plan" => Kind::SocketPlan,
        "msg_sockets" => Kind::Sockets,
        "msg_state" => Kind::State,
        "msg_handover" => Kind::Handover,
        "msg_ready" => Kind::Ready,
        "msg_commit" => Kind::Commit,
        "msg_page_request" => Kind::PageRequest,
        "msg_digests" => Kind::Digests,
        "msg_resync" => Kind::Resync,
        "msg_prepared" => Kind::Prepared,
        "msg_done" => Kind::Done,
        "msg_abort" => Kind::Abort,
        "msg_split" => Kind::Split,
        "msg_queue_estimate" => Kind::QueueEstimate,
        "msg_sockets_active" => Kind::SocketsActive,
        "msg_demand_settled" => Kind::DemandSettled,
        _ => return None,
    })
}

/// Frames: split a byte stream into frames; each header re-emits to the same bytes.
pub fn frame(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut dec = FrameDecoder::new();
    while let Ok(Some((repr, payload))) = dec.decode(&mut buf) {
        let mut again = repr.to_bytes().to_vec();
        again.extend_from_slice(&payload);
        let view = Frame::new_checked(&again[..]).expect("re-emitted frame is complete");
        assert_eq!(
            FrameRepr::parse(&view).expect("re-emitted frame parses"),
            repr
        );
    }
    // The same bytes through the one-shot parser.
    let view = Frame::new_unchecked(data);
    if let Ok(repr) = FrameRepr::parse(&view) {
        assert!(data.len() >= 16 + repr.length as usize);
    }
}

/// The stream decoder, fed in pieces: whatever decodes re-encodes and decodes equal.
pub fn stream(data: &[u8]) {
    let split = data.first().map_or(1, |b| usize::from(*b % 64) + 1);
    let mut dec = MessageDecoder::new();
    let mut buf = BytesMut::new();
    for piece in data.get(1..).unwrap_or_default().chunks(split) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(item)) => check_item(&item),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn check_item(item: &WireItem) {
    let wire = match item {
        WireItem::Message(m) => encode_message(m).expect("a decoded message encodes"),
        WireItem::Handshake(h) => encode_handshake(h).expect("a decoded handshake encodes"),
    };
    let mut buf = BytesMut::from(&wire.to_vec()[..]);
    let back = MessageDecoder::new()
        .decode(&mut buf)
        .expect("re-encoded item decodes");
    assert_eq!(back.as_ref(), Some(item));
    assert!(buf.is_empty());
}

/// One message body of `kind`.
pub fn message(kind: Kind, data: &[u8]) {
    let Ok(msg) = parse_message_body(kind, Bytes::copy_from_slice(data)) else {
        return;
    };
    let wire = encode_message(&msg).expect("a decoded message encodes");
    let back =
        crate::wire::parse_message(Bytes::from(wire.to_vec())).expect("re-encoded message decodes");
    assert_eq!(back, msg);
}

/// One record.
pub fn record<T: Codec + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(v) = T::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = v.encode();
    assert_eq!(again.len(), v.buffer_len());
    assert_eq!(
        T::decode(Bytes::from(again)).expect("re-encoded record decodes"),
        v
    );
}

const HANDSHAKE_KINDS: [Kind; 6] = [
    Kind::Hello,
    Kind::Challenge,
    Kind::Proof,
    Kind::Accept,
    Kind::Reject,
    Kind::KeyExchange,
];

/// Handshake messages: the first byte picks the kind, the rest is the body.
pub fn handshake(data: &[u8]) {
    let Some((k, body)) = data.split_first() else {
        return;
    };
    let kind = HANDSHAKE_KINDS[usize::from(*k) % HANDSHAKE_KINDS.len()];
    let Ok(h) = Handshake::parse(kind, Bytes::copy_from_slice(body)) else {
        return;
    };
    assert_eq!(
        Handshake::parse(kind, h.emit()).expect("re-encoded handshake decodes"),
        h
    );
}

/// The Noise record layer ([`crate::noise`]), with the keys of a real
/// handshake: `data` read as a stream's ciphertext never decrypts (nobody
/// without the keys can forge a record) and never panics; `data` written
/// as plaintext reads back equal; the same with one byte flipped fails
/// with an integrity error and hands out nothing past the last good record.
pub fn noise_record(data: &[u8]) {
    use std::io::{Read, Write};
    let (dialer, listener) = crate::noise::keys_for_fuzzing();
    // Small reads (records opened in the reader's buffer) and large ones
    // (large records read into the caller's buffer and opened there).
    let read_all = |wire: &[u8], chunk: usize| -> std::io::Result<Vec<u8>> {
        let (mut r, _) = listener.clone().split(wire, std::io::sink());
        let mut got = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(got),
                n => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    for chunk in [4096, 1 << 17] {
        match read_all(data, chunk) {
            Ok(got) => assert!(
                got.is_empty(),
                "{} bytes decrypted from arbitrary input",
                got.len()
            ),
            Err(e) => assert!(e.kind() == std::io::ErrorKind::InvalidData, "{e}"),
        }
    }
    // `data`, and `data` repeated past 40 KB (a record large enough to be
    // opened in the caller's buffer).
    let long: Vec<u8> = data
        .iter()
        .copied()
        .cycle()
        .take(data.len() * (40_000 / (data.len() + 1) + 1))
        .collect();
    for plain in [data, &long[..]] {
        let (_, mut w) = dialer.clone().split(std::io::empty(), Vec::new());
        w.write_all(plain).expect("writing to a vector");
        let wire = w.into_inner();
        for chunk in [4096, 1 << 17] {
            assert_eq!(
                read_all(&wire, chunk).expect("own records read back"),
                plain
            );
        }
        if let Some(&b) = data.first() {
            let mut bad = wire.clone();
            let at = usize::from(b) * 7919 % bad.len();
            bad[at] ^= 1 << (b % 8);
            for chunk in [4096, 1 << 17] {
                assert!(
                    read_all(&bad, chunk).is_err(),
                    "a flipped byte at {at} went unnoticed"
                );
            }
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1)))
}

/// Sample records, valid, covering every variant and option.
pub fn sample_records() -> Vec<SocketRecord> {
    let conn = TcpConnState {
        id: 7,
        local: addr("198.51.100.1:80"),
        peer: addr("198.51.100.9:40000"),
        state: TcpStateKind::Established,
        snd_seq: 1000,
        rcv_seq: 5000,
        send_queue: Bytes::from_static(b"hello world"),
        unsent_len: 5,
        recv_queue: Bytes::from_static(b"req"),
        mss: 1448,
        snd_wscale: 7,
        rcv_wscale: 7,
        wscale_ok: true,
        sack_ok: true,
        timestamps_ok: true,
        timestamp: 123,
        window: Some(TcpRepairWindow {
            snd_wl1: 5003,
            snd_wnd: 65535,
            max_window: 65535,
            rcv_wnd: 65535,
            rcv_wup: 5003,
        }),
        sock: SockOpts {
            reuse_addr: true,
            rcvbuf: 1 << 20,
            bind_device: Some("eth0".into()),
            ..SockOpts::default()
        },
        tcp: TcpOpts {
            nodelay: true,
            keepalive: true,
            keep_idle: 60,
            congestion: Some("cubic".into()),
            ..TcpOpts::default()
        },
    };
    let conn6 = TcpConnState {
        id: 8,
        local: addr("[2001:db8::1]:443"),
        peer: addr("[2001:db8::2]:50000"),
        state: TcpStateKind::CloseWait,
        window: None,
        ..conn.clone()
    };
    vec![
        SocketRecord::Tcp(conn),
        SocketRecord::Tcp(conn6),
        SocketRecord::Listen(TcpListenState {
            id: 1,
            local: addr("198.51.100.1:80"),
            backlog: 128,
            sock: SockOpts::default(),
            tcp: TcpOpts::default(),
        }),
        SocketRecord::Udp(UdpSockState {
            id: 3,
            local: addr("198.51.100.1:53"),
            peer: Some(addr("198.51.100.2:53")),
            sock: SockOpts::default(),
            recv_queue: vec![UdpDatagram {
                from: addr("198.51.100.2:53"),
                data: Bytes::from_static(b"query"),
            }],
        }),
    ]
}

/// Sample messages: every `Message` variant at least once.
pub fn sample_messages() -> Vec<Message> {
    let layout = RegionLayout::new(vec![
        RegionInfo {
            id: RegionId(0),
            len: 1 << 20,
            page_size: 4096,
            fixed_addr: None,
        },
        RegionInfo {
            id: RegionId(1),
            len: 4 << 20,
            page_size: 2 << 20,
            fixed_addr: Some(0x7f00_0000_0000),
        },
    ])
    .unwrap_or_default();
    let records = sample_records();
    vec![
        Message::Regions(layout),
        Message::Pages(PageBatch {
            round: 0,
            run: PageRun::new(RegionId(0), 64, 2),
            data: PageData::Raw(Bytes::from(
                (0..8192u32).map(|i| i as u8).collect::<Vec<_>>(),
            )),
        }),
        Message::Pages(PageBatch {
            round: 2,
            run: PageRun::new(RegionId(0), 128, 64),
            data: PageData::Zero,
        }),
        Message::RoundEnd(RoundSummary {
            round: 1,
            pages: 1000,
            zero_pages: 10,
            dirty_pages: 50,
        }),
        Message::SocketPlan(records.iter().map(SocketRecord::prep).collect()),
        Message::SocketPlan(vec![SocketPrep {
            id: 4,
            kind: SocketKind::Udp,
            local: addr("[2001:db8::1]:53"),
            peer: None,
            sock: None,
            tcp: None,
            ts_clock: None,
        }]),
        Message::Sockets {
            records: records.clone(),
            last: false,
        },
        Message::Sockets {
            records: Vec::new(),
            last: true,
        },
        Message::State(ProgramState::new(3, Bytes::from_static(b"program state"))),
        Message::Handover(Handover {
            pages_total: 4096,
            postcopy: vec![
                PageRun::new(RegionId(0), 0, 64),
                PageRun::new(RegionId(1), 1, 1),
            ],
            verify: true,
        }),
        Message::Ready,
        Message::Commit,
        Message::PageRequest(PageRun::new(RegionId(1), 1, 1)),
        Message::Digests(vec![RegionDigest {
            region: RegionId(0),
            hash: [0x42; 32],
        }]),
        Message::Resync(vec![PageRun::new(RegionId(0), 5, 3)]),
        Message::Prepared { placed: 12 },
        Message::QueueEstimate { bytes: 33 << 20 },
        Message::Done(Verification::Verified),
        Message::Done(Verification::Mismatch(RegionId(1))),
        Message::Done(Verification::NotChecked),
        Message::Abort {
            reason: "the destination ran out of memory".into(),
        },
        // Last: a sample added here leaves the other seeds' numbers.
        Message::SocketPlan(vec![SocketPrep {
            id: 5,
            kind: SocketKind::TcpEstablished,
            local: addr("198.51.100.1:80"),
            peer: Some(addr("198.51.100.2:40000")),
            sock: Some(SockOpts::default()),
            tcp: Some(TcpOpts {
                nodelay: true,
                ..TcpOpts::default()
            }),
            ts_clock: Some(0x1234_5678),
        }]),
    ]
    .into_iter()
    .chain(sample_split_messages().into_iter().map(Message::Split))
    // Added last, in the order of their kinds: the seeds before keep their numbers.
    .chain([Message::SocketsActive, Message::DemandSettled])
    .collect()
}

/// Sample split-memory messages: every `SplitMessage` variant at least once.
pub fn sample_split_messages() -> Vec<SplitMessage> {
    let run = PageRun::new(RegionId(0), 8, 4);
    vec![
        SplitMessage::Attach {
            from: HostId(0),
            to: HostId(2),
            region: RegionInfo {
                id: RegionId(0),
                len: 1 << 20,
                page_size: 4096,
                fixed_addr: None,
            },
        },
        SplitMessage::Fetch { epoch: 3, run },
        SplitMessage::Data {
            from: HostId(2),
            epoch: 3,
            batch: PageBatch {
                round: 0,
                run: PageRun::new(RegionId(0), 8, 1),
                data: PageData::Raw(Bytes::from(vec![0x5au8; 4096])),
            },
        },
        SplitMessage::Data {
            from: HostId(1),
            epoch: 0,
            batch: PageBatch {
                round: 0,
                run,
                data: PageData::Zero,
            },
        },
        SplitMessage::NotHeld {
            from: HostId(2),
            epoch: 3,
            run,
        },
        SplitMessage::Sync { seq: 9 },
        SplitMessage::Synced { seq: 9, pages: 64 },
        SplitMessage::Send {
            to: HostId(4),
            endpoint: "198.51.100.4:7000".into(),
            epoch: 5,
            runs: vec![run, PageRun::new(RegionId(0), 100, 64)],
        },
        SplitMessage::Sent {
            from: HostId(1),
            to: HostId(4),
            epoch: 5,
            pages: 68,
            missing: 0,
        },
        SplitMessage::Relay {
            to: HostId(0),
            endpoint: "[2001:db8::1]:7000".into(),
            epoch: 6,
        },
        SplitMessage::Forget {
            epoch: 7,
            runs: vec![run],
        },
        SplitMessage::Refused {
            reason: "region geometry differs".into(),
        },
    ]
}

/// Sample handshake messages.
pub fn sample_handshakes() -> Vec<Handshake> {
    vec![
        Handshake::Hello(Hello {
            session: [0x11; 16],
            role: StreamRole::Data,
            index: 1,
            data_streams: 4,
            generation: 0,
            nonce: [0x22; 32],
        }),
        Handshake::Challenge(Challenge { nonce: [0x33; 32] }),
        Handshake::Proof(Proof { tag: [0x44; 32] }),
        Handshake::Accept(Accept { tag: [0x55; 32] }),
        Handshake::Reject(Reject {
            reason: RejectReason::AuthFailed,
        }),
        Handshake::KeyExchange(KeyExchange {
            message: Bytes::from_static(&[0x66; 48]),
        }),
    ]
}

/// Valid seed inputs for target `name`, built by encoding the samples.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    let msgs = sample_messages();
    let frames = || {
        msgs.iter()
            .filter_map(|m| encode_message(m).ok())
            .map(|e| e.to_vec())
    };
    match name {
        "frame" => frames().collect(),
        "stream" => {
            let mut all = vec![7u8];
            for h in sample_handshakes() {
                all.extend(encode_handshake(&h).map(|e| e.to_vec()).unwrap_or_default());
            }
            for f in frames() {
                all.extend(f);
            }
            vec![all]
        }
        "sock_tcp_conn" | "sock_tcp_listen" | "sock_udp" | "sock_record" | "sock_prep" => {
            sample_records()
                .into_iter()
                .filter_map(|r| match (name, r) {
                    ("sock_tcp_conn", SocketRecord::Tcp(s)) => Some(s.encode()),
                    ("sock_tcp_listen", SocketRecord::Listen(s)) => Some(s.encode()),
                    ("sock_udp", SocketRecord::Udp(s)) => Some(s.encode()),
                    ("sock_record", r) => Some(r.encode()),
                    ("sock_prep", r) => Some(r.prep().encode()),
                    _ => None,
                })
                .collect()
        }
        "handshake" => sample_handshakes()
            .iter()
            .map(|h| {
                let k = HANDSHAKE_KINDS
                    .iter()
                    .position(|k| *k == h.kind())
                    .unwrap_or(0) as u8;
                let mut v = vec![k];
                v.extend_from_slice(&h.emit());
                v
            })
            .collect(),
        "noise_record" => vec![
            b"hello".to_vec(),
            frames().next().unwrap_or_default(),
            (0..70_000u32).map(|i| (i % 251) as u8).collect(),
        ],
        other => match message_kind(other) {
            Some(kind) => frames()
                .filter(|f| f.get(6) == Some(&(kind as u8)))
                .map(|f| f[16..].to_vec())
                .collect(),
            None => Vec::new(),
        },
    }
}
