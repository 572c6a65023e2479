//! `--queued-mib Q`: Q MiB left queued in kvd's sockets at the freeze.
//!
//! Connections of their own (at most 100, as many as `--conns` when fewer),
//! opened with a 4 KiB receive buffer (`--queued-rcvbuf`), ask kvd for Q MiB of replies in all
//! (pipelined `MGET`s of one key holding the largest value kvd stores) and
//! read nothing until kvd migrated: the replies wait in kvd's send queues,
//! held back by the clients' closed windows, and move with the connections.
//! kvd's host starts new sockets with a send buffer large enough for each
//! connection's share (`net.ipv4.tcp_wmem` of its namespace), so that kvd
//! hands everything to the kernel instead of keeping a backlog itself.
//! After the migration every reply is read and compared byte for byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use lmig_net::topology::Netns;

use super::Error;
use crate::kvd::store::MAX_VALUE;

/// The key whose value every `MGET` asks for.
const KEY: &str = "lmig-queued";
/// Keys per `MGET` (kvd takes up to 1024 arguments).
const KEYS_PER_MGET: usize = 1000;
/// The stuffing connections' default receive buffer (`SO_RCVBUF`).
pub const RCVBUF: usize = 4096;
/// One reply item: `$<len>\r\n<value>\r\n`.
const ITEM: usize = 1 + 3 + 2 + MAX_VALUE + 2;

/// The stuffing connections, their replies not read yet.
pub struct Queued {
    conns: Vec<(TcpStream, Vec<usize>)>,
    /// Bytes of replies asked for over all connections.
    pub asked_bytes: u64,
}

/// Connections used for `mib` MiB over a scenario of `conns` connections.
pub fn connections(conns: usize) -> usize {
    conns.clamp(1, 100)
}

/// Before kvd starts: new sockets on kvd's host get a send buffer that
/// holds `mib` MiB over `conns` connections (twice that: the kernel counts
/// buffer overhead against it).
pub fn make_room(host: &Netns, mib: f64, conns: usize) -> Result<(), Error> {
    let share = (mib * f64::from(1 << 20) / connections(conns) as f64) as u64;
    let initial = (2 * share).clamp(1 << 20, 256 << 20);
    let line = format!("4096 {initial} {}\n", initial.max(4 << 20));
    host.run(move || std::fs::write("/proc/sys/net/ipv4/tcp_wmem", line))?
        .map_err(|e| format!("setting tcp_wmem on kvd's host: {e}"))?;
    Ok(())
}

/// The expected bytes of one `MGET` of `n` keys.
fn reply(n: usize, value: &[u8]) -> Vec<u8> {
    let mut out = format!("*{n}\r\n").into_bytes();
    for _ in 0..n {
        out.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn value() -> Vec<u8> {
    (0..MAX_VALUE).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Open the connections from `client` to `addr` and ask for `mib` MiB of
/// replies, which kvd queues; returns once kvd had time to write them.
/// `rcvbuf` is each connection's receive buffer (0: the kernel's default):
/// its window bounds the size of kvd's segments, and so of the buffers in
/// kvd's send queue, which the freeze's capture walks one by one.
pub fn stuff(
    client: &Netns,
    addr: SocketAddr,
    mib: f64,
    conns: usize,
    rcvbuf: usize,
) -> Result<Queued, Error> {
    let k = connections(conns);
    let total = (mib * f64::from(1 << 20)) as u64;
    let items_per_conn = (total / k as u64).div_ceil(ITEM as u64) as usize;
    let conns = client
        .run(move || -> Result<Vec<(TcpStream, Vec<usize>)>, String> {
            let value = value();
            // The key first, on a connection of its own (read back).
            let mut setter = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .map_err(|e| format!("connect: {e}"))?;
            setter
                .set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let mut set = format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{KEY}\r\n${}\r\n",
                KEY.len(),
                value.len()
            )
            .into_bytes();
            set.extend_from_slice(&value);
            set.extend_from_slice(b"\r\n");
            setter.write_all(&set).map_err(|e| e.to_string())?;
            let mut ok = [0u8; 5];
            setter
                .read_exact(&mut ok)
                .map_err(|e| format!("SET: {e}"))?;
            if &ok != b"+OK\r\n" {
                return Err(format!("SET answered {:?}", String::from_utf8_lossy(&ok)));
            }
            let mut out = Vec::with_capacity(k);
            for i in 0..k {
                let sock = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )
                .map_err(|e| e.to_string())?;
                // A closed window keeps kvd's replies in kvd's send queue.
                if rcvbuf > 0 {
                    sock.set_recv_buffer_size(rcvbuf)
                        .map_err(|e| e.to_string())?;
                }
                sock.connect_timeout(&addr.into(), Duration::from_secs(10))
                    .map_err(|e| format!("connect {i}: {e}"))?;
                let mut s: TcpStream = sock.into();
                let mut sizes = Vec::new();
                let mut left = items_per_conn;
                let mut req = Vec::new();
                // Bounded: each round asks for up to KEYS_PER_MGET items.
                while left > 0 {
                    let n = left.min(KEYS_PER_MGET);
                    req.extend_from_slice(format!("*{}\r\n$4\r\nMGET\r\n", n + 1).as_bytes());
                    for _ in 0..n {
                        req.extend_from_slice(format!("${}\r\n{KEY}\r\n", KEY.len()).as_bytes());
                    }
                    sizes.push(n);
                    left -= n;
                }
                s.write_all(&req)
                    .map_err(|e| format!("requests on {i}: {e}"))?;
                out.push((s, sizes));
            }
            Ok(out)
        })?
        .map_err(|e| format!("queued connections: {e}"))?;
    // kvd reads the requests and queues the replies within milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    let asked_bytes = conns
        .iter()
        .flat_map(|(_, sizes)| sizes.iter())
        .map(|&n| reply(n, &[0; MAX_VALUE]).len() as u64)
        .sum();
    Ok(Queued { conns, asked_bytes })
}

impl Queued {
    /// The connections holding the queued replies.
    pub fn conns(&self) -> usize {
        self.conns.len()
    }

    /// Read every reply (after the migration) and compare it byte for byte;
    /// `Err` names the first connection whose bytes differ or stopped.
    pub fn verify(self) -> Result<(), String> {
        let value = value();
        for (i, (mut s, sizes)) in self.conns.into_iter().enumerate() {
            // A wide window again for the read (bounded by the timeout).
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            for (j, n) in sizes.into_iter().enumerate() {
                let want = reply(n, &value);
                let mut got = vec![0u8; want.len()];
                s.read_exact(&mut got)
                    .map_err(|e| format!("queued connection {i}, reply {j}: {e}"))?;
                if got != want {
                    return Err(format!("queued connection {i}, reply {j}: bytes differ"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_sized_as_kvd_writes_them() {
        let v = value();
        assert_eq!(reply(1, &v).len(), 4 + ITEM);
        assert_eq!(reply(1000, &v).len(), 7 + 1000 * ITEM);
        assert!(reply(2, &v).starts_with(b"*2\r\n$184\r\nabc"));
        assert_eq!(connections(10_000), 100);
        assert_eq!(connections(7), 7);
    }
}
