//! Fuzz entry points for what in the examples and the session faces a peer:
//! kvd's RESP parser (clients), kvd's state decoder (the program state a
//! source sends) and the destination session fed arbitrary message
//! sequences over in-memory backends. `fuzz/fuzz_targets/<name>.rs` calls
//! [`run`]; `examples/tests/fuzz_corpus.rs` replays the checked-in corpus
//! and mutated seeds on stable, so `cargo test` exercises every target.
//!
//! Each entry point checks what must hold for any input (never a panic;
//! consumed lengths within the input; decode–encode–decode stable; the
//! session ends with `Ok` or an error, within bounds) and panics otherwise.

use std::time::Duration;

use bytes::BytesMut;
use lmig_core::model::{PageRun, RegionLayout, RegionPages};
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_core::session::{Destination, DestinationConfig};
use lmig_core::testing::{NullProgram, VecMemory, channel_pair};
use lmig_core::{Channel, MemorySink, MigrationError};
use lmig_transport::wire::{MessageDecoder, WireItem, encode_message};

use crate::kvd::resp;
use crate::kvd::server::{decode_state, encode_conn_state, encode_state_header};

/// The targets of this module.
pub const TARGETS: &[&str] = &["kvd_resp", "kvd_state", "dest_session"];

/// Run target `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "kvd_resp" => kvd_resp(data),
        "kvd_state" => kvd_state(data),
        "dest_session" => {
            dest_session(data);
        }
        _ => return false,
    }
    true
}

/// Requests parsed one after another from a client's bytes, as kvd's loop
/// does: each consumes at least one byte and never more than there is.
pub fn kvd_resp(data: &[u8]) {
    let mut at = 0;
    // Bounded: each request consumes at least one byte.
    while at < data.len() {
        match resp::parse(&data[at..]) {
            Ok(Some((_, used))) => {
                assert!(
                    used > 0 && used <= data.len() - at,
                    "consumed {used} of {}",
                    data.len() - at
                );
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The reply parser (kvd's load generator and key check read replies).
    if let Ok(Some((_, used))) = resp::parse_reply(data) {
        assert!(
            used <= data.len(),
            "reply consumed {used} of {}",
            data.len()
        );
    }
}

/// kvd's program state as a source sends it: decoded, encoded again, the
/// same connections come back.
pub fn kvd_state(data: &[u8]) {
    let Ok(conns) = decode_state(data) else {
        return;
    };
    let mut again = Vec::new();
    encode_state_header(&mut again, conns.len());
    for (id, r, w) in &conns {
        encode_conn_state(&mut again, *id, r, w);
    }
    assert_eq!(
        &data[..again.len()],
        &again[..],
        "the encoding differs from the input"
    );
    assert_eq!(decode_state(&again).as_deref(), Ok(&conns[..]));
}

/// Most memory a fuzzed layout may ask the in-memory destination for.
const MAX_FUZZ_MEMORY: u64 = 16 << 20;
/// Most messages fed to one session.
const MAX_FUZZ_MESSAGES: usize = 512;

/// [`VecMemory`] refusing layouts beyond [`MAX_FUZZ_MEMORY`] (it allocates
/// what a layout declares; the real destination maps it lazily).
struct CappedMemory(VecMemory);

impl MemorySink for CappedMemory {
    fn prepare(&self, layout: &RegionLayout) -> lmig_core::Result<()> {
        let total: u64 = layout.regions().iter().map(|r| r.len).sum();
        if total > MAX_FUZZ_MEMORY {
            return Err(MigrationError::invalid(
                "region layout",
                "larger than the fuzz target maps",
            ));
        }
        self.0.prepare(layout)
    }
    fn write_pages(&self, run: &PageRun, data: &[u8]) -> lmig_core::Result<()> {
        self.0.write_pages(run, data)
    }
    fn zero_pages(&self, run: &PageRun) -> lmig_core::Result<()> {
        self.0.zero_pages(run)
    }
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        self.0.read_pages(run, dst)
    }
    fn begin_postcopy(&self, missing: &RegionPages) -> lmig_core::Result<()> {
        self.0.begin_postcopy(missing)
    }
    fn discard(&self) {
        self.0.discard()
    }
}

/// The messages in `data`, decoded as frames one after another (up to the
/// first that does not decode).
pub fn decode_messages(data: &[u8]) -> Vec<Message> {
    let mut buf = BytesMut::from(data);
    let mut decoder = MessageDecoder::new();
    let mut out = Vec::new();
    while out.len() < MAX_FUZZ_MESSAGES {
        match decoder.decode(&mut buf) {
            Ok(Some(WireItem::Message(m))) => out.push(m),
            Ok(Some(WireItem::Handshake(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// A destination session fed the messages in `data` (authenticated: they
/// come through the channel as a source's would), then the end of the
/// channel. Whatever the sequence, the session ends — `Ok` only for a
/// migration that committed — and it never panics; a session that did not
/// commit discarded everything. Returns whether the program was resumed
/// (the session reached `Commit`).
pub fn dest_session(data: &[u8]) -> bool {
    let messages = decode_messages(data);
    let (src, dst) = channel_pair(2);
    for m in &messages {
        let sent = match m {
            Message::Pages(batch) => src.send_pages(0, batch),
            other => src.send(other),
        };
        if sent.is_err() {
            break;
        }
    }
    src.shutdown();
    let memory = CappedMemory(VecMemory::empty());
    let mut program = NullProgram::default();
    let r = Destination::new(&dst, &memory, &mut program)
        .with_config(DestinationConfig::default().with_idle_timeout(Duration::from_millis(200)))
        .run();
    let committed = messages.iter().any(|m| matches!(m, Message::Commit));
    if r.is_ok() {
        assert!(committed, "Ok without a Commit");
    }
    if !program.committed {
        assert!(
            program.discarded || program.state.is_none(),
            "failed before Commit but kept the program's state: {r:?}"
        );
    }
    program.committed
}

/// Seed inputs for target `name`.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "kvd_resp" => vec![
            b"*2\r\n$3\r\nGET\r\n$5\r\nkey:1\r\n".to_vec(),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nPING\r\n".to_vec(),
            b"INCR c:1\r\n$5\r\nhello\r\n".to_vec(),
            b"*1\r\n$-1\r\n".to_vec(),
        ],
        "kvd_state" => {
            let mut s = Vec::new();
            encode_state_header(&mut s, 2);
            encode_conn_state(&mut s, 7, b"GET k\r\n", b"+OK\r\n");
            encode_conn_state(&mut s, 9, b"", b"");
            vec![s, vec![0; 8]]
        }
        "dest_session" => session_seeds(),
        _ => Vec::new(),
    }
}

/// Encoded message sequences of a small pre-copy session, cut after each
/// message.
fn session_seeds() -> Vec<Vec<u8>> {
    use lmig_core::model::{ProgramState, RegionId, RegionInfo};
    use lmig_core::protocol::{Handover, RoundSummary};
    let info = RegionInfo {
        id: RegionId(1),
        len: 4 * 4096,
        page_size: 4096,
        fixed_addr: None,
    };
    let Ok(layout) = RegionLayout::new(vec![info]) else {
        return Vec::new();
    };
    let page = PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), 0, 1),
        data: PageData::Raw(bytes::Bytes::from(vec![7u8; 4096])),
    };
    let full = [
        Message::Regions(layout),
        Message::SocketPlan(Vec::new()),
        Message::Pages(page),
        Message::RoundEnd(RoundSummary::default()),
        // One `last` per data lane (`dest_session`'s channel has 2).
        Message::Sockets {
            records: Vec::new(),
            last: true,
        },
        Message::Sockets {
            records: Vec::new(),
            last: true,
        },
        Message::State(ProgramState::new(1, b"state".to_vec())),
        Message::Handover(Handover {
            pages_total: 1,
            postcopy: Vec::new(),
            verify: false,
        }),
        Message::Commit,
    ];
    let encode = |msgs: &[Message]| -> Vec<u8> {
        msgs.iter()
            .filter_map(|m| encode_message(m).ok())
            .flat_map(|f| f.to_vec())
            .collect()
    };
    (1..=full.len()).map(|n| encode(&full[..n])).collect()
}
