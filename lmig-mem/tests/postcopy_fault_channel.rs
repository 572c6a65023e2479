//! `lmig_core::testing::FaultChannel` over a real channel keeps the
//! destination's post-copy fault path in one thread (it forwards
//! `Channel::urgent_fd`), and a fault it injects there happens on that
//! path: a break at the first page reply, which the one fault-path thread
//! reads (the thread that waits on the forwarded descriptor), ends the
//! session (no page wrong, the requested page never placed) instead of
//! passing unseen. Real TCP, real userfaultfd.
//!
//! The push is held off until the program says it settled, with a bound
//! far beyond the test: the first pages the destination receives are the
//! replies to its program's requests (a sign-of-life page of the hold-off
//! comes only after 500 ms).
//!
//! Needs userfaultfd with kernel-mode faults (root here); fails loudly
//! without it (`LMIG_SKIP_PRIVILEGED=1` makes that a visible skip). No
//! timing is asserted; every wait is bounded.

use std::sync::Arc;
use std::time::Duration;

use lmig_core::PageResidency;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::Verification;
use lmig_core::session::{
    Destination, DestinationConfig, DestinationReport, Mode, SourceConfig, SourceReport,
};
use lmig_core::testing::{Fault, FaultChannel, FaultKind, NullProgram};
use lmig_mem::{Backing, DestinationRegions};
use lmig_transport::ChannelConfig;

mod postcopy_tcp;

use postcopy_tcp::PS;
const PAGES: u64 = 256;
const R: RegionId = RegionId(8);
/// Pages the program touches in the run without a fault.
const TOUCHED: u64 = 32;

/// The salt of this file's page pattern.
const SALT: u8 = 0x5A;

fn pattern(page: u64) -> Vec<u8> {
    postcopy_tcp::pattern(page, SALT)
}

fn config() -> ChannelConfig {
    let mut c = postcopy_tcp::config(b"fault channel test key, 32 bytes");
    // A destination whose channel broke for good gives up within seconds.
    c.reconnect_timeout = Duration::from_secs(2);
    c
}

/// What a migration through a destination-side `FaultChannel` gave.
struct Outcome {
    source: lmig_core::Result<SourceReport>,
    dest: lmig_core::Result<DestinationReport>,
    fired: Option<(u32, &'static str)>,
    /// The thread that met the fault.
    fired_thread: Option<String>,
    /// Waits of the fault path that a reply ended (one thread only).
    also_woke: u64,
    /// Pages resident at the destination at the end, each checked.
    resident: u64,
    dst: Arc<DestinationRegions>,
}

/// Migrate a region in post-copy, the destination's channel wrapped in a
/// `FaultChannel` misbehaving at `fault`, its fault path in one thread.
/// Its program runs `program` after the resume. `None` when skipped.
fn migrate(
    what: &str,
    fault: Fault,
    program: fn(&DestinationRegions, &dyn PageResidency),
) -> Option<Outcome> {
    let src = postcopy_tcp::source_region(R, PAGES, SALT);
    let dst = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));
    let (listener, target) = postcopy_tcp::listen(config());
    let dest = {
        let dst = dst.clone();
        std::thread::spawn(move || {
            let inner = listener.accept_timeout(Duration::from_secs(20)).unwrap();
            let channel = Arc::new(FaultChannel::new(inner, fault));
            let config = DestinationConfig::default()
                .with_idle_timeout(Duration::from_secs(2))
                .with_pause_limit(Duration::from_secs(1))
                .with_one_fault_thread(true);
            let started = Destination::new(channel.clone(), dst.clone(), NullProgram::default())
                .with_config(config)
                .start();
            let result = started.map(|resumed| {
                let residency = resumed.residency.clone().expect("post-copy: a residency");
                program(&dst, &*residency);
                (resumed.after_commit.join(), residency)
            });
            (result, channel.fired(), channel.fired_thread())
        })
    };
    let cfg = SourceConfig::default()
        .with_mode(Mode::Postcopy)
        .with_verify(true)
        .with_done_timeout(Duration::from_secs(3))
        .with_push_holdoff(Duration::from_secs(120))
        .with_push_holdoff_until_settled(true);
    let source = postcopy_tcp::run_source(&target, config(), &src, cfg);
    let (result, fired, fired_thread) = dest.join().unwrap();
    let (dest_result, residency) = match result {
        Ok(r) => r,
        Err(e) => {
            if lmig_core::testing::privileged(what, &e.to_string()) {
                panic!("{what}: the destination failed before the resume: {e}");
            }
            return None;
        }
    };
    let set = dst.regions().unwrap();
    let mut resident = 0;
    for p in 0..PAGES {
        // A missing page is never read: after a failed post-copy its
        // touchers stay blocked.
        if residency.is_resident(&PageRun::new(R, p, 1)).unwrap() {
            let mut v = vec![0u8; PS];
            set.get(R)
                .unwrap()
                .read_at(p as usize * PS, &mut v)
                .unwrap();
            assert_eq!(v, pattern(p), "{what}: page {p} resident and wrong");
            resident += 1;
        }
    }
    Some(Outcome {
        source,
        dest: dest_result,
        fired,
        fired_thread,
        also_woke: dst.postcopy_stats().also_woke,
        resident,
        dst,
    })
}

/// Reads [`TOUCHED`] pages (each a fault its reply ends), then says it settled.
fn touch_then_settle(dst: &DestinationRegions, residency: &dyn PageResidency) {
    let set = dst.regions().expect("the regions are mapped");
    let mut v = vec![0u8; PS];
    for i in 0..TOUCHED {
        let p = (i * 37) % PAGES;
        set.get(R)
            .unwrap()
            .read_at(p as usize * PS, &mut v)
            .unwrap();
        assert_eq!(v, pattern(p), "page {p} read wrong");
    }
    residency.settled();
}

/// Asks for page 7 without touching it (a thread blocked on a page that
/// never comes could not be released) and never says it settled.
fn request_page_7(_: &DestinationRegions, residency: &dyn PageResidency) {
    assert!(!residency.request(&PageRun::new(R, 7, 1), 7).unwrap());
}

/// Without a fault: the migration completes through the `FaultChannel`,
/// and its fault path ran in one thread (a reply ended its wait: two
/// threads never wait on the urgent lane). Before `FaultChannel`
/// forwarded `urgent_fd` this took two threads.
#[test]
fn a_fault_channel_keeps_the_one_thread_fault_path() {
    let what = "post-copy through a FaultChannel, no fault";
    let Some(o) = migrate(what, Fault::never(), touch_then_settle) else {
        return;
    };
    let dest = o
        .dest
        .unwrap_or_else(|e| panic!("{what}: destination: {e}"));
    let source = o.source.unwrap_or_else(|e| panic!("{what}: source: {e}"));
    assert_eq!(dest.verification, Verification::Verified, "{what}");
    assert_eq!(source.verification, Verification::Verified, "{what}");
    assert_eq!(o.resident, PAGES, "{what}: every page in");
    postcopy_tcp::assert_pages(what, &o.dst, R, PAGES, SALT);
    assert!(
        dest.network_faults >= TOUCHED,
        "{what}: each touch a request"
    );
    assert!(
        o.also_woke >= 1,
        "{what}: one fault-path thread (a reply ended its wait)"
    );
}

/// A break at the first page message the destination receives, the reply
/// to its program's request, read by the one fault-path thread (which
/// waits for it on the forwarded descriptor, or finds it already read):
/// the fault fires in that thread, the session ends
/// in an error after `Commit` on both sides (bounded), the requested page
/// is never placed and no resident page is wrong.
#[test]
fn a_break_at_a_reply_happens_on_the_one_thread_path() {
    let what = "post-copy through a FaultChannel, break at the first reply";
    let fault = Fault::on_message(FaultKind::Break, "Pages");
    let Some(o) = migrate(what, fault, request_page_7) else {
        return;
    };
    assert!(
        matches!(o.fired, Some((_, "Pages"))),
        "{what}: fired {:?}",
        o.fired
    );
    // The fault-path thread receives on the urgent lane only when it is
    // the one thread (with two, the reply thread, "lmig-replies", does).
    assert_eq!(
        o.fired_thread.as_deref(),
        Some("lmig-faults"),
        "{what}: the one fault-path thread met the break"
    );
    let e = o.dest.expect_err("the destination lost its channel");
    assert!(e.after_commit(), "{what}: {e}");
    assert!(o.source.is_err(), "{what}: the source lost its destination");
    assert!(o.resident < PAGES, "{what}: post-copy did not complete");
}
