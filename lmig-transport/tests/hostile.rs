//! A listener among strangers, over real loopback TCP: garbage, a frame
//! header claiming 4 GiB, a protocol message before authentication, a wrong
//! key, a replayed handshake, a truncated handshake, idle connections (one,
//! and a thousand held open), a peer trickling its `Hello` — each costs its
//! own connection only, is reported to the hook and counted, and a real
//! dialer still gets a working channel.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use lmig_core::Channel;
use lmig_core::protocol::Message;
use lmig_transport::hostile::{self, Answer};
use lmig_transport::wire::{Handshake, Hello, RejectReason, StreamRole, encode_handshake};
use lmig_transport::{
    AuthKey, ChannelConfig, Endpoint, Listener, ListenerStats, StreamChannel, TransportError,
    connect,
};

const T: Duration = Duration::from_secs(30);
const IDLE: usize = 1000;

fn key(b: u8) -> AuthKey {
    AuthKey::new([b; 32]).unwrap()
}

/// What the hook saw: peer → Debug of each error.
type Seen = Arc<Mutex<HashMap<String, Vec<String>>>>;

fn listener(handshake_timeout: Duration) -> (Listener, SocketAddr, Seen) {
    let seen = Seen::default();
    let hook = seen.clone();
    let mut cfg = ChannelConfig::new(key(1)).on_reject(move |r| {
        // The Display names the peer and the reason.
        let shown = r.to_string();
        assert!(shown.contains(&r.peer), "{shown}");
        hook.lock()
            .unwrap()
            .entry(r.peer.clone())
            .or_default()
            .push(format!("{:?}", r.error));
    });
    cfg.handshake_timeout = handshake_timeout;
    let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), cfg).unwrap();
    let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
        unreachable!()
    };
    (l, addr, seen)
}

/// What a stranger got back before its connection ended (waits up to `T`).
fn answer(s: &mut TcpStream) -> Answer {
    hostile::answer(s, T)
}

fn hello_frame() -> Vec<u8> {
    encode_handshake(&Handshake::Hello(Hello {
        session: [3; 16],
        role: StreamRole::Control,
        index: 0,
        data_streams: 1,
        generation: 0,
        nonce: [4; 32],
    }))
    .unwrap()
    .to_vec()
}

/// The soft limit on open files, raised towards the hard one if it is too
/// low for this test (the hard limit here is 20,000).
fn enough_files(needed: u64) {
    let soft = || -> u64 {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_string();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    if soft() >= needed {
        return;
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE)
        .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_NOFILE, needed.min(hard), hard));
    assert!(
        raised.is_ok() && soft() >= needed,
        "this test needs {needed} open files (ulimit -n); raising the limit failed: {raised:?}"
    );
}

fn check_works(a: &StreamChannel, b: &StreamChannel) {
    a.send(&Message::Ready).unwrap();
    assert_eq!(b.recv(Some(T)).unwrap(), Some(Message::Ready));
    b.send(&Message::Commit).unwrap();
    assert_eq!(a.recv(Some(T)).unwrap(), Some(Message::Commit));
}

/// A real dialer connects while the listener is busy with strangers.
fn real_dialer(listener: &Listener, addr: SocketAddr) {
    let dialer = thread::spawn(move || connect(&Endpoint::Tcp(addr), ChannelConfig::new(key(1))));
    let accepted = listener.accept_timeout(T).unwrap();
    let dialed = dialer.join().unwrap().unwrap();
    check_works(&dialed, &accepted);
}

/// Wait (bounded) until no handshake is in flight and the hook has seen
/// every rejection; the stats then.
fn settle(listener: &Listener, seen: &Seen) -> ListenerStats {
    for _ in 0..600 {
        let s = listener.stats();
        let reported: usize = seen.lock().unwrap().values().map(Vec::len).sum();
        if s.in_flight == 0 && reported as u64 == s.rejected {
            return s;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("the listener did not settle: {:?}", listener.stats());
}

fn errors_of(seen: &Seen, s: &TcpStream) -> Vec<String> {
    let peer = s.local_addr().unwrap().to_string();
    seen.lock().unwrap().get(&peer).cloned().unwrap_or_default()
}

#[test]
fn listener_survives_strangers_and_a_flood_of_idle_connections() {
    enough_files(4 * IDLE as u64 + 256);
    let recorded = hostile::record_handshake(&key(1)).unwrap();
    let (listener, addr, seen) = listener(Duration::from_secs(5));

    // One of each kind, each on its own connection, all in flight together.
    let mut g = hostile::garbage(addr).unwrap();
    let mut h = hostile::huge_header(addr).unwrap();
    let mut m = hostile::message_before_auth(addr).unwrap();
    let mut tr = hostile::truncated(addr).unwrap();
    let mut r = hostile::replay_recorded(addr, &recorded).unwrap();
    let mut i = hostile::idle(addr).unwrap();
    let wrong = thread::spawn(move || {
        let e = connect(&Endpoint::Tcp(addr), ChannelConfig::new(key(2))).unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::Rejected {
                    reason: RejectReason::AuthFailed
                }
            ),
            "{e}"
        );
    });
    // A real dialer amid them.
    real_dialer(&listener, addr);

    // A thousand idle connections held open, and a real dialer during them.
    let flood = hostile::idle_many(addr, IDLE).unwrap();
    real_dialer(&listener, addr);
    wrong.join().unwrap();

    // Each stranger got its reason, or just a closed connection.
    let g_answer = answer(&mut g);
    assert!(
        matches!(
            g_answer,
            Answer::Reject(RejectReason::Unexpected) | Answer::Closed
        ),
        "{g_answer:?}"
    );
    assert_eq!(answer(&mut h), Answer::Reject(RejectReason::Unexpected));
    assert_eq!(answer(&mut m), Answer::Reject(RejectReason::Unexpected));
    assert_eq!(answer(&mut tr), Answer::Closed);
    assert_eq!(answer(&mut r), Answer::Reject(RejectReason::AuthFailed));
    let i_answer = answer(&mut i);
    assert!(
        matches!(
            i_answer,
            Answer::Reject(RejectReason::Timeout | RejectReason::Busy)
        ),
        "{i_answer:?}"
    );
    let mut busy = 0;
    for mut s in flood.iter().map(|s| s.try_clone().unwrap()) {
        match answer(&mut s) {
            Answer::Reject(RejectReason::Busy) => busy += 1,
            Answer::Reject(RejectReason::Timeout) => {}
            other => panic!("an idle connection got {other:?}"),
        }
    }
    assert!(busy > 0, "the flood exceeded the cap, someone was evicted");

    // The hook saw each one, under its address, with its reason.
    let stats = settle(&listener, &seen);
    let first = |s: &TcpStream| errors_of(&seen, s).first().cloned().unwrap_or_default();
    assert!(first(&g).starts_with("Wire("), "{:?}", errors_of(&seen, &g));
    assert!(
        first(&h).starts_with("Wire(TooLong"),
        "{:?}",
        errors_of(&seen, &h)
    );
    assert!(
        first(&m).starts_with("Unauthenticated { got: \"Ready\" }"),
        "{:?}",
        errors_of(&seen, &m)
    );
    assert!(
        first(&tr).starts_with("Closed"),
        "{:?}",
        errors_of(&seen, &tr)
    );
    assert!(
        first(&r).starts_with("AuthFailed"),
        "{:?}",
        errors_of(&seen, &r)
    );
    for s in flood.iter().chain([&i]) {
        let e = first(s);
        assert!(e.starts_with("Evicted") || e.starts_with("Timeout"), "{e}");
    }
    let auth_failed = seen
        .lock()
        .unwrap()
        .values()
        .flatten()
        .filter(|e| e.starts_with("AuthFailed"))
        .count();
    assert_eq!(auth_failed, 2, "the wrong key and the replay");

    // The stats add up: two channels of three streams each, the rest refused.
    assert_eq!(stats.authenticated, 6, "{stats:?}");
    assert_eq!(
        stats.accepted,
        stats.authenticated + stats.rejected,
        "{stats:?}"
    );
    // 1001 idle + garbage, header, message, truncated, replay, wrong key.
    assert_eq!(stats.rejected, IDLE as u64 + 7, "{stats:?}");
    assert_eq!(
        stats.evicted + stats.timed_out,
        IDLE as u64 + 1,
        "{stats:?}"
    );
    assert_eq!(
        stats.evicted,
        busy as u64 + u64::from(i_answer == Answer::Reject(RejectReason::Busy))
    );
}

#[test]
fn a_trickling_peer_is_cut_at_the_total_deadline() {
    let (listener, addr, seen) = listener(Duration::from_secs(2));
    let mut s = TcpStream::connect(addr).unwrap();
    let frame = hello_frame();
    let mut reader = s.try_clone().unwrap();
    let answered = thread::spawn(move || answer(&mut reader));
    // A byte every 300 ms: each read step is far inside the 2 s step
    // timeout, the whole Hello (73 bytes) would take 22 s.
    let mut sent = 0;
    for b in &frame {
        if s.write_all(std::slice::from_ref(b)).is_err() || answered.is_finished() {
            break;
        }
        sent += 1;
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        answered.join().unwrap(),
        Answer::Reject(RejectReason::Timeout)
    );
    assert!(sent < frame.len(), "cut before the Hello was complete");
    let stats = settle(&listener, &seen);
    assert_eq!((stats.rejected, stats.timed_out), (1, 1), "{stats:?}");
    assert!(errors_of(&seen, &s)[0].starts_with("Timeout"));
}

#[test]
fn accepting_stops_when_the_listener_and_its_channels_are_gone() {
    let (listener, addr, _) = listener(Duration::from_secs(5));
    let dialer = thread::spawn(move || connect(&Endpoint::Tcp(addr), ChannelConfig::new(key(1))));
    let accepted = listener.accept_timeout(T).unwrap();
    let dialed = dialer.join().unwrap().unwrap();
    drop(listener);
    // The channel still holds the listener (the listening side's reconnect).
    assert!(TcpStream::connect(addr).is_ok());
    check_works(&dialed, &accepted);
    drop(accepted);
    drop(dialed);
    // Then the listening socket closes: bounded wait for a refusal.
    let mut refused = false;
    for _ in 0..200 {
        match TcpStream::connect(addr) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
    assert!(refused, "the listening socket stayed open");
}
