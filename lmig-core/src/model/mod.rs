//! Plain data exchanged between the source and the destination: region
//! layouts, page runs and sets, socket records and the program's own state.
//!
//! Nothing here touches the OS; every value can be built from bytes a peer
//! sent, so every type validates itself (`validate`/`new` return errors,
//! never panic).

mod batch;
mod pages;
mod region;
mod socket;
mod state;

pub use batch::{PageBatch, PageData};
pub use pages::{PageSet, RegionPages, Runs};
pub use region::{
    MAX_PAGE_SIZE, MAX_REGION_BYTES, MAX_REGIONS, MIN_PAGE_SIZE, PageRun, RegionId, RegionInfo,
    RegionLayout,
};
pub use socket::{
    MAX_CONGESTION_NAME, MAX_QUEUE_BYTES, MAX_UDP_DATAGRAMS, SockOpts, SocketKind, SocketPrep,
    SocketRecord, TcpConnState, TcpListenState, TcpOpts, TcpRepairWindow, TcpStateKind,
    UdpDatagram, UdpSockState,
};
pub use state::{MAX_STATE_BYTES, ProgramState};
