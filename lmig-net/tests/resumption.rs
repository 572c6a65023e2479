//! The destination's resumption value over real connections: restored by
//! lmig-net's `NetSink` in host B, handed over at `Commit`, and dropped
//! unused: the restored sockets close (the peer reads end-of-file), while
//! the migration still ends well behind it.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Peer, privileged};
use lmig_core::model::{RegionId, RegionInfo, RegionLayout, SocketPrep, SocketRecord};
use lmig_core::protocol::Verification;
use lmig_core::session::{AfterCommit, Destination, Resumption, Source};
use lmig_core::testing::{MarkTracker, NullProgram, VecMemory, channel_pair};
use lmig_core::{SocketSink, SocketSource};
use lmig_net::topology::Topology;
use lmig_net::{NetSink, NetSource, NetSourceConfig, SinkConfig};

/// lmig-net's source; after `Commit` the service address moves to B first.
struct MovingSource<'a> {
    net: NetSource,
    topo: &'a Topology,
    moved: Arc<AtomicBool>,
}

impl SocketSource for MovingSource<'_> {
    fn plan(&mut self) -> lmig_core::Result<Vec<SocketPrep>> {
        self.net.plan()
    }
    fn freeze(&mut self) -> lmig_core::Result<()> {
        self.net.freeze()
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        self.net.capture(emit)
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        self.net.abort()
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        self.topo
            .move_service_address(&self.topo.a, &self.topo.b)
            .map_err(|e| lmig_core::MigrationError::backend("moving the address", e))?;
        self.moved.store(true, Ordering::SeqCst);
        self.net.release()
    }
}

/// lmig-net's sink, activated once the address is at B (no packet of the
/// peer meets host A without its sockets).
struct WaitingSink {
    net: NetSink,
    moved: Arc<AtomicBool>,
}

impl SocketSink for WaitingSink {
    fn prepare(&mut self, plan: &[SocketPrep]) -> lmig_core::Result<()> {
        self.net.prepare(plan)
    }
    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.net.restore(batch)
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.moved.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.net.activate()
    }
    fn discard(&mut self) {
        self.net.discard()
    }
}

#[test]
#[ignore = "the peer process of the other tests (run by them)"]
fn peer_main() {
    common::peer_main();
}

/// Keep only the after-`Commit` handle; the rest is dropped on return.
fn only_the_handle<P, K, M>(r: Resumption<'static, P, K, M>) -> AfterCommit<'static> {
    r.after_commit
}

#[test]
fn a_resumption_dropped_unused_closes_the_restored_connections() {
    if !privileged("a_resumption_dropped_unused_closes_the_restored_connections") {
        return;
    }
    const N: usize = 2;
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    let addr = SocketAddr::new(Topology::SERVICE_V4.into(), 7310);
    let listener = topo
        .a
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let mut peer = Peer::spawn(&topo.client);
    peer.cmd(&format!("connect {addr} {N} 4096"));
    let mut net = NetSource::new(NetSourceConfig::default()).unwrap();
    for i in 0..N {
        let (conn, _) = listener.accept().unwrap();
        net.add(i as u64, OwnedFd::from(conn)).unwrap();
    }
    let layout =
        RegionLayout::new(vec![RegionInfo::new(RegionId(1), 16 * 4096, 4096).unwrap()]).unwrap();
    let src = VecMemory::new(&layout);
    let (a, b) = channel_pair(1);
    let moved = Arc::new(AtomicBool::new(false));
    let sink = WaitingSink {
        net: NetSink::new(SinkConfig::default()).unwrap(),
        moved: moved.clone(),
    };
    // The destination in B: take the program at `Commit`, drop it unused.
    let destination = topo
        .b
        .spawn_thread(move || {
            let resumed = Destination::new(b, Arc::new(VecMemory::empty()), NullProgram::default())
                .with_sockets(sink)
                .start()?;
            only_the_handle(resumed).join()
        })
        .unwrap();
    let mut tracker = MarkTracker::new(&layout);
    let report = Source::new(&a, &src, &mut tracker, NullProgram::default())
        .with_sockets(MovingSource {
            net,
            topo: &topo,
            moved,
        })
        .run()
        .expect("the migration commits");
    assert_eq!(report.sockets, N as u64);
    let d = destination
        .join()
        .unwrap()
        .unwrap()
        .expect("the migration ends well");
    assert_eq!(d.verification, Verification::Verified);
    assert_eq!(d.sockets_restored, N as u64);
    // The restored sockets closed with the unused value: end-of-file at the peer.
    for i in 0..N {
        peer.cmd(&format!("expect_eof {i}"));
    }
}
