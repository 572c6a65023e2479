//! Channels over memory, Unix sockets and loopback TCP: every lane, ordering,
//! authentication failures, a vanished peer, the bandwidth limit, reconnection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lmig_core::Channel;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::{CHUNK_PAGES, Message, PageBatch, PageData};
use lmig_transport::fuzzing::sample_messages;
use lmig_transport::wire::{FrameDecoder, Kind, MessageDecoder, WireItem, encode_message};
use lmig_transport::{
    AuthKey, ChannelConfig, Endpoint, Listener, Security, StreamChannel, TransportError, connect,
    pair,
};

const T: Duration = Duration::from_secs(20);

fn key(b: u8) -> AuthKey {
    AuthKey::new([b; 32]).unwrap()
}

fn config(streams: usize) -> ChannelConfig {
    let mut c = ChannelConfig::new(key(1)).with_data_streams(streams);
    c.handshake_timeout = Duration::from_secs(10);
    c
}

/// A config whose rejection hook sends `(peer, Debug of the error)` down a channel.
fn hooked(streams: usize) -> (ChannelConfig, mpsc::Receiver<(String, String)>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let c = config(streams).on_reject(move |r| {
        let _ = tx
            .lock()
            .unwrap()
            .send((r.peer.clone(), format!("{:?}", r.error)));
    });
    (c, rx)
}

/// The listener refused the stranger and keeps waiting: `accept_timeout`
/// ends with a timeout, not the stranger's error.
fn still_waiting(listener: &Listener) {
    let e = listener
        .accept_timeout(Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
}

fn tcp_pair(streams: usize) -> (StreamChannel, StreamChannel) {
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        config(streams),
    )
    .unwrap();
    let ep = listener.local_endpoint().clone();
    let d = thread::spawn(move || connect(&ep, config(streams)));
    let l = listener.accept_timeout(T).unwrap();
    (d.join().unwrap().unwrap(), l)
}

fn unix_pair(streams: usize) -> (StreamChannel, StreamChannel) {
    let path =
        std::env::temp_dir().join(format!("lmig-transport-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let ep = Endpoint::Unix(path.clone());
    let listener = Listener::bind(&ep, config(streams)).unwrap();
    let d = thread::spawn(move || connect(&ep, config(streams)));
    let l = listener.accept_timeout(T).unwrap();
    let _ = std::fs::remove_file(&path);
    (d.join().unwrap().unwrap(), l)
}

fn page(chunk: u64, seq: u32) -> PageBatch {
    let mut data = vec![seq as u8; 4096];
    data[..8].copy_from_slice(&chunk.to_le_bytes());
    PageBatch {
        round: seq,
        run: PageRun::new(RegionId(0), chunk * u64::from(CHUNK_PAGES), 1),
        data: PageData::Raw(Bytes::from(data)),
    }
}

/// Sends every sample message on the control lane, pages of several chunks
/// over every lane (several versions each), and urgent messages; checks
/// everything arrives and each chunk's versions arrive in order.
fn exercise(src: StreamChannel, dst: StreamChannel) {
    let src = Arc::new(src);
    let lanes = src.data_lanes();
    let chunks = 8u64;
    let versions = 20u32;
    let sender = {
        let src = src.clone();
        thread::spawn(move || {
            for m in sample_messages() {
                src.send(&m).unwrap();
            }
            for v in 0..versions {
                for c in 0..chunks {
                    src.send_pages(c as usize % lanes, &page(c, v)).unwrap();
                }
            }
            // Data lanes may hold small frames until flushed.
            src.flush().unwrap();
            src.send_urgent(&Message::PageRequest(PageRun::new(RegionId(9), 3, 1)))
                .unwrap();
            src.send(&Message::Commit).unwrap();
        })
    };
    let mut control = Vec::new();
    let mut last = vec![None::<u32>; chunks as usize];
    let mut pages = 0;
    let mut urgent = 0;
    let deadline = Instant::now() + T;
    while !(control.last() == Some(&Message::Commit)
        && pages == chunks * u64::from(versions)
        && urgent == 1)
    {
        assert!(Instant::now() < deadline, "timed out");
        match dst.recv(Some(T)).unwrap() {
            Some(Message::Pages(b))
                if b.run.count == 1
                    && b.run.first % u64::from(CHUNK_PAGES) == 0
                    && b.round < versions =>
            {
                let c = (b.run.first / u64::from(CHUNK_PAGES)) as usize;
                let PageData::Raw(d) = &b.data else {
                    panic!("raw pages")
                };
                assert_eq!(d[8], b.round as u8);
                assert!(
                    last[c].is_none_or(|p| p < b.round),
                    "chunk {c} out of order"
                );
                last[c] = Some(b.round);
                pages += 1;
            }
            Some(Message::PageRequest(r)) if r.region == RegionId(9) => urgent += 1,
            Some(m) => control.push(m),
            None => panic!("nothing within {T:?}"),
        }
    }
    sender.join().unwrap();
    let mut expected = sample_messages();
    expected.push(Message::Commit);
    // Sample page batches of other shapes also arrive (on the control lane).
    let names = |v: &[Message]| v.iter().map(Message::name).collect::<Vec<_>>();
    assert!(
        control == expected,
        "control lane messages differ: got {:?}, expected {:?}",
        names(&control),
        names(&expected)
    );
}

#[test]
fn memory_pair_carries_everything() {
    let (a, b) = pair(config(2)).unwrap();
    assert_eq!(a.data_lanes(), 2);
    assert_eq!(b.data_lanes(), 2);
    assert_eq!(a.session_id(), b.session_id());
    exercise(a, b);
}

#[test]
fn tcp_one_stream() {
    let (a, b) = tcp_pair(1);
    exercise(a, b);
}

#[test]
fn tcp_several_streams_both_directions() {
    let (a, b) = tcp_pair(3);
    assert_eq!(b.data_lanes(), 3);
    b.send(&Message::Ready).unwrap();
    assert_eq!(a.recv(Some(T)).unwrap(), Some(Message::Ready));
    exercise(a, b);
}

#[test]
fn unix_streams() {
    let (a, b) = unix_pair(2);
    exercise(a, b);
}

#[test]
fn recv_times_out_with_none() {
    let (a, _b) = pair(config(1)).unwrap();
    assert_eq!(a.recv(Some(Duration::from_millis(20))).unwrap(), None);
}

#[test]
fn vanished_peer_is_an_error_not_a_hang() {
    for kind in ["mem", "tcp"] {
        let (a, b) = if kind == "mem" {
            pair(config(2)).unwrap()
        } else {
            tcp_pair(2)
        };
        a.send(&Message::Ready).unwrap();
        drop(a);
        // The message sent before closing still arrives, then the error.
        assert_eq!(b.recv(Some(T)).unwrap(), Some(Message::Ready));
        let e = b.recv(Some(T)).unwrap_err().to_string();
        assert!(e.contains("closed"), "{kind}: {e}");
        assert!(b.recv(Some(T)).is_err(), "stays broken");
        // Sending to a vanished peer fails too (eventually: the first write may be buffered).
        let mut failed = false;
        for _ in 0..100 {
            if b.send(&Message::Ready).is_err() {
                failed = true;
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert!(failed, "{kind}: sending to a closed peer keeps succeeding");
    }
}

#[test]
fn shutdown_fails_pending_operations() {
    let (a, _b) = pair(config(1)).unwrap();
    a.shutdown();
    assert!(a.recv(Some(T)).is_err());
    assert!(a.send(&Message::Ready).is_err());
}

#[test]
fn wrong_key_fails_both_sides() {
    let (cfg, rejected) = hooked(1);
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), cfg).unwrap();
    let ep = listener.local_endpoint().clone();
    let mut c = config(1);
    c.security = Security::Psk(key(2));
    let d = connect(&ep, c).unwrap_err();
    assert!(matches!(d, TransportError::Rejected { .. }), "dialer: {d}");
    assert!(d.to_string().contains("refused"), "{d}");
    let (peer, l) = rejected.recv_timeout(T).unwrap();
    assert!(l.starts_with("AuthFailed"), "listener: {l}");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    still_waiting(&listener);
    assert_eq!(listener.stats().rejected, 1);
}

fn read_frames(s: &mut TcpStream) -> Vec<Kind> {
    s.set_read_timeout(Some(T)).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let mut buf = BytesMut::from(&all[..]);
    let mut dec = FrameDecoder::new();
    let mut kinds = Vec::new();
    while let Ok(Some((repr, _))) = dec.decode(&mut buf) {
        kinds.push(repr.kind);
    }
    kinds
}

#[test]
fn message_before_auth_is_refused() {
    let (cfg, rejected) = hooked(1);
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), cfg).unwrap();
    let Endpoint::Tcp(addr) = listener.local_endpoint().clone() else {
        unreachable!()
    };
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let pages = sample_messages()
            .into_iter()
            .find(|m| matches!(m, Message::Pages(_)))
            .unwrap();
        s.write_all(&encode_message(&pages).unwrap().to_vec())
            .unwrap();
        read_frames(&mut s)
    });
    let (_, e) = rejected.recv_timeout(T).unwrap();
    assert!(e.starts_with("Unauthenticated { got: \"Pages\" }"), "{e}");
    // The client got a Reject and the connection closed, nothing else.
    assert_eq!(client.join().unwrap(), vec![Kind::Reject]);
    still_waiting(&listener);
}

#[test]
fn dialer_refuses_a_listener_that_skips_authentication() {
    // A rogue listener answers the Hello with a protocol message.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rogue = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&encode_message(&Message::Commit).unwrap().to_vec())
            .unwrap();
        read_frames(&mut s)
    });
    let e = connect(&Endpoint::Tcp(addr), config(1)).unwrap_err();
    assert!(
        matches!(e, TransportError::Unauthenticated { got: "Commit" }),
        "{e}"
    );
    // The rogue got our Hello, then a Reject, then the connection closed.
    assert_eq!(rogue.join().unwrap(), vec![Kind::Hello, Kind::Reject]);
}

/// Relays one connection and records what the client sent.
fn recording_proxy(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(target).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        c.set_read_timeout(Some(T)).unwrap();
        let mut rec = Vec::new();
        let mut buf = [0u8; 4096];
        // Record the handshake of the first stream: Hello then Proof.
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            rec.extend_from_slice(&buf[..n]);
            s.write_all(&buf[..n]).unwrap();
            let mut b = BytesMut::from(&rec[..]);
            let mut dec = FrameDecoder::new();
            let mut n_frames = 0;
            while let Ok(Some(_)) = dec.decode(&mut b) {
                n_frames += 1;
            }
            if n_frames >= 2 {
                break;
            }
        }
        // Keep relaying (the dialer expects an Accept) until either side closes.
        let _ = std::io::copy(&mut c, &mut s);
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        rec
    });
    (addr, h)
}

#[test]
fn replayed_handshake_is_refused() {
    let (cfg, rejected) = hooked(1);
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), cfg).unwrap();
    let Endpoint::Tcp(real) = listener.local_endpoint().clone() else {
        unreachable!()
    };
    // A genuine dialer through the proxy; its single-stream "channel" is
    // never completed (the proxy only relays the first stream), which is fine:
    // we only need the recorded handshake of that stream.
    let (proxy, recorded) = recording_proxy(real);
    let dialer = thread::spawn(move || {
        let mut c = config(1);
        c.handshake_timeout = Duration::from_secs(2);
        let _ = connect(&Endpoint::Tcp(proxy), c);
    });
    // The listener authenticates the genuine first stream; the rest never
    // comes through the proxy.
    dialer.join().unwrap();
    let rec = recorded.join().unwrap();
    let mut b = BytesMut::from(&rec[..]);
    let mut dec = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut start = 0;
    while let Ok(Some((repr, payload))) = dec.decode(&mut b) {
        let len = 16 + payload.len();
        frames.push((repr.kind, rec[start..start + len].to_vec()));
        start += len;
    }
    assert_eq!(frames[0].0, Kind::Hello);
    assert_eq!(frames[1].0, Kind::Proof);

    // Replay Hello, read the fresh Challenge, replay the old Proof.
    let replayer = thread::spawn(move || {
        let mut s = TcpStream::connect(real).unwrap();
        s.write_all(&frames[0].1).unwrap();
        s.write_all(&frames[1].1).unwrap();
        read_frames(&mut s)
    });
    assert_eq!(
        replayer.join().unwrap(),
        vec![Kind::Challenge, Kind::Reject]
    );
    // The genuine dialer's second stream found no proxy; the replay was refused.
    let (_, e) = rejected.recv_timeout(T).unwrap();
    assert!(e.starts_with("AuthFailed"), "{e}");
    still_waiting(&listener);
}

#[test]
fn bandwidth_limit_is_respected() {
    let rate = 4u64 << 20;
    let mut c = config(2);
    c.bandwidth_limit = Some(rate);
    let (a, b) = pair(c).unwrap();
    let total = 4u64 << 20; // 4 MiB of pages: about 1 s at 4 MiB/s
    let batches = total / 4096;
    let recv = thread::spawn(move || {
        let mut n = 0;
        while n < batches {
            match b.recv(Some(T)).unwrap() {
                Some(Message::Pages(_)) => n += 1,
                other => panic!("{other:?}"),
            }
        }
    });
    let t = Instant::now();
    for i in 0..batches {
        a.send_pages(i as usize, &page(i, 0)).unwrap();
    }
    a.flush().unwrap();
    let elapsed = t.elapsed();
    recv.join().unwrap();
    // At most a 64 KiB..rate/20 burst goes out free; generous lower bound: half the ideal.
    let ideal = (total - (rate / 20).max(64 << 10)) as f64 / rate as f64;
    assert!(
        elapsed.as_secs_f64() >= ideal * 0.5,
        "{elapsed:?} for {total} bytes at {rate} B/s"
    );
}

/// An in-memory (`"mem"`) or loopback TCP channel pair, shareable.
fn mem_or_tcp(kind: &str, streams: usize) -> (Arc<StreamChannel>, Arc<StreamChannel>) {
    let (a, b) = if kind == "mem" {
        pair(config(streams)).unwrap()
    } else {
        tcp_pair(streams)
    };
    (Arc::new(a), Arc::new(b))
}

fn reconnect_both(a: &Arc<StreamChannel>, b: &Arc<StreamChannel>) {
    let bb = b.clone();
    let l = thread::spawn(move || bb.reconnect());
    a.reconnect().unwrap();
    l.join().unwrap().unwrap();
    assert_eq!(a.generation(), 1);
    assert_eq!(b.generation(), 1);
}

#[test]
fn reconnect_memory_and_tcp() {
    for kind in ["mem", "tcp"] {
        let (a, b) = mem_or_tcp(kind, 2);
        a.send(&Message::Ready).unwrap();
        assert_eq!(b.recv(Some(T)).unwrap(), Some(Message::Ready));
        reconnect_both(&a, &b);
        a.send_pages(1, &page(1, 1)).unwrap();
        a.flush().unwrap();
        b.send_urgent(&Message::Commit).unwrap();
        assert!(
            matches!(b.recv(Some(T)).unwrap(), Some(Message::Pages(_))),
            "{kind}"
        );
        assert_eq!(a.recv(Some(T)).unwrap(), Some(Message::Commit), "{kind}");
    }
}

#[test]
fn stream_decoder_reads_a_live_connection() {
    // The public stream decoder also works directly on a socket's bytes.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let w = thread::spawn(move || {
        let mut a = a;
        for m in sample_messages() {
            encode_message(&m).unwrap().write_to(&mut a).unwrap();
        }
    });
    let mut b = b;
    let mut dec = MessageDecoder::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1000];
    loop {
        let n = b.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(WireItem::Message(m)) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
    }
    w.join().unwrap();
    assert_eq!(got, sample_messages());
}

fn request(n: u64) -> Message {
    Message::PageRequest(PageRun::new(RegionId(9), n, 1))
}

/// `send_urgent_many` (post-copy's requests and replies at hand, in one
/// write): every message arrives once and in order, also when they fill
/// several writes; and once the consumer reads the urgent stream itself, a
/// zero wait takes a message that already arrived (how the request server
/// gathers the requests at hand) instead of returning `None`.
#[test]
fn urgent_many_arrives_in_order_and_a_zero_wait_drains_it() {
    for kind in ["mem", "tcp"] {
        let (a, b) = mem_or_tcp(kind, 1);
        let next = |what: &str| {
            let deadline = Instant::now() + T;
            loop {
                assert!(Instant::now() < deadline, "{kind}: {what} never came");
                if let Some(m) = b.recv_urgent(Duration::from_millis(50)).unwrap() {
                    return m;
                }
            }
        };
        // The consumer takes the stream over.
        a.send_urgent(&request(0)).unwrap();
        assert_eq!(next("the first request"), request(0), "{kind}");
        // A batch sent in full before the consumer looks: after the first
        // message, the rest is drained with zero waits only.
        let small: Vec<Message> = (1..=100).map(request).collect();
        a.send_urgent_many(&small).unwrap();
        let mut got = vec![next("the batch")];
        let deadline = Instant::now() + T;
        while got.len() < small.len() {
            assert!(
                Instant::now() < deadline,
                "{kind}: a zero wait took {} of {} messages",
                got.len(),
                small.len()
            );
            if let Some(m) = b.recv_urgent(Duration::ZERO).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, small, "{kind}");
        assert_eq!(b.recv_urgent(Duration::ZERO).unwrap(), None, "{kind}");
        // Replies and requests over several writes' worth (512 KiB of pages).
        let big: Vec<Message> = (0..128u64)
            .flat_map(|n| {
                let mut p = page(n, n as u32);
                p.run = PageRun::new(RegionId(0), n * u64::from(CHUNK_PAGES), 1);
                [Message::Pages(p), request(1000 + n)]
            })
            .collect();
        let sent = big.clone();
        let aa = a.clone();
        let w = thread::spawn(move || aa.send_urgent_many(&sent));
        for (i, m) in big.iter().enumerate() {
            assert_eq!(
                &next("a message of the big batch"),
                m,
                "{kind}: message {i}"
            );
        }
        w.join().unwrap().unwrap();
        // Nothing is left over.
        assert_eq!(b.recv_urgent(Duration::from_millis(20)).unwrap(), None);
    }
}

/// `recv_urgent` takes the urgent stream over from its reader thread: every
/// urgent message arrives once and in order, whether queued by the thread
/// before the hand-over or read directly after it, also after a reconnect;
/// the stream's end still reaches `recv`.
#[test]
fn urgent_consumer_reads_its_stream_directly_in_order() {
    for kind in ["mem", "tcp"] {
        let (a, b) = mem_or_tcp(kind, 1);
        let expect = |from: u64, to: u64| {
            for n in from..to {
                let deadline = Instant::now() + T;
                let got = loop {
                    assert!(Instant::now() < deadline, "{kind}: urgent {n} never came");
                    if let Some(m) = b.recv_urgent(Duration::from_millis(50)).unwrap() {
                        break m;
                    }
                };
                assert_eq!(got, request(n), "{kind}");
            }
        };
        // Queued by the reader thread before anyone asked for urgent messages.
        for n in 0..5 {
            a.send_urgent(&request(n)).unwrap();
        }
        thread::sleep(Duration::from_millis(50));
        expect(0, 3);
        for n in 5..200 {
            a.send_urgent(&request(n)).unwrap();
        }
        expect(3, 200);
        // Nothing is left over, and a quiet stream times out with None.
        assert_eq!(
            b.recv_urgent(Duration::from_millis(20)).unwrap(),
            None,
            "{kind}"
        );
        reconnect_both(&a, &b);
        for n in 200..300 {
            a.send_urgent(&request(n)).unwrap();
        }
        expect(200, 300);
        // Urgent messages never reach `recv` now; its end does.
        a.send(&Message::Ready).unwrap();
        assert_eq!(b.recv(Some(T)).unwrap(), Some(Message::Ready), "{kind}");
        drop(a);
        let deadline = Instant::now() + T;
        let end = loop {
            assert!(Instant::now() < deadline, "{kind}: the end never came");
            let _ = b.recv_urgent(Duration::from_millis(10));
            match b.recv(Some(Duration::from_millis(10))) {
                Ok(None) => continue,
                other => break other,
            }
        };
        assert!(end.is_err(), "{kind}: {end:?}");
    }
}

/// Relays the first `streams` connections made to it to `target`. Once `stall` is set, the
/// dialer-to-listener direction of each connection forwards the first few
/// bytes it reads next and then nothing more (the connections stay open):
/// a peer that stops in the middle of a frame.
fn stalling_proxy(
    target: std::net::SocketAddr,
    streams: usize,
) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stall = Arc::new(AtomicBool::new(false));
    let st = stall.clone();
    thread::spawn(move || {
        // Each relay ends when its sockets close.
        for c in l.incoming().take(streams) {
            let Ok(mut c) = c else { return };
            let mut s = TcpStream::connect(target).unwrap();
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let st = st.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if st.load(Ordering::Acquire) {
                        // Part of a frame, then silence.
                        let _ = s.write_all(&buf[..n.min(100)]);
                        let _ = std::io::copy(&mut c, &mut std::io::sink());
                        break;
                    }
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, stall)
}

/// The urgent stream read directly by its consumer: a quiet stream may
/// stay quiet for longer than the frame timeout, but a peer that stops in
/// the middle of a frame fails the channel within it, instead of holding
/// the consumer (or `recv`) forever. Only the consumer's direct read has
/// that timeout (a reader thread waits on an idle stream without one), so
/// this also shows the reader thread handed the stream over.
#[test]
fn urgent_stream_stalled_mid_frame_fails_the_channel() {
    let frame_timeout = Duration::from_millis(500);
    let cfg = move || {
        let mut c = config(1);
        c.handshake_timeout = frame_timeout;
        c
    };
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), cfg()).unwrap();
    let Endpoint::Tcp(target) = listener.local_endpoint().clone() else {
        panic!("a TCP listener")
    };
    // Control, one data stream, urgent.
    let (proxy, stall) = stalling_proxy(target, 3);
    let d = thread::spawn(move || connect(&Endpoint::Tcp(proxy), cfg()));
    let b = listener.accept_timeout(T).unwrap();
    let a = d.join().unwrap().unwrap();
    let next_urgent = |what: &str| {
        let deadline = Instant::now() + T;
        loop {
            assert!(Instant::now() < deadline, "{what} never came");
            if let Some(m) = b.recv_urgent(Duration::from_millis(50)).unwrap() {
                return m;
            }
        }
    };
    // The consumer takes the stream over (at the second message at the latest).
    for n in 0..3 {
        a.send_urgent(&request(n)).unwrap();
        assert_eq!(next_urgent("a request"), request(n));
    }
    // Quiet for three frame timeouts: nothing fails.
    thread::sleep(frame_timeout * 3);
    assert_eq!(b.recv_urgent(Duration::from_millis(10)).unwrap(), None);
    a.send_urgent(&request(3)).unwrap();
    assert_eq!(next_urgent("a request after a quiet spell"), request(3));
    // A message of 64 pages of which only the first bytes arrive.
    stall.store(true, Ordering::Release);
    let big = Message::Pages(PageBatch {
        round: 1,
        run: PageRun::new(RegionId(9), 0, 64),
        data: PageData::Raw(Bytes::from(vec![7u8; 64 * 4096])),
    });
    a.send_urgent(&big).unwrap();
    let deadline = Instant::now() + T;
    let err = loop {
        assert!(
            Instant::now() < deadline,
            "a stalled frame still holds the channel"
        );
        if let Err(e) = b.recv_urgent(Duration::from_millis(50)) {
            break e;
        }
        match b.recv(Some(Duration::from_millis(50))) {
            Ok(None) => {}
            Ok(Some(m)) => panic!("{m:?} from a stalled stream"),
            Err(e) => break e,
        }
    };
    let text = err.to_string();
    assert!(text.contains("urgent"), "{text}");
    // The channel stays broken for both calls (until a reconnect).
    assert!(b.recv(Some(Duration::ZERO)).is_err());
}
