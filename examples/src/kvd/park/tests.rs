//! Tests of kvd's parking, over a residency double.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use lmig_mem::RegionOptions;

use super::*;

/// Residency over a page set the test changes: a test double of the
/// lmig-mem handle (whose kernel side lmig-mem's tests exercise).
struct Pages {
    here: Mutex<Vec<bool>>,
    asked: Mutex<Vec<(PageRun, u64)>>,
    /// Tokens the next `take_ready` returns.
    ready: Mutex<Vec<u64>>,
    /// `settled` calls.
    settled: Mutex<u32>,
    /// Runs asked for with `request_deferred` and not flushed yet.
    deferred: Mutex<Vec<(PageRun, u64)>>,
    /// Sizes of the flushes (`flush_requests` calls).
    flushes: Mutex<Vec<usize>>,
    fd: OwnedFd,
}

impl Pages {
    fn new(pages: usize) -> Arc<Self> {
        Arc::new(Self {
            here: Mutex::new(vec![true; pages]),
            asked: Mutex::new(Vec::new()),
            ready: Mutex::new(Vec::new()),
            settled: Mutex::new(0),
            deferred: Mutex::new(Vec::new()),
            flushes: Mutex::new(Vec::new()),
            fd: std::fs::File::open("/dev/null").unwrap().into(),
        })
    }
}

impl Pages {
    /// A 1 MiB store region (id 1) and a residency over its pages, every
    /// page resident.
    fn region() -> (lmig_mem::Region, Arc<Self>) {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let res = Self::new(region.len() / PAGE as usize);
        (region, res)
    }

    /// Make the home page of each of `keys` resident (`here`) or missing.
    fn set_here(&self, keys: &[(String, u64)], here: bool) {
        let mut h = self.here.lock().unwrap();
        for (_, p) in keys {
            h[*p as usize] = here;
        }
    }
}

impl PageResidency for Pages {
    fn is_resident(&self, run: &PageRun) -> lmig_core::Result<bool> {
        let here = self.here.lock().unwrap();
        Ok((run.first..run.end()).all(|p| here[p as usize]))
    }
    fn request(&self, run: &PageRun, token: u64) -> lmig_core::Result<bool> {
        if self.is_resident(run)? {
            return Ok(true);
        }
        self.asked.lock().unwrap().push((*run, token));
        Ok(false)
    }
    fn take_ready(&self) -> Vec<u64> {
        std::mem::take(&mut *self.ready.lock().unwrap())
    }
    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn settled(&self) {
        *self.settled.lock().unwrap() += 1;
    }
    fn request_deferred(&self, run: &PageRun, token: u64) -> lmig_core::Result<bool> {
        if self.is_resident(run)? {
            return Ok(true);
        }
        self.deferred.lock().unwrap().push((*run, token));
        Ok(false)
    }
    fn flush_requests(&self) {
        let mut d = self.deferred.lock().unwrap();
        self.flushes.lock().unwrap().push(d.len());
        self.asked.lock().unwrap().append(&mut d);
    }
}

fn args(words: &[&str]) -> Args {
    words.iter().map(|w| w.as_bytes().to_vec()).collect()
}

#[test]
fn a_missing_key_parks_its_connection_in_order_and_others_run() {
    let (region, res) = Pages::region();
    let store = Store::format(&region);
    let mut parking = Parking::new(res.clone(), RegionId(1));
    // Make the home pages of "cold" missing.
    let cold = store.home_offset(b"cold") as u64 / PAGE;
    let warm = (0..1000)
        .map(|i| format!("warm{i}"))
        .find(|k| (store.home_offset(k.as_bytes()) as u64 / PAGE).abs_diff(cold) > 1)
        .expect("a key on another page");
    res.here.lock().unwrap()[cold as usize] = false;

    let get_cold = args(&["GET", "cold"]);
    let get_warm = args(&["GET", &warm]);
    assert_eq!(parking.admit(7, &store, get_cold.clone()), None, "parked");
    assert_eq!(
        res.asked.lock().unwrap().as_slice(),
        &[(PageRun::new(RegionId(1), cold, 2), 7)],
        "its pages asked for, token = connection"
    );
    // The same connection's next request waits behind, though warm.
    assert_eq!(parking.admit(7, &store, get_warm.clone()), None);
    // Another connection is served at once.
    assert_eq!(
        parking.admit(8, &store, get_warm.clone()),
        Some(get_warm.clone())
    );
    assert_eq!(parking.next(7, &store), None, "still missing");
    assert_eq!(
        res.asked.lock().unwrap().len(),
        1,
        "looked at again, not asked for again: its waiter stays"
    );
    res.here.lock().unwrap()[cold as usize] = true;
    assert_eq!(parking.next(7, &store), Some(get_cold), "in order");
    assert_eq!(parking.next(7, &store), Some(get_warm.clone()));
    assert_eq!(parking.next(7, &store), None);
    assert_eq!(parking.parked(), 2);
    // Drained: connection 7 runs directly again.
    assert_eq!(parking.admit(7, &store, get_warm.clone()), Some(get_warm));
}

/// Keys on distinct pages, none of them next to another.
fn keys_apart(store: &Store<'_>, n: usize) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for i in 0..10_000 {
        let k = format!("key{i}");
        let page = store.home_offset(k.as_bytes()) as u64 / PAGE;
        if out.iter().all(|(_, p)| p.abs_diff(page) > 2) {
            out.push((k, page));
        }
        if out.len() == n {
            break;
        }
    }
    assert_eq!(out.len(), n);
    out
}

#[test]
fn the_first_wave_is_said_settled_once_it_ran_and_not_before() {
    let (region, res) = Pages::region();
    let store = Store::format(&region);
    let mut parking = Parking::new(res.clone(), RegionId(1)).saying_settled(true);
    let keys = keys_apart(&store, 3);
    let get = |i: usize| args(&["GET", &keys[i].0]);
    let set_here = |i: usize, here: bool| {
        let p = keys[i].1 as usize;
        let mut h = res.here.lock().unwrap();
        h[p] = here;
        h[p + 1] = here;
    };
    for i in 0..3 {
        set_here(i, false);
    }
    // The freeze's backlog: connections 1 and 2 park (the first wave).
    assert_eq!(parking.admit(1, &store, get(0)), None);
    assert_eq!(parking.admit(2, &store, get(1)), None);
    // Connection 1's pages come: the wave closes; 1 runs.
    set_here(0, true);
    res.ready.lock().unwrap().push(1);
    assert_eq!(parking.take_ready(), vec![1]);
    assert_eq!(parking.next(1, &store), Some(get(0)));
    assert_eq!(*res.settled.lock().unwrap(), 0, "connection 2 still waits");
    // A later park (connection 3) is not in the wave: it does not
    // hold the word back.
    assert_eq!(parking.admit(3, &store, get(2)), None);
    set_here(1, true);
    res.ready.lock().unwrap().push(2);
    assert_eq!(parking.take_ready(), vec![2]);
    assert_eq!(parking.next(2, &store), Some(get(1)));
    assert_eq!(*res.settled.lock().unwrap(), 1, "the wave ran: said");
    assert!(parking.settled());
    // Once only, whatever parks and runs later.
    set_here(2, true);
    assert_eq!(parking.next(3, &store), Some(get(2)));
    parking.forget(3);
    assert_eq!(*res.settled.lock().unwrap(), 1);
}

#[test]
fn a_wave_whose_connections_closed_is_settled_too() {
    let (region, res) = Pages::region();
    let store = Store::format(&region);
    let mut parking = Parking::new(res.clone(), RegionId(1)).saying_settled(true);
    let keys = keys_apart(&store, 2);
    res.set_here(&keys, false);
    assert_eq!(parking.admit(1, &store, args(&["GET", &keys[0].0])), None);
    assert_eq!(parking.admit(2, &store, args(&["GET", &keys[1].0])), None);
    // Nothing said while no parked request could run yet.
    parking.forget(2);
    assert_eq!(*res.settled.lock().unwrap(), 0, "the wave is still open");
    res.ready.lock().unwrap().push(1);
    parking.take_ready();
    parking.forget(1);
    assert_eq!(*res.settled.lock().unwrap(), 1);
    // Not saying it (the default): never said.
    let mut quiet = Parking::new(res.clone(), RegionId(1));
    assert_eq!(quiet.admit(1, &store, args(&["GET", &keys[0].0])), None);
    res.ready.lock().unwrap().push(1);
    quiet.take_ready();
    quiet.forget(1);
    assert_eq!(*res.settled.lock().unwrap(), 1);
}

#[test]
fn a_turns_requests_are_asked_for_in_batches_and_flushed_once() {
    let (region, res) = Pages::region();
    let store = Store::format(&region);
    let mut parking = Parking::new(res.clone(), RegionId(1)).requesting_in_batches(3);
    let keys = keys_apart(&store, 7);
    res.set_here(&keys, false);
    // Seven parked requests in one turn: a flush after each three.
    for (i, (k, _)) in keys.iter().enumerate() {
        assert_eq!(parking.admit(i as u64, &store, args(&["GET", k])), None);
    }
    assert_eq!(*res.flushes.lock().unwrap(), vec![3, 3]);
    assert_eq!(res.deferred.lock().unwrap().len(), 1, "the seventh waits");
    // The end of the turn (before the loop polls) sends it.
    parking.flush();
    parking.flush();
    assert_eq!(
        *res.flushes.lock().unwrap(),
        vec![3, 3, 1],
        "once, and not again with nothing queued"
    );
    let asked = res.asked.lock().unwrap();
    assert_eq!(asked.len(), 7, "every request asked for once");
    for (i, (_, p)) in keys.iter().enumerate() {
        assert!(asked.contains(&(PageRun::new(RegionId(1), *p, 2), i as u64)));
    }
    drop(asked);
    // Without batches (0): each request is asked for at once.
    let mut each = Parking::new(res.clone(), RegionId(1));
    assert_eq!(each.admit(99, &store, args(&["GET", &keys[0].0])), None);
    assert_eq!(res.asked.lock().unwrap().len(), 8);
    each.flush();
    assert_eq!(res.flushes.lock().unwrap().len(), 3, "nothing to flush");
}

#[test]
fn a_quiet_poll_with_nothing_parked_says_settled_once() {
    let (region, res) = Pages::region();
    let store = Store::format(&region);
    let keys = keys_apart(&store, 1);
    res.set_here(&keys, false);
    // An idle destination: the first quiet poll says it.
    let mut idle = Parking::new(res.clone(), RegionId(1)).saying_settled(true);
    assert!(idle.awaiting_settle());
    idle.quiet();
    assert_eq!(*res.settled.lock().unwrap(), 1);
    assert!(idle.settled() && !idle.awaiting_settle());
    idle.quiet();
    assert_eq!(*res.settled.lock().unwrap(), 1, "once");
    // Something parked: a quiet poll does not say it (its pages are
    // on their way); once it ran, the wave's own rule or a quiet poll does.
    let mut busy = Parking::new(res.clone(), RegionId(1)).saying_settled(true);
    assert_eq!(busy.admit(1, &store, args(&["GET", &keys[0].0])), None);
    busy.quiet();
    assert_eq!(*res.settled.lock().unwrap(), 1, "parked: not said");
    res.set_here(&keys, true);
    assert!(busy.next(1, &store).is_some());
    busy.quiet();
    assert_eq!(*res.settled.lock().unwrap(), 2, "ran, then quiet: said");
    // Not saying it (the default): a quiet poll says nothing.
    let mut quiet = Parking::new(res.clone(), RegionId(1));
    assert!(!quiet.awaiting_settle());
    quiet.quiet();
    assert_eq!(*res.settled.lock().unwrap(), 2);
}
