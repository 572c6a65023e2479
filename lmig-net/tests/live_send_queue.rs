//! Why a live connection's send queue is not read before the freeze
//! (issue 22 item 4; docs/traps.md, "Reading a live send queue"): while
//! `TCP_REPAIR_QUEUE` selects the send queue, `tcp_write_xmit` takes every
//! never-sent byte as sent without transmitting it, whatever the peer's
//! window, as soon as anything makes the kernel push (here the peer's
//! window update). The bytes stay queued and arrive later (after loss
//! recovery), so nothing is lost, but the peer waits for them. With
//! repair mode on and no queue selected, the same window update sends
//! them at once.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use lmig_core::testing::privileged;
use lmig_net::sys::{self, RepairMode, TcpQueue};

/// Bytes the server writes: more than the client's 4 KiB window lets through.
const LEN: usize = 1 << 20;

fn byte(k: usize) -> u8 {
    (k % 251) as u8
}

/// Poll `cond` every millisecond for at most 5 s (bounded); its last answer.
fn within_5s(mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A loopback connection whose server side holds never-sent bytes behind
/// the client's closed 4 KiB window, nothing in flight.
fn stuffed() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    c.set_recv_buffer_size(4096).unwrap();
    c.connect(&l.local_addr().unwrap().into()).unwrap();
    let client: TcpStream = c.into();
    let (mut server, _) = l.accept().unwrap();
    socket2::SockRef::from(&server)
        .set_send_buffer_size(4 << 20)
        .unwrap();
    server.set_nonblocking(true).unwrap();
    let data: Vec<u8> = (0..LEN).map(byte).collect();
    let mut at = 0;
    // Bounded: stops at LEN or when the send buffer is full.
    while at < LEN {
        match server.write(&data[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert_eq!(at, LEN, "the send buffer holds the whole payload");
    let settled = within_5s(|| {
        let i = sys::tcp_info(server.as_fd()).unwrap();
        i.unacked == 0 && i.notsent_bytes > 0
    });
    assert!(settled, "the client's window never closed with bytes left");
    (server, client)
}

/// Read everything (bounded by a 20 s read timeout) and check every byte.
fn read_all(client: &mut TcpStream, from: usize) {
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = vec![0u8; LEN - from];
    client.read_exact(&mut got).unwrap();
    assert!(
        got.iter().enumerate().all(|(k, &b)| b == byte(from + k)),
        "bytes differ"
    );
}

/// Read what the client holds now (it has a 4 KiB window): the window opens.
fn read_some(client: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 64 << 10];
    let n = client.read(&mut buf).unwrap();
    assert!(n > 0);
    assert!(buf[..n].iter().enumerate().all(|(k, &b)| b == byte(k)));
    n
}

/// Notsent bytes before; after the window update: notsent, unacked, the
/// client's queue.
fn repair_case(queue: TcpQueue) -> (u32, u32, u32, u32) {
    let (server, mut client) = stuffed();
    let fd = server.as_fd();
    let before = sys::tcp_info(fd).unwrap().notsent_bytes;
    sys::tcp_repair(fd, RepairMode::On).unwrap();
    sys::set_repair_queue(fd, queue).unwrap();
    let n = read_some(&mut client);
    // The client's window update reaches the server while the queue is selected.
    within_5s(|| sys::tcp_info(fd).unwrap().notsent_bytes < before);
    let after = sys::tcp_info(fd).unwrap();
    let client_inq = sys::inq(client.as_fd()).unwrap();
    sys::set_repair_queue(fd, TcpQueue::None).unwrap();
    sys::tcp_repair(fd, RepairMode::OffNoWindowProbe).unwrap();
    // Nothing lost either way: every byte arrives, in order.
    read_all(&mut client, n);
    (before, after.notsent_bytes, after.unacked, client_inq)
}

#[test]
fn a_selected_send_queue_takes_unsent_bytes_as_sent_without_sending_them() {
    if !privileged(
        "a_selected_send_queue_takes_unsent_bytes_as_sent_without_sending_them",
        "CAP_NET_ADMIN for TCP repair",
    ) {
        return;
    }
    let (_, notsent, unacked, client_inq) = repair_case(TcpQueue::Send);
    assert_eq!(notsent, 0, "every unsent byte was taken as sent");
    assert!(unacked > 0, "and counted in flight ({unacked} segments)");
    assert_eq!(client_inq, 0, "yet none of them reached the peer");
}

#[test]
fn repair_mode_without_a_selected_queue_sends_on_a_window_update() {
    if !privileged(
        "repair_mode_without_a_selected_queue_sends_on_a_window_update",
        "CAP_NET_ADMIN for TCP repair",
    ) {
        return;
    }
    let (before, notsent, _, _) = repair_case(TcpQueue::None);
    assert!(notsent < before, "the window update sent bytes");
    assert!(notsent > 0, "only as many as the window allowed");
}
