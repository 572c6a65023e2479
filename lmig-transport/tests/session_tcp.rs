//! A program held in RAM migrated end to end through both session state
//! machines over a real, authenticated TCP channel; and an abort before
//! `Commit` that leaves the source whole and the destination empty.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lmig_core::model::{PageRun, ProgramState, RegionId, RegionInfo, RegionLayout};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, Source};
use lmig_core::testing::{MarkTracker, NullProgram, VecMemory};
use lmig_core::{Channel, MigrationError, StateSource};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, connect};

const PAGES: u64 = 4096;

fn layout() -> RegionLayout {
    RegionLayout::new(vec![
        RegionInfo::new(RegionId(1), PAGES * 4096, 4096).unwrap(),
    ])
    .unwrap()
}

fn tcp_pair(streams: usize) -> (StreamChannel, StreamChannel) {
    let key = AuthKey::new(b"session test key, 32 bytes long!").unwrap();
    let config = ChannelConfig::new(key).with_data_streams(streams);
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        config.clone(),
    )
    .unwrap();
    let endpoint = listener.local_endpoint().clone();
    let dialer = std::thread::spawn(move || connect(&endpoint, config));
    let dst = listener.accept_timeout(Duration::from_secs(10)).unwrap();
    (dialer.join().unwrap().unwrap(), dst)
}

/// A program whose writer thread dirties pages until it is paused.
struct Writer<'a> {
    stop: &'a AtomicBool,
    stopped: &'a AtomicBool,
    inner: NullProgram,
}

impl StateSource for Writer<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        // Paused means the writer is no longer between a write and its mark.
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..10_000 {
            if self.stopped.load(Ordering::SeqCst) {
                return self.inner.pause();
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Err(MigrationError::backend("writer", "did not stop within 1 s"))
    }
    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        Ok(ProgramState::new(1, &b"counters"[..]))
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.stop.store(false, Ordering::SeqCst);
        self.inner.resume()
    }
}

#[test]
fn migrates_over_tcp_with_two_streams_while_written() {
    let layout = layout();
    let src = VecMemory::new(&layout);
    for p in (0..PAGES).step_by(2) {
        src.fill(RegionId(1), p, &p.to_le_bytes());
    }
    let dst = VecMemory::empty();
    let (a, b) = tcp_pair(2);
    let mut tracker = MarkTracker::new(&layout);
    let marker = tracker.clone();
    let stop = AtomicBool::new(false);
    let stopped = AtomicBool::new(false);
    let (report, dst_report, dst_prog) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let mut prog = NullProgram::default();
            (Destination::new(&b, &dst, &mut prog).run(), prog)
        });
        let w = s.spawn(|| {
            // Written pages are marked after the write, as a real tracker sees
            // them. Only even pages are written: odd pages stay zero.
            for i in 0..2_000_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if marker.is_started() {
                    let page = (i * 2654435761) % (PAGES / 2) * 2;
                    src.fill(RegionId(1), page, &i.to_le_bytes());
                    marker.mark(&PageRun::new(RegionId(1), page, 1));
                }
            }
            stopped.store(true, Ordering::SeqCst);
        });
        let prog = Writer {
            stop: &stop,
            stopped: &stopped,
            inner: NullProgram::default(),
        };
        let r = Source::new(&a, &src, &mut tracker, prog).run();
        // The pause must stop the writer before the final collect: wait for it.
        w.join().unwrap();
        let (dr, dp) = d.join().unwrap();
        (r, dr, dp)
    });
    let report = report.expect("source");
    let dst_report = dst_report.expect("destination");
    assert_eq!(report.verification, Verification::Verified);
    assert_eq!(dst_report.verification, Verification::Verified);
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
    assert_eq!(dst_prog.state, Some(ProgramState::new(1, &b"counters"[..])));
    let round0 = report.round_stats[0];
    assert!(
        round0.zero_pages >= PAGES / 2,
        "zero pages sent as flags: {round0:?}"
    );
}

#[test]
fn abort_before_commit_over_tcp_leaves_source_whole() {
    let layout = layout();
    let src = VecMemory::new(&layout);
    src.fill(RegionId(1), 7, b"precious");
    let before = src.snapshot(RegionId(1));
    // The destination has a different layout: it refuses after `Regions`.
    let other = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 4096, 4096).unwrap()]).unwrap();
    let dst = VecMemory::new(&other);
    let (a, b) = tcp_pair(1);
    let mut tracker = MarkTracker::new(&layout);
    let mut prog = NullProgram::default();
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        (
            Source::new(&a, &src, &mut tracker, &mut prog).run(),
            d.join().unwrap(),
        )
    });
    assert!(
        matches!(d_res, Err(MigrationError::LayoutMismatch { .. })),
        "{d_res:?}"
    );
    let e = s_res.unwrap_err();
    assert!(e.source_may_run(), "{e}");
    assert_eq!(src.snapshot(RegionId(1)), before);
    assert!(!prog.is_paused() && !prog.committed);
    assert!(!tracker.is_started());
    assert!(dst.was_discarded());
}

#[test]
fn source_killed_mid_precopy_makes_destination_discard() {
    let layout = layout();
    let dst = VecMemory::empty();
    let (a, b) = tcp_pair(1);
    let mut prog = NullProgram::default();
    let d = std::thread::spawn(move || {
        let r = Destination::new(&b, &dst, &mut prog).run();
        (r, dst, prog)
    });
    // Announce regions, send a few pages, then drop the connection.
    a.send(&lmig_core::Message::Regions(layout)).unwrap();
    a.send_pages(
        0,
        &lmig_core::PageBatch {
            round: 0,
            run: PageRun::new(RegionId(1), 0, 1),
            data: lmig_core::PageData::Raw(vec![1u8; 4096].into()),
        },
    )
    .unwrap();
    drop(a);
    let (r, dst, prog) = d.join().unwrap();
    let e = r.unwrap_err();
    assert!(matches!(e, MigrationError::Channel { .. }), "{e}");
    assert!(dst.was_discarded() && prog.discarded && !prog.committed);
}
