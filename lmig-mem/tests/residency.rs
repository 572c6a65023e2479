//! Post-copy residency with real userfaultfd: a program asks whether pages
//! are here and requests missing ones without touching them; it is told
//! through the eventfd once every page of its range is placed. Races: a
//! residency query while the page is being placed, and a request racing a
//! fault on the same page.
//!
//! Needs userfaultfd with kernel-mode faults (root here); fails loudly
//! without it (`LMIG_SKIP_PRIVILEGED=1` makes that a visible skip). No
//! timing is asserted; every loop is bounded.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lmig_core::model::{PageRun, RegionId, RegionPages};
use lmig_core::{MemorySink, MemorySource};
use lmig_mem::{Backing, DestinationRegions, RegionOptions, RegionSet, Residency};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const PS: usize = 4096;
const PAGES: u64 = 64;
const R: RegionId = RegionId(1);

fn pattern(page: u64) -> Vec<u8> {
    let mut v = vec![(page as u8) ^ 0x5A; PS];
    v[..8].copy_from_slice(&page.to_le_bytes());
    v
}

fn run(first: u64, count: u32) -> PageRun {
    PageRun::new(R, first, count)
}

/// A destination in post-copy with every page missing (stale content
/// placed before, as after pre-copy); `None` when skipped.
fn destination(what: &str) -> Option<DestinationRegions> {
    let src = RegionSet::new([RegionOptions::new(R, PAGES * PS as u64).map().unwrap()]).unwrap();
    let layout = MemorySource::layout(&src);
    let dst = DestinationRegions::new(Backing::Private);
    dst.prepare(&layout).unwrap();
    for p in 0..PAGES {
        dst.write_pages(&run(p, 1), &[0xEE; PS]).unwrap();
    }
    let missing = RegionPages::full(&layout);
    if let Err(e) = dst.begin_postcopy(&missing) {
        if lmig_core::testing::privileged(what, &e.to_string()) {
            panic!("{what}: userfaultfd post-copy unavailable: {e}");
        }
        return None;
    }
    Some(dst)
}

fn readable(fd: BorrowedFd<'_>, ms: u16) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).unwrap() == 1
}

fn place(dst: &DestinationRegions, first: u64, count: u64) {
    for p in first..first + count {
        dst.write_pages(&run(p, 1), &pattern(p)).unwrap();
    }
}

#[test]
fn residency_false_then_true_and_the_waiter_is_told() {
    let Some(dst) = destination("residency_false_then_true") else {
        return;
    };
    let res: Residency = dst.regions().unwrap().residency().expect("in post-copy");
    assert!(
        MemorySink::residency(&dst).is_some(),
        "the sink hands it to the Resumption"
    );
    assert!(!res.is_resident(&run(10, 4)).unwrap());
    assert!(!res.request(&run(10, 4), 7).unwrap(), "not there: a waiter");
    // The request reaches the session like a fault, but without one.
    let asked = dst.wait_fault(Duration::from_secs(5)).unwrap();
    assert_eq!(asked, Some(run(10, 4)));
    assert_eq!(dst.postcopy_stats().faults, 0, "nothing touched the pages");
    assert!(!readable(res.ready_fd(), 0));

    place(&dst, 10, 2);
    assert!(!res.is_resident(&run(10, 4)).unwrap(), "half placed");
    assert!(res.is_resident(&run(10, 2)).unwrap());
    assert!(!readable(res.ready_fd(), 0), "not ready before every page");
    assert!(res.take_ready().is_empty());

    place(&dst, 12, 2);
    assert!(readable(res.ready_fd(), 1000), "the eventfd tells");
    assert_eq!(res.take_ready(), vec![7]);
    assert!(!readable(res.ready_fd(), 0), "taken: readiness cleared");
    assert!(res.take_ready().is_empty(), "told once");
    assert!(res.is_resident(&run(10, 4)).unwrap());
    assert!(
        res.request(&run(11, 3), 8).unwrap(),
        "resident: answered at once"
    );
    assert!(!readable(res.ready_fd(), 0));
    // Bad input is refused, not queued.
    assert!(res.is_resident(&run(60, 10)).is_err());
    assert!(res.request(&PageRun::new(RegionId(9), 0, 1), 1).is_err());
    assert!(res.request(&run(0, 0), 1).is_err());

    place(&dst, 0, 10);
    place(&dst, 14, PAGES - 14);
    dst.end_postcopy().unwrap();
    assert!(
        res.is_resident(&run(0, PAGES as u32)).unwrap(),
        "a handle outlives post-copy"
    );
    let stats = dst.postcopy_stats();
    assert_eq!(stats.placed, PAGES, "every page filled once: {stats:?}");
}

/// A program touches page 30 (a fault) while another asks for it; a third
/// thread queries its residency throughout. Every "resident" answer comes
/// with the page's content in place and stays so; the waiter is told once;
/// the page is filled once.
#[test]
fn a_query_racing_the_placement_is_consistent() {
    let Some(dst) = destination("a_query_racing_the_placement") else {
        return;
    };
    let res = dst.regions().unwrap().residency().unwrap();
    let region = dst.regions().unwrap().get(R).unwrap();
    let stop = AtomicBool::new(false);
    let fills = AtomicU64::new(0);
    let (touched, seen_resident) = std::thread::scope(|s| {
        // The session: serves what it is asked (faults and requests), page
        // by page, each page once.
        let session = s.spawn(|| {
            let mut placed = [false; PAGES as usize];
            for _ in 0..100_000 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Some(r) = dst.wait_fault(Duration::from_millis(5)).unwrap() else {
                    continue;
                };
                for p in r.first..r.end() {
                    if !placed[p as usize] {
                        placed[p as usize] = true;
                        fills.fetch_add(1, Ordering::Relaxed);
                        place(&dst, p, 1);
                    }
                }
            }
        });
        let watcher = s.spawn(|| {
            let mut seen = false;
            for _ in 0..50_000_000 {
                // One more query after the stop: the page is in by then.
                let stopping = stop.load(Ordering::Acquire);
                let now = res.is_resident(&run(30, 1)).unwrap();
                assert!(!seen || now, "resident, then not");
                if now && !seen {
                    // Resident: reading cannot fault, and shows the data.
                    let mut b = vec![0u8; PS];
                    region.read_at(30 * PS, &mut b).unwrap();
                    assert_eq!(b, pattern(30), "resident before its content");
                    seen = true;
                }
                if stopping {
                    break;
                }
            }
            seen
        });
        let program = s.spawn(|| {
            let mut b = [0u8; 8];
            region.read_at(30 * PS, &mut b).unwrap();
            b
        });
        let ready = res.request(&run(30, 1), 42).unwrap();
        let touched = program.join().unwrap();
        if !ready {
            assert!(readable(res.ready_fd(), 10_000), "the waiter is told");
            assert_eq!(res.take_ready(), vec![42]);
        }
        stop.store(true, Ordering::Release);
        session.join().unwrap();
        (touched, watcher.join().unwrap())
    });
    assert_eq!(u64::from_le_bytes(touched), 30, "the toucher read the page");
    assert!(seen_resident, "the watcher saw it placed");
    assert!(res.take_ready().is_empty(), "told once");
    let stats = dst.postcopy_stats();
    assert_eq!(stats.placed, fills.load(Ordering::Relaxed));
    assert_eq!(stats.placed, 1, "page 30 filled once: {stats:?}");
}

/// A burst of requests from the program's loop: only a request into an
/// empty queue wakes the session's fault thread, and that thread, blocked
/// in `wait_fault`, still gets every run of the burst (none lost, each
/// once). A later single request wakes it again.
#[test]
fn a_burst_of_requests_reaches_the_fault_thread_whole() {
    let Some(dst) = destination("a_burst_of_requests") else {
        return;
    };
    let res: Residency = dst.regions().unwrap().residency().expect("in post-copy");
    let got = std::sync::Mutex::new(Vec::new());
    let taken = AtomicU64::new(0);
    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            // Bounded: 9 runs expected, each within 5 s.
            for _ in 0..9 {
                let r = dst.wait_fault(Duration::from_secs(5)).unwrap();
                let Some(r) = r else {
                    return Err("wait_fault timed out: a request did not wake it");
                };
                got.lock().unwrap().push(r);
                taken.fetch_add(1, Ordering::Release);
            }
            Ok(())
        });
        assert!(!res.request(&run(1, 1), 1).unwrap());
        // The first one is taken before the burst: the collector is back
        // in (or on its way into) `wait_fault` when the burst comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while taken.load(Ordering::Acquire) == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(taken.load(Ordering::Acquire), 1);
        for (i, p) in [5u64, 9, 13, 17, 21, 25].into_iter().enumerate() {
            assert!(!res.request(&run(p, 2), 10 + i as u64).unwrap());
        }
        while taken.load(Ordering::Acquire) < 7 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!res.request(&run(40, 1), 2).unwrap());
        assert!(!res.request(&run(50, 1), 3).unwrap());
        collector.join().unwrap().unwrap();
    });
    let mut got = got.into_inner().unwrap();
    got.sort_by_key(|r| r.first);
    let want: Vec<PageRun> = [
        (1, 1),
        (5, 2),
        (9, 2),
        (13, 2),
        (17, 2),
        (21, 2),
        (25, 2),
        (40, 1),
        (50, 1),
    ]
    .into_iter()
    .map(|(f, c)| run(f, c))
    .collect();
    assert_eq!(got, want, "every run once");
    assert_eq!(dst.postcopy_stats().faults, 0, "nothing touched");
    place(&dst, 0, PAGES);
    dst.end_postcopy().unwrap();
}

/// Many waiters on the same pages (parked requests for keys on one page):
/// the run is queued for the source once while it is queued or on its
/// way, every waiter is told once it is placed, and a run asked for again
/// after the queue drained is queued again (never lost).
#[test]
fn the_same_run_asked_by_many_is_queued_once_and_all_are_told() {
    let Some(dst) = destination("the_same_run_asked_by_many") else {
        return;
    };
    let res: Residency = dst.regions().unwrap().residency().expect("in post-copy");
    for token in 0..100 {
        assert!(!res.request(&run(20, 2), token).unwrap());
        assert!(!res.request(&run(30, 1), 1000 + token).unwrap());
    }
    assert_eq!(
        dst.wait_fault(Duration::from_secs(5)).unwrap(),
        Some(run(20, 2))
    );
    // Taken, but the queue is not empty: a third ask is still on its way.
    assert!(!res.request(&run(20, 2), 500).unwrap());
    assert_eq!(
        dst.wait_fault(Duration::from_secs(5)).unwrap(),
        Some(run(30, 1))
    );
    assert_eq!(
        dst.wait_fault(Duration::ZERO).unwrap(),
        None,
        "each run once"
    );
    // Drained: asked again, queued again.
    assert!(!res.request(&run(30, 1), 501).unwrap());
    assert_eq!(
        dst.wait_fault(Duration::from_secs(5)).unwrap(),
        Some(run(30, 1))
    );
    place(&dst, 20, 2);
    place(&dst, 30, 1);
    assert!(readable(res.ready_fd(), 1000));
    let mut ready = res.take_ready();
    ready.sort_unstable();
    let mut want: Vec<u64> = (0..100).chain(1000..1100).chain([500, 501]).collect();
    want.sort_unstable();
    assert_eq!(ready, want, "every waiter told once");
    place(&dst, 0, 20);
    place(&dst, 22, 8);
    place(&dst, 31, PAGES - 31);
    dst.end_postcopy().unwrap();
    assert_eq!(dst.postcopy_stats().placed, PAGES);
}

/// What the session's fault thread does, for the tests below: wait for a
/// run (up to `wait` each time), take every run queued with it (one batch,
/// one write in a session), place them; until `want` runs came (bounded
/// by `looks`). Returns the batches.
fn serve_batches(
    dst: &DestinationRegions,
    want: usize,
    wait: Duration,
    looks: usize,
) -> Vec<Vec<PageRun>> {
    let mut batches = Vec::new();
    let mut got = 0;
    for _ in 0..looks {
        let Some(first) = dst.wait_fault(wait).unwrap() else {
            continue;
        };
        let mut batch = vec![first];
        while let Some(r) = dst.wait_fault(Duration::ZERO).unwrap() {
            batch.push(r);
        }
        for r in &batch {
            place(dst, r.first, u64::from(r.count));
        }
        got += batch.len();
        batches.push(batch);
        if got >= want {
            break;
        }
    }
    batches
}

/// Take ready tokens until `n` came (bounded), sorted.
fn ready_tokens(res: &Residency, n: usize) -> Vec<u64> {
    let mut ready = Vec::new();
    for _ in 0..100 {
        if ready.len() >= n {
            break;
        }
        if readable(res.ready_fd(), 100) {
            ready.extend(res.take_ready());
        }
    }
    ready.sort_unstable();
    ready
}

/// The state letter of thread `tid` of this process (`S`: asleep).
fn thread_state(tid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
}

/// Wait (bounded) until `done`.
fn wait_until(done: impl Fn() -> bool) -> bool {
    for _ in 0..2000 {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

/// A loop's turn of deferred requests: none wakes the fault thread (asleep
/// in `wait_fault`, whose timeout is far away), the flush does, and it
/// takes them all in one batch; every run is placed once and every waiter
/// told once.
#[test]
fn deferred_requests_leave_together_at_the_flush_and_every_waiter_is_told() {
    let Some(dst) = destination("deferred_requests_leave_together") else {
        return;
    };
    let res: Residency = dst.regions().unwrap().residency().expect("in post-copy");
    let tid = std::sync::atomic::AtomicI32::new(0);
    let served = AtomicBool::new(false);
    let batches = std::thread::scope(|s| {
        let fault_thread = s.spawn(|| {
            tid.store(nix::unistd::gettid().as_raw(), Ordering::Release);
            let b = serve_batches(&dst, 21, Duration::from_secs(60), 2);
            served.store(true, Ordering::Release);
            b
        });
        // In `wait_fault`'s poll: its only sleep.
        let asleep = || {
            let t = tid.load(Ordering::Acquire);
            t != 0 && thread_state(t) == 'S'
        };
        assert!(wait_until(asleep), "the fault thread never slept");
        for i in 0..20u64 {
            assert!(!res.request_deferred(&run(2 * i, 1), i).unwrap());
        }
        // Parked twice on one page: queued once, both told.
        assert!(!res.request_deferred(&run(0, 1), 100).unwrap());
        assert!(!res.request_deferred(&run(41, 1), 101).unwrap());
        assert!(asleep(), "deferred requests woke the fault thread");
        res.flush_requests();
        // Long before its own timeout (60 s).
        assert!(
            wait_until(|| served.load(Ordering::Acquire)),
            "the flush did not wake the fault thread"
        );
        fault_thread.join().unwrap()
    });
    let mut want: Vec<PageRun> = (0..20).map(|i| run(2 * i, 1)).collect();
    want.push(run(41, 1));
    assert_eq!(batches, vec![want], "one batch at the flush, each run once");
    let mut tokens: Vec<u64> = (0..20).collect();
    tokens.extend([100, 101]);
    assert_eq!(ready_tokens(&res, 22), tokens, "every waiter told once");
    assert!(res.take_ready().is_empty());
    let stats = dst.postcopy_stats();
    assert_eq!((stats.faults, stats.placed), (0, 21), "{stats:?}");
    place(&dst, 0, PAGES);
    dst.end_postcopy().unwrap();
}

/// Deferral is bounded: a deferred request no flush follows is still handed
/// out when the fault thread next looks, and a plain request after a
/// deferred one takes it along.
#[test]
fn a_deferred_request_never_flushed_is_still_served() {
    let Some(dst) = destination("a_deferred_request_never_flushed") else {
        return;
    };
    let res: Residency = dst.regions().unwrap().residency().expect("in post-copy");
    let tid = std::sync::atomic::AtomicI32::new(0);
    let batches = std::thread::scope(|s| {
        // Looks every 50 ms (a session's `fault_poll`), at most 400 times.
        let fault_thread = s.spawn(|| {
            tid.store(nix::unistd::gettid().as_raw(), Ordering::Release);
            serve_batches(&dst, 1, Duration::from_millis(50), 400)
        });
        // Asked for while it sleeps: found at its next look.
        assert!(wait_until(|| {
            let t = tid.load(Ordering::Acquire);
            t != 0 && thread_state(t) == 'S'
        }));
        assert!(!res.request_deferred(&run(40, 1), 1).unwrap());
        fault_thread.join().unwrap()
    });
    assert_eq!(batches.concat(), vec![run(40, 1)], "served without a flush");
    assert_eq!(ready_tokens(&res, 1), vec![1]);

    let batches = std::thread::scope(|s| {
        let fault_thread = s.spawn(|| serve_batches(&dst, 2, Duration::from_secs(30), 4));
        assert!(!res.request_deferred(&run(44, 1), 2).unwrap());
        assert!(!res.request(&run(46, 1), 3).unwrap());
        fault_thread.join().unwrap()
    });
    let mut got = batches.concat();
    got.sort_by_key(|r| r.first);
    assert_eq!(got, vec![run(44, 1), run(46, 1)], "taken along");
    assert_eq!(ready_tokens(&res, 2), vec![2, 3]);
    place(&dst, 0, PAGES);
    dst.end_postcopy().unwrap();
    assert_eq!(dst.postcopy_stats().faults, 0);
}

/// This thread's nice value, from `/proc/thread-self/stat` (field 19).
/// The calling thread's EEVDF slice (`se.slice` of its `sched` file), if
/// the kernel reports one.
fn thread_slice_ns() -> Option<u64> {
    let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
    line.split(':').nth(1)?.trim().parse().ok()
}

fn thread_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // After the command name in parentheses: state is field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(16).unwrap().parse().unwrap()
}

/// The post-copy threads' priorities: the fault path asks for
/// `URGENT_THREAD_NICE` (granted with CAP_SYS_NICE, kept as it was
/// without), the bulk threads take `BACKGROUND_THREAD_NICE`, which needs
/// no privilege; each on the calling thread only.
#[test]
fn fault_path_and_bulk_threads_take_their_priorities() {
    let dst = DestinationRegions::new(Backing::Private);
    let src = RegionSet::new([RegionOptions::new(R, PAGES * PS as u64).map().unwrap()]).unwrap();
    let before = thread_nice();
    let (bulk, bulk_src) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            dst.background_thread();
            thread_nice()
        });
        let b = s.spawn(|| {
            MemorySource::background_thread(&src);
            thread_nice()
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(bulk, lmig_mem::BACKGROUND_THREAD_NICE);
    assert_eq!(bulk_src, lmig_mem::BACKGROUND_THREAD_NICE);
    let (urgent, slice) = std::thread::scope(|s| {
        s.spawn(|| {
            dst.urgent_thread();
            (thread_nice(), thread_slice_ns())
        })
        .join()
        .unwrap()
    });
    assert!(
        urgent == lmig_mem::URGENT_THREAD_NICE || urgent == before,
        "raised, or kept without CAP_SYS_NICE: {urgent}"
    );
    // The short slice comes with the raised priority (one sched_setattr),
    // where the kernel reports slices (EEVDF, Linux 6.6 and later).
    if urgent == lmig_mem::URGENT_THREAD_NICE {
        if let (Some(slice), Some(own)) = (slice, thread_slice_ns()) {
            println!("fault path slice {slice} ns, the test thread's {own} ns");
            assert!(
                slice == lmig_mem::URGENT_THREAD_SLICE.as_nanos() as u64 || slice == own,
                "the short slice, or the default where custom slices are not taken: {slice}"
            );
            assert!(slice <= own);
        }
    }
    println!(
        "fault path got nice {urgent} (asked {})",
        lmig_mem::URGENT_THREAD_NICE
    );
    assert_eq!(thread_nice(), before, "the test's own thread is untouched");
}

/// A fault thread's batch in one call (`MemorySink::take_faults`): the
/// threads blocked on faults come first (the userfaultfd is read in the
/// call), then the runs asked for ahead in the order asked, at most `max`
/// a call; what is left comes in the next call, each run once, none lost,
/// and every blocked thread reads its page once it is placed.
#[test]
fn take_faults_hands_out_the_faults_first_then_the_asked_runs_each_once() {
    let Some(dst) = destination("take_faults_faults_first") else {
        return;
    };
    let res: Residency = dst.regions().unwrap().residency().expect("in post-copy");
    let region = dst.regions().unwrap().get(R).unwrap();
    for p in 20..50u64 {
        assert!(!res.request(&run(p, 1), p).unwrap());
    }
    // Taken before any fault: the oldest run asked for.
    assert_eq!(
        dst.wait_fault(Duration::from_secs(5)).unwrap(),
        Some(run(20, 1))
    );
    let tids = [0, 0, 0].map(std::sync::atomic::AtomicI32::new);
    let (batch, rest, read) = std::thread::scope(|s| {
        let touchers: Vec<_> = [1u64, 3, 5]
            .into_iter()
            .zip(&tids)
            .map(|(p, tid)| {
                let region = &region;
                s.spawn(move || {
                    tid.store(nix::unistd::gettid().as_raw(), Ordering::Release);
                    let mut b = [0u8; 8];
                    region.read_at(p as usize * PS, &mut b).unwrap();
                    u64::from_le_bytes(b)
                })
            })
            .collect();
        // Every toucher asleep in its fault (its message is queued on the
        // userfaultfd before it sleeps).
        let blocked = || {
            tids.iter().all(|t| {
                let t = t.load(Ordering::Acquire);
                t != 0 && thread_state(t) == 'S'
            })
        };
        let blocked = wait_until(blocked);
        let mut batch = Vec::new();
        let n = dst.take_faults(&mut batch, 10).unwrap();
        let mut rest = Vec::new();
        let m = dst.take_faults(&mut rest, 1000).unwrap();
        let again = dst.take_faults(&mut rest, 1000).unwrap();
        // Every page taken, and the touched ones even if they were not: no
        // assertion before this point, so the joins never wait on a lost
        // fault (a failed test fails, it does not hang).
        let mut taken: Vec<u64> = batch.iter().chain(&rest).map(|r| r.first).collect();
        taken.extend([1, 3, 5]);
        taken.sort_unstable();
        taken.dedup();
        for p in taken {
            place(&dst, p, 1);
        }
        let read: Vec<u64> = touchers.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(blocked, "the touchers never blocked");
        assert_eq!((n, m, again), (10, 22, 0), "counts; each run once");
        (batch, rest, read)
    });
    let mut faults: Vec<u64> = batch[..3].iter().map(|r| r.first).collect();
    faults.sort_unstable();
    assert_eq!(faults, vec![1, 3, 5], "the faults first: {batch:?}");
    let asked: Vec<PageRun> = (21..28).map(|p| run(p, 1)).collect();
    assert_eq!(batch[3..], asked[..], "then the runs asked, in order");
    let left: Vec<PageRun> = (28..50).map(|p| run(p, 1)).collect();
    assert_eq!(rest, left, "the rest in the next call");
    assert_eq!(read, vec![1, 3, 5], "each toucher read its page");
    // Page 20 (taken by `wait_fault`) was not placed yet: its waiter waits.
    let told = ready_tokens(&res, 29);
    assert_eq!(
        told,
        (21..50).collect::<Vec<u64>>(),
        "every waiter told once"
    );
    place(&dst, 20, 1);
    assert_eq!(ready_tokens(&res, 1), vec![20]);
    let stats = dst.postcopy_stats();
    assert_eq!((stats.faults, stats.placed), (3, 33), "{stats:?}");
    for p in (0..PAGES).filter(|p| ![1, 3, 5].contains(p) && !(20..50).contains(p)) {
        place(&dst, p, 1);
    }
    dst.end_postcopy().unwrap();
}
