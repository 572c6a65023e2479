//! The freeze's bound (`SourceConfig::max_freeze` of lmig-core's session)
//! over real TCP connections: whichever freeze step crosses it, the source
//! aborts and its connections come back out of repair mode with every
//! queued byte, both ways, and keep talking.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{pat, privileged, read_exact_eq};
use lmig_core::model::{
    PageRun, ProgramState, RegionId, RegionInfo, RegionLayout, RegionPages, SocketRecord,
};
use lmig_core::protocol::Message;
use lmig_core::session::{Destination, Source, SourceConfig};
use lmig_core::testing::{MarkTracker, NullProgram, PairEnd, VecMemory, channel_pair};
use lmig_core::{Channel, DirtyTracker, MigrationError, SocketSink, SocketSource, StateSource};
use lmig_net::topology::Topology;
use lmig_net::{NetSource, NetSourceConfig as NetConfig};

/// The bound, and how long a stalled step takes (the freeze of this small
/// program takes well under a millisecond otherwise).
const BOUND: Duration = Duration::from_millis(200);
const STALL: Duration = Duration::from_millis(700);
const CONNS: usize = 3;

/// Which step stalls, once the program is frozen.
struct Stall {
    step: &'static str,
    frozen: AtomicBool,
}

impl Stall {
    fn at(&self, step: &'static str) {
        if self.step == step && self.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(STALL);
        }
    }
}

struct Program<'a> {
    stall: &'a Stall,
    inner: NullProgram,
}

impl StateSource for Program<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.stall.frozen.store(true, Ordering::SeqCst);
        self.inner.pause()?;
        self.stall.at("pause program");
        Ok(())
    }
    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        Ok(ProgramState::new(1, b"state".to_vec()))
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.stall.frozen.store(false, Ordering::SeqCst);
        self.inner.resume()
    }
}

/// lmig-net's source, slow at the chosen step.
struct SlowNet<'a> {
    stall: &'a Stall,
    net: &'a mut NetSource,
}

impl SocketSource for SlowNet<'_> {
    fn freeze(&mut self) -> lmig_core::Result<()> {
        self.net.freeze()?;
        self.stall.at("freeze sockets");
        Ok(())
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        self.stall.at("capture sockets");
        self.net.capture(emit)
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        self.net.abort()
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        self.net.release()
    }
}

struct Tracker<'a> {
    stall: &'a Stall,
    inner: MarkTracker,
}

impl DirtyTracker for Tracker<'_> {
    fn name(&self) -> &'static str {
        "test"
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        self.inner.start()
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        self.stall.at("final collect");
        self.inner.collect(dirty)?;
        if self.stall.frozen.load(Ordering::SeqCst) {
            dirty.insert_run(&PageRun::new(RegionId(1), 0, 4))?;
        }
        Ok(())
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        self.inner.stop()
    }
}

struct StallChannel<'a> {
    inner: PairEnd,
    stall: &'a Stall,
    step: &'static str,
    name: &'static str,
}

impl Channel for StallChannel<'_> {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        if msg.name() == self.name {
            self.stall.at(self.step);
        }
        self.inner.send(msg)
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        self.inner.recv(timeout)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// A destination that takes the records and never restores them (the
/// source's sockets are what this test looks at).
#[derive(Default)]
struct Records {
    discarded: bool,
}

impl SocketSink for Records {
    fn restore(&mut self, _batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        Ok(())
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
    }
}

const STEPS: &[(&str, &str)] = &[
    ("pause program", ""),
    ("freeze sockets", ""),
    ("final collect", ""),
    ("final pages", "Pages"),
    ("capture sockets", ""),
    ("state and handover", "Handover"),
    ("wait for Ready", "Ready"),
];

/// One attempt bounded by `BOUND`, stalled at `step`; returns the source's error.
fn bounded_attempt(
    step: &'static str,
    message: &'static str,
    net: &mut NetSource,
) -> MigrationError {
    let layout =
        RegionLayout::new(vec![RegionInfo::new(RegionId(1), 64 * 4096, 4096).unwrap()]).unwrap();
    let src = VecMemory::new(&layout);
    let dst = VecMemory::empty();
    let stall = Stall {
        step,
        frozen: AtomicBool::new(false),
    };
    let (a, b) = channel_pair(1);
    let on_dst = message == "Ready";
    let wrap = |inner, mine: bool| StallChannel {
        inner,
        stall: &stall,
        step,
        name: if mine { message } else { "" },
    };
    let (a, b) = (wrap(a, !on_dst), wrap(b, on_dst));
    let mut tracker = Tracker {
        stall: &stall,
        inner: MarkTracker::new(&layout),
    };
    let mut program = Program {
        stall: &stall,
        inner: NullProgram::default(),
    };
    let mut sink = Records::default();
    let config = SourceConfig::default().with_max_freeze(Some(BOUND));
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            Destination::new(&b, &dst, NullProgram::default())
                .with_sockets(&mut sink)
                .run()
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(SlowNet { stall: &stall, net })
            .with_config(config)
            .run();
        a.shutdown();
        (r, d.join().unwrap())
    });
    assert!(
        d_res.is_err() && sink.discarded,
        "{step}: the destination discards"
    );
    assert!(
        !program.inner.is_paused() && !program.inner.committed,
        "{step}: resumed"
    );
    s_res.expect_err(step)
}

/// Every step: the bound aborts the freeze there, and every connection
/// keeps every byte queued both ways, then talks on.
#[test]
fn a_freeze_past_its_bound_keeps_every_byte_of_every_connection() {
    if !privileged("a_freeze_past_its_bound_keeps_every_byte_of_every_connection") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            for (i, &(step, message)) in STEPS.iter().enumerate() {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut clients = Vec::new();
                let mut net = NetSource::new(NetConfig::default()).unwrap();
                for c in 0..CONNS {
                    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                    let (mut server, _) = listener.accept().unwrap();
                    // Queued both ways, unread: the server's receive queue
                    // and the client's (the server's sent bytes).
                    client.write_all(&pat("C", c)).unwrap();
                    server.write_all(&pat("S", c)).unwrap();
                    wait_inq(&server, pat("C", c).len());
                    net.add(c as u64, server.into()).unwrap();
                    clients.push(client);
                }
                let err = bounded_attempt(step, message, &mut net);
                match &err {
                    MigrationError::FreezeDeadline { step: at, .. } => {
                        assert_eq!(*at, step, "#{i}: {err}")
                    }
                    other => panic!("{step}: expected FreezeDeadline, got {other}"),
                }
                assert!(err.source_may_run(), "{step}");
                // Out of repair mode, every byte there, both ways; then more.
                for (id, fd) in net.into_fds() {
                    let c = id as usize;
                    let mut server = TcpStream::from(fd);
                    server
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let client = &mut clients[c];
                    client
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    read_exact_eq(&mut server, &pat("C", c))
                        .unwrap_or_else(|e| panic!("{step}: conn {c} to the server: {e}"));
                    read_exact_eq(client, &pat("S", c))
                        .unwrap_or_else(|e| panic!("{step}: conn {c} to the client: {e}"));
                    server.write_all(b"after").unwrap();
                    read_exact_eq(client, b"after").unwrap();
                    client.write_all(b"again").unwrap();
                    read_exact_eq(&mut server, b"again").unwrap();
                    // Nothing more than that, either way.
                    server.set_nonblocking(true).unwrap();
                    let mut extra = [0u8; 8];
                    assert!(
                        server.read(&mut extra).is_err(),
                        "{step}: conn {c}: extra bytes"
                    );
                }
            }
        })
        .unwrap();
}

/// Wait (bounded) until `s` has `n` bytes to read.
fn wait_inq(s: &impl AsFd, n: usize) {
    for _ in 0..5000 {
        if lmig_net::sys::inq(s.as_fd()).unwrap_or(0) as usize >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("{n} bytes never arrived");
}
