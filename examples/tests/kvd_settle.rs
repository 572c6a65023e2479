//! kvd's word that its post-copy work after the resume ran
//! (`PageResidency::settled`) when nothing parks at all: an idle loop says
//! it after a quiet poll, so the source's push hold-off ends on the word,
//! not at its bound. Real userfaultfd post-copy over an in-process channel;
//! needs privilege (fails loudly without it, `LMIG_SKIP_PRIVILEGED=1`
//! makes that a visible skip). No timing is asserted: the bound is set far
//! beyond the test (20 s), and the report says which ended the hold-off.

use std::sync::Arc;
use std::time::Duration;

use lmig_core::model::RegionId;
use lmig_core::session::{Destination, Mode, Source, SourceConfig};
use lmig_core::testing::{NullProgram, channel_pair};
use lmig_examples::kvd::park::holdoff_until_settled;
use lmig_examples::kvd::server::{Server, Wake};
use lmig_examples::kvd::store::Store;
use lmig_mem::{Backing, DestinationRegions, ManualTracker, RegionOptions, RegionSet};

const R: RegionId = RegionId(1);

#[test]
fn an_idle_kvd_says_settled_and_the_push_starts_on_the_word() {
    assert!(
        holdoff_until_settled(),
        "run without LMIG_KVD_HOLDOFF_SETTLED=0: this test is about the word"
    );
    let region = RegionOptions::new(R, 1 << 20).map().unwrap();
    let store = Store::format(&region);
    store.set(b"key", b"value").unwrap();
    let set = RegionSet::new([region]).unwrap();
    let layout = lmig_core::MemorySource::layout(&set);
    let (a, b) = channel_pair(2);
    let dst = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));

    std::thread::scope(|s| {
        let source = s.spawn(|| {
            let config = SourceConfig::default()
                .with_mode(Mode::Postcopy)
                .with_push_holdoff(Duration::from_secs(20))
                .with_push_holdoff_until_settled(true);
            Source::new(
                &a,
                &set,
                ManualTracker::new(&layout),
                NullProgram::default(),
            )
            .with_config(config)
            .run()
        });
        let resumed = match Destination::new(b, dst.clone(), NullProgram::default()).start() {
            Ok(r) => r,
            Err(e) if lmig_core::testing::privileged("kvd idle settle", &e.to_string()) => {
                panic!("post-copy unavailable: {e}")
            }
            Err(e) => {
                eprintln!("skipped: {e}");
                // The source ends on the closed channel, whatever it says.
                drop(source.join());
                return;
            }
        };
        let residency = resumed.residency.clone().expect("post-copy: a residency");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server = Server::new(listener, Vec::new()).unwrap();
        server.set_residency(residency, R).unwrap();
        let control = server.control();
        let dst = &*dst;
        // No client: the loop's polls come back empty.
        let loop_thread = s.spawn(move || {
            let store = Store::open(dst.regions().unwrap().get(R).unwrap()).unwrap();
            server.run(&store)
        });
        let report = source.join().unwrap();
        let verified = resumed.after_commit.join();
        control.park().expect("the loop parks");
        control.wake(Wake::Exit);
        loop_thread.join().unwrap().unwrap();
        let report = report.unwrap();
        assert!(
            report.holdoff_settled,
            "the hold-off ended at its bound, not on kvd's word"
        );
        assert_eq!(
            verified.unwrap().verification,
            lmig_core::protocol::Verification::Verified
        );
    });
}
