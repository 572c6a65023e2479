//! lmig-core's own test doubles through the conformance kits: `VecMemory`
//! (source and sink), `channel_pair` (one and several lanes) and
//! `NoSockets`.

use lmig_core::NoSockets;
use lmig_core::conformance::sockets::SocketFixture;
use lmig_core::conformance::{channel, memory, sockets};
use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
use lmig_core::testing::{VecMemory, channel_pair};

fn layout() -> RegionLayout {
    RegionLayout::new(vec![
        RegionInfo::new(RegionId(1), 64 * 4096, 4096).unwrap(),
        RegionInfo::new(RegionId(4), 4096, 4096).unwrap(),
        RegionInfo::new(RegionId(9), 300 * 4096, 4096).unwrap(),
    ])
    .unwrap()
}

#[test]
fn vec_memory_is_a_conforming_source() {
    let m = VecMemory::new(&layout());
    memory::check_source("VecMemory", &m, &|r, page, data| m.fill(r, page, data)).unwrap();
}

#[test]
fn vec_memory_is_a_conforming_sink() {
    // Mapped from the announced layout, and made for it beforehand.
    memory::check_sink("VecMemory::empty", &VecMemory::empty(), &layout()).unwrap();
    memory::check_sink("VecMemory::new", &VecMemory::new(&layout()), &layout()).unwrap();
}

#[test]
fn channel_pair_conforms() {
    for lanes in [1, 3] {
        channel::check(&format!("channel_pair({lanes})"), || channel_pair(lanes)).unwrap();
    }
}

/// No sockets on either side: the call order still holds, and a socket
/// record is refused.
struct Nothing;

impl SocketFixture for Nothing {
    type Source = NoSockets;
    type Sink = NoSockets;
    fn source(&mut self, _: Option<NoSockets>) -> Result<NoSockets, String> {
        Ok(NoSockets)
    }
    fn sink(&mut self) -> Result<NoSockets, String> {
        Ok(NoSockets)
    }
    fn source_serves(&mut self, _: &mut NoSockets) -> Result<(), String> {
        Ok(())
    }
    fn sink_serves(&mut self, _: &mut NoSockets) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn no_sockets_conforms() {
    sockets::check("NoSockets", &mut Nothing).unwrap();
}

/// `VecMemory` handles no page faults: it refuses post-copy as the trait
/// says (`Unsupported`), which the post-copy kit accepts with a note.
#[test]
fn vec_memory_refuses_postcopy() {
    let m = VecMemory::new(&layout());
    let missing = lmig_core::model::RegionPages::full(&layout());
    let e = lmig_core::MemorySink::begin_postcopy(&m, &missing).unwrap_err();
    assert!(
        matches!(e, lmig_core::MigrationError::Unsupported { .. }),
        "{e}"
    );
    memory::check_postcopy("VecMemory", &m, &layout()).unwrap();
}
