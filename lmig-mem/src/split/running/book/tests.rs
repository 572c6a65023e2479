//! Every transition of the page book, and the ones it refuses, without a
//! userfaultfd.

use lmig_core::model::{PageRun, RegionId, RegionInfo};
use lmig_core::split::{HostId, OwnerMap};

use super::{FaultDecision, PageBook, PageState};

const ME: HostId = HostId(0);
const A: HostId = HostId(1);
const B: HostId = HostId(2);
const PAGES: u64 = 64;

fn run(first: u64, count: u32) -> PageRun {
    PageRun::new(RegionId(1), first, count)
}

/// A book over 64 pages, hosts A and B attached, everything here.
fn book() -> PageBook {
    let info = RegionInfo::new(RegionId(1), PAGES * 4096, 4096).unwrap();
    let mut b = PageBook::new(OwnerMap::new(info, ME).unwrap(), ME);
    b.add_host(A).unwrap();
    b.add_host(B).unwrap();
    b
}

/// `book()` with `first..first + count` evicted to `host`.
fn evict(b: &mut PageBook, first: u64, count: u32, host: HostId) {
    let set = b.begin_evict(&[run(first, count)]);
    for (p, n) in b.evict_drops(&set) {
        b.evicted(p, n, host).unwrap();
    }
    b.end_evict(&set);
}

fn no_one_dead(_: HostId) -> bool {
    false
}

#[test]
fn starts_local() {
    let b = book();
    assert!((0..PAGES).all(|p| b.state(p) == Some(PageState::Local)));
    assert_eq!(b.state(PAGES), None);
    assert!(b.all_local());
    assert_eq!(b.held_here(), PAGES);
    assert!(b.remote_parts().is_empty());
}

#[test]
fn eviction_drops_unwritten_pages_and_keeps_written_ones() {
    let mut b = book();
    let set = b.begin_evict(&[run(4, 4)]);
    assert_eq!(set.runs().collect::<Vec<_>>(), vec![(4, 4)]);
    assert_eq!(b.state(5), Some(PageState::Evicting { written: false }));
    // A write during the eviction keeps the page; counted once.
    assert!(b.written(5));
    assert!(!b.written(5));
    assert_eq!(b.state(5), Some(PageState::Evicting { written: true }));
    assert_eq!(b.evict_drops(&set), vec![(4, 1), (6, 2)]);
    for (p, n) in b.evict_drops(&set) {
        b.evicted(p, n, A).unwrap();
    }
    b.end_evict(&set);
    assert_eq!(b.state(4), Some(PageState::Remote { owner: A }));
    assert_eq!(b.state(5), Some(PageState::Local));
    assert_eq!(b.state(7), Some(PageState::Remote { owner: A }));
    assert_eq!(b.held_here(), PAGES - 3);
    assert!(!b.all_local());
    let parts = b.remote_parts();
    assert_eq!(parts.len(), 1);
    assert_eq!((parts[0].0, parts[0].1.count()), (A, 3));
}

#[test]
fn failed_eviction_leaves_pages_local() {
    let mut b = book();
    let set = b.begin_evict(&[run(0, 8)]);
    assert!(b.written(3));
    b.end_evict(&set);
    assert!((0..8).all(|p| b.state(p) == Some(PageState::Local)));
    // The written mark went with the eviction: a new one starts clean.
    let set = b.begin_evict(&[run(3, 1)]);
    assert_eq!(b.state(3), Some(PageState::Evicting { written: false }));
    b.end_evict(&set);
}

#[test]
fn eviction_refuses_pages_not_local_or_already_evicting() {
    let mut b = book();
    evict(&mut b, 0, 4, A);
    let first = b.begin_evict(&[run(2, 6)]);
    assert_eq!(first.runs().collect::<Vec<_>>(), vec![(4, 4)]);
    // Evicting already (another eviction running): not taken twice.
    assert!(b.begin_evict(&[run(4, 4)]).is_empty());
    // A write to a page not under eviction changes nothing.
    assert!(!b.written(0));
    assert!(!b.written(20));
    assert_eq!(b.state(20), Some(PageState::Local));
    b.end_evict(&first);
}

#[test]
fn fault_fetches_with_prepaging_from_the_owner() {
    let mut b = book();
    evict(&mut b, 0, 32, A);
    let d = b.fault(10, 4, no_one_dead);
    // Half as many before (2), up to `prepage` after (4).
    assert_eq!(
        d,
        FaultDecision::Fetch {
            owner: A,
            first: 8,
            count: 7,
            epoch: b.map().epoch()
        }
    );
    for p in 8..15 {
        assert_eq!(b.state(p), Some(PageState::Fetching { owner: A, asked: A }));
    }
    assert_eq!(b.state(15), Some(PageState::Remote { owner: A }));
    // Asked already: a second fault sends nothing.
    assert_eq!(b.fault(10, 4, no_one_dead), FaultDecision::Ignore);
    // Prepaging stops at pages asked already and at other owners.
    evict(&mut b, 32, 8, B);
    assert!(matches!(
        b.fault(16, 8, no_one_dead),
        FaultDecision::Fetch {
            owner: A,
            first: 15,
            count: 10,
            ..
        }
    ));
    assert!(matches!(
        b.fault(31, 8, no_one_dead),
        FaultDecision::Fetch {
            owner: A,
            first: 27,
            count: 5,
            ..
        }
    ));
}

#[test]
fn fault_on_a_page_here_or_arriving_or_lost() {
    let mut b = book();
    assert_eq!(b.fault(3, 8, no_one_dead), FaultDecision::AlreadyHere);
    assert_eq!(b.fault(PAGES, 8, no_one_dead), FaultDecision::Ignore);
    evict(&mut b, 0, 8, A);
    assert_eq!(b.fault(3, 8, |h| h == A), FaultDecision::Ignore);
    assert_eq!(b.state(3), Some(PageState::Remote { owner: A }));
    let claim = b.claim_answer(A, b.map().epoch(), &run(3, 1)).unwrap();
    assert_eq!(claim.claimed, vec![(3, 1)]);
    assert_eq!(b.state(3), Some(PageState::Placing));
    assert!(b.is_here(3));
    assert_eq!(b.fault(3, 8, no_one_dead), FaultDecision::AwaitPlacement);
}

#[test]
fn failed_fetch_forgets_the_request() {
    let mut b = book();
    evict(&mut b, 0, 8, A);
    let FaultDecision::Fetch { first, count, .. } = b.fault(2, 2, no_one_dead) else {
        panic!("no fetch");
    };
    b.fetch_failed(first, count);
    assert!((0..8).all(|p| b.state(p) == Some(PageState::Remote { owner: A })));
    assert!(matches!(
        b.fault(2, 2, no_one_dead),
        FaultDecision::Fetch { .. }
    ));
}

#[test]
fn answer_is_placed_then_local() {
    let mut b = book();
    evict(&mut b, 0, 8, A);
    let epoch = b.map().epoch();
    b.fault(0, 8, no_one_dead);
    let claim = b.claim_answer(A, epoch, &run(0, 8)).unwrap();
    assert_eq!(claim.claimed, vec![(0, 8)]);
    assert!(claim.refetch.is_empty());
    assert_eq!((claim.duplicates, claim.stale, claim.not_owner), (0, 0, 0));
    assert_eq!(b.map().owner(0).unwrap(), ME);
    assert_eq!(b.held_here(), PAGES);
    assert!(!b.all_local(), "placements still running");
    assert!(!b.placed(0, 8, 8, A).unwrap());
    assert!(b.all_local());
    // The same answer again: duplicates, nothing claimed.
    let again = b.claim_answer(A, epoch, &run(0, 8)).unwrap();
    assert!(again.claimed.is_empty());
    assert_eq!(again.duplicates, 8);
}

#[test]
fn partly_placed_answer_goes_back_to_its_sender() {
    let mut b = book();
    evict(&mut b, 0, 8, A);
    let claim = b.claim_answer(A, b.map().epoch(), &run(0, 8)).unwrap();
    assert_eq!(claim.claimed, vec![(0, 8)]);
    assert!(b.placed(0, 8, 3, A).unwrap());
    assert_eq!(b.state(2), Some(PageState::Local));
    assert_eq!(b.state(3), Some(PageState::Remote { owner: A }));
    assert_eq!(b.map().owner(7).unwrap(), A);
}

#[test]
fn answer_claims_only_current_pages_in_maximal_runs() {
    let mut b = book();
    evict(&mut b, 0, 4, A);
    evict(&mut b, 4, 2, B);
    evict(&mut b, 6, 2, A);
    let epoch = b.map().epoch();
    // Pages 0..8 from A: 4 and 5 are B's; 8 and 9 are here.
    let claim = b.claim_answer(A, epoch, &run(0, 10)).unwrap();
    assert_eq!(claim.claimed, vec![(0, 4), (6, 2)]);
    assert_eq!((claim.not_owner, claim.duplicates, claim.stale), (2, 2, 0));
    assert_eq!(b.state(4), Some(PageState::Remote { owner: B }));
}

#[test]
fn late_answer_is_stale_and_refetched() {
    let mut b = book();
    evict(&mut b, 0, 4, A);
    let FaultDecision::Fetch {
        epoch: asked_at, ..
    } = b.fault(1, 0, no_one_dead)
    else {
        panic!("no fetch");
    };
    // Page 1 goes back and forth while the fetch is out: A's answer as of
    // the old epoch is late.
    let snapshot = b.map().pages_of(A);
    let sw = b.switch(&snapshot, A, asked_at, B).unwrap();
    assert_eq!(sw.refetch, vec![1]);
    let back = b.switch(&b.map().pages_of(B), B, sw.epoch, A).unwrap();
    assert_eq!(back.refetch, vec![1]);
    let claim = b.claim_answer(A, asked_at, &run(1, 1)).unwrap();
    assert!(claim.claimed.is_empty());
    assert_eq!(claim.stale, 1);
    assert_eq!(claim.refetch, vec![1]);
    assert_eq!(b.state(1), Some(PageState::Remote { owner: A }));
}

#[test]
fn answer_from_a_host_not_owning_the_page_is_discarded() {
    let mut b = book();
    evict(&mut b, 0, 4, A);
    b.fault(0, 0, no_one_dead);
    let claim = b.claim_answer(B, b.map().epoch(), &run(0, 1)).unwrap();
    assert!(claim.claimed.is_empty());
    assert_eq!(claim.not_owner, 1);
    // The fetch went to A, not B: it still waits.
    assert!(claim.refetch.is_empty());
    assert_eq!(b.state(0), Some(PageState::Fetching { owner: A, asked: A }));
    // Outside the region: not the sender's either.
    let outside = b.claim_answer(A, 0, &run(PAGES - 1, 2)).unwrap();
    assert_eq!((outside.duplicates, outside.not_owner), (1, 1));
}

#[test]
fn not_held_ends_the_hosts_fetches_and_says_whether_the_map_disagrees() {
    let mut b = book();
    evict(&mut b, 0, 4, A);
    let FaultDecision::Fetch { epoch, .. } = b.fault(0, 8, no_one_dead) else {
        panic!("no fetch");
    };
    assert!(!b.not_held(B, &run(0, 4), epoch), "B was never asked");
    assert_eq!(b.state(0), Some(PageState::Fetching { owner: A, asked: A }));
    assert!(
        b.not_held(A, &run(0, 4), epoch),
        "the map gives A those pages"
    );
    assert_eq!(b.state(0), Some(PageState::Remote { owner: A }));
    // A former owner, as of an epoch after the pages left it: no contradiction.
    let sw = b.switch(&b.map().pages_of(A), A, epoch, B).unwrap();
    assert!(!b.not_held(A, &run(0, 4), sw.epoch));
}

#[test]
fn lost_host_ends_its_fetches() {
    let mut b = book();
    evict(&mut b, 0, 4, A);
    evict(&mut b, 4, 4, B);
    b.fault(0, 8, no_one_dead);
    b.fault(4, 8, no_one_dead);
    let held = b.host_lost(A);
    assert_eq!(held.runs().collect::<Vec<_>>(), vec![(0, 4)]);
    assert_eq!(b.state(0), Some(PageState::Remote { owner: A }));
    assert_eq!(b.state(4), Some(PageState::Fetching { owner: B, asked: B }));
}

#[test]
fn switch_moves_unchanged_pages_and_reaims_fetches() {
    let mut b = book();
    evict(&mut b, 0, 8, A);
    let since = b.map().epoch();
    let snapshot = b.map().pages_of(A);
    b.fault(2, 0, no_one_dead);
    // Page 7 comes here during the move: it changed hands after `since`.
    let claim = b.claim_answer(A, since, &run(7, 1)).unwrap();
    assert_eq!(claim.claimed, vec![(7, 1)]);
    b.placed(7, 1, 1, A).unwrap();
    let sw = b.switch(&snapshot, A, since, B).unwrap();
    assert_eq!(sw.moved.count(), 7);
    assert_eq!(sw.stale.runs().collect::<Vec<_>>(), vec![(7, 1)]);
    assert_eq!(sw.refetch, vec![2]);
    assert_eq!(sw.epoch, b.map().epoch());
    assert_eq!(b.state(2), Some(PageState::Fetching { owner: B, asked: B }));
    assert_eq!(b.state(3), Some(PageState::Remote { owner: B }));
    assert_eq!(b.state(7), Some(PageState::Local));
    // A switch naming an unknown host is refused and changes nothing.
    assert!(b.switch(&snapshot, B, since, HostId(9)).is_err());
    assert_eq!(b.state(3), Some(PageState::Remote { owner: B }));
}
