//! [`ProgramSockets::plan`] in a process with fewer fds to spare than it has
//! sockets (a server with 10,000 connections under a 20,000 limit): every
//! socket is planned, and the program can still open fds while the plan
//! holds its duplicates. A test binary of its own: it lowers the process's
//! `RLIMIT_NOFILE`.

mod common;

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use common::privileged;
use lmig_core::BoxError;
use lmig_core::traits::SocketSource;
use lmig_net::topology::Topology;
use lmig_net::{NetSourceConfig, PLAN_FD_RESERVE, ProgramSockets, SocketOwner};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

const CONNS: usize = 400;

/// A loop holding its sockets; at each lend, after showing them, it opens
/// a file as the program's own accept would.
#[derive(Default)]
struct Owner {
    sockets: Vec<(u64, OwnedFd)>,
    lends: usize,
    /// Lends during which the program could not open an fd.
    starved: usize,
}

impl SocketOwner for Owner {
    fn park(&mut self) -> Result<Vec<(u64, OwnedFd)>, BoxError> {
        Ok(std::mem::take(&mut self.sockets))
    }

    fn resume(&mut self, sockets: Vec<(u64, OwnedFd)>) -> Result<(), BoxError> {
        self.sockets = sockets;
        Ok(())
    }

    fn lend(&mut self, show: &mut dyn FnMut(u64, BorrowedFd<'_>)) -> Result<(), BoxError> {
        self.lends += 1;
        for (id, fd) in &self.sockets {
            show(*id, fd.as_fd());
        }
        if File::open("/dev/null").is_err() {
            self.starved += 1;
        }
        Ok(())
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[test]
fn a_plan_with_little_fd_room_covers_every_socket_and_leaves_room() {
    if !privileged("a_plan_with_little_fd_room_covers_every_socket_and_leaves_room") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut clients = Vec::new();
            let mut owner = Owner::default();
            for id in 0..CONNS as u64 {
                clients.push(TcpStream::connect(l.local_addr().unwrap()).unwrap());
                owner.sockets.push((id, l.accept().unwrap().0.into()));
            }
            // Room for fewer duplicates than sockets, beyond the reserve.
            let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            let limit = open_fds() + PLAN_FD_RESERVE + CONNS as u64 / 3;
            setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();
            let mut ps = ProgramSockets::new(owner, NetSourceConfig::default());
            let plan = ps.plan();
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
            let mut ids: Vec<u64> = plan.unwrap().iter().map(|p| p.id).collect();
            ids.sort_unstable();
            assert_eq!(
                ids,
                (0..CONNS as u64).collect::<Vec<_>>(),
                "every socket planned"
            );
            let owner = ps.owner();
            assert_eq!(
                owner.starved, 0,
                "the program could not open an fd while lent"
            );
            assert!(owner.lends >= 2, "lent once only: {}", owner.lends);
            assert_eq!(owner.sockets.len(), CONNS, "the loop has its sockets");
            drop(clients);
        })
        .unwrap();
}
