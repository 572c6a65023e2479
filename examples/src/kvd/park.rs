//! kvd in post-copy without blocking its loop on a missing page: a request
//! whose key's pages are not here yet is parked, its pages are requested
//! through the memory's [`PageResidency`] (ahead of the push, without a
//! fault), and the loop serves other connections; when the residency
//! eventfd says the pages are in, the parked requests run, in order.
//!
//! Per-connection order is kept: once a connection has a parked request,
//! every later request of that connection waits behind it, even one whose
//! pages are here. Requests of other connections are not held up.
//!
//! What is checked before a request runs: the store's header page and the
//! two pages where the search for its key begins (its home slot's page and
//! the next, where a probe usually ends). A request that reads further (a
//! long probe, a collection's items) may still fault on a missing page:
//! the loop then blocks for that page's round trip, as before, never
//! wrong.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use lmig_core::PageResidency;
use lmig_core::model::{PageRun, RegionId};

use super::store::Store;

/// Page size of kvd's store region.
const PAGE: u64 = 4096;

/// Environment variable: the post-copy push's hold-off after the resume,
/// ms ([`push_holdoff`]); `0` turns it off (to compare).
pub const PUSH_HOLDOFF_ENV: &str = "LMIG_KVD_PUSH_HOLDOFF_MS";

/// kvd's hold-off when [`PUSH_HOLDOFF_ENV`] does not say: the first
/// pass over the requests that piled up in the freeze (about a thousand
/// parked at once with a thousand clients) is answered before the push
/// takes the CPU.
pub const PUSH_HOLDOFF: Duration = Duration::from_millis(50);

/// kvd's hold-off bound when it waits for the destination's word that the
/// first wave ran ([`holdoff_until_settled`]): that word ends it (about
/// 20–60 ms after the resume in the runs traced, docs/benchmarks.md,
/// s13-pc); the bound only covers a destination that never says it.
pub const PUSH_HOLDOFF_SETTLED: Duration = Duration::from_millis(150);

/// Environment variable: `0` turns off the destination kvd's word that its
/// first wave of parked requests ran ([`PageResidency::settled`]) and the
/// source kvd's wait for it ([`holdoff_until_settled`]): the hold-off then
/// ends after a few ms without requests (bound 50 ms), as before.
pub const HOLDOFF_SETTLED_ENV: &str = "LMIG_KVD_HOLDOFF_SETTLED";

/// Whether [`HOLDOFF_SETTLED_ENV`] is not `0`: the source's
/// [`SourceConfig::push_holdoff_until_settled`](lmig_core::session::SourceConfig::push_holdoff_until_settled),
/// and the destination's word. On by default: on a lightly loaded host it
/// took `client_stall_ms − freeze_ms` from 6.4–39.6 ms to 1.8–26.6 over 9
/// alternating pairs; on a quiet host it made no difference, under heavy
/// load no gain showed (docs/benchmarks.md, s13-pc).
pub fn holdoff_until_settled() -> bool {
    std::env::var_os(HOLDOFF_SETTLED_ENV).is_none_or(|v| v != "0")
}

/// The source's post-copy push hold-off
/// ([`SourceConfig::push_holdoff`](lmig_core::session::SourceConfig::push_holdoff)):
/// [`PUSH_HOLDOFF_SETTLED`] when it waits for the destination's word
/// ([`holdoff_until_settled`]), else [`PUSH_HOLDOFF`]; or
/// [`PUSH_HOLDOFF_ENV`]'s ms (capped at 1 s).
pub fn push_holdoff() -> Duration {
    let default = if holdoff_until_settled() {
        PUSH_HOLDOFF_SETTLED
    } else {
        PUSH_HOLDOFF
    };
    std::env::var(PUSH_HOLDOFF_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, |ms| Duration::from_millis(ms.min(1000)))
}

/// Environment variable: `1` runs the source's post-copy pusher in the
/// lowest class instead of at its nice level ([`idle_push`]).
pub const IDLE_PUSH_ENV: &str = "LMIG_KVD_IDLE_PUSH";

/// The source's
/// [`SourceConfig::idle_push`](lmig_core::session::SourceConfig::idle_push):
/// whether [`IDLE_PUSH_ENV`] is `1` (the pusher then takes only CPU time
/// kvd's loop, the client and the fault path leave; its requests never
/// wait for it, as kvd resends pages in flight). It takes effect with the
/// lowest-class hook ([`super::pace::idle_lanes`]). Off by default: on a
/// loaded host its post-copy phase took 2.4–3.4 s (the push ~1.6 s), and no
/// gain in the clients' figures could be shown (docs/benchmarks.md).
pub fn idle_push() -> bool {
    std::env::var_os(IDLE_PUSH_ENV).is_some_and(|v| v == "1")
}

/// Environment variable: a CPU on which the post-copy fault path's threads
/// are held (`lmig_mem::set_fault_path_cpu`); unset: left to the scheduler.
pub const FAULT_CPU_ENV: &str = "LMIG_KVD_FAULT_CPU";

/// Environment variable: `together` holds the post-copy fault path's
/// threads together on one CPU, the highest-numbered one kvd may run on
/// (a source and a destination kvd on one host choose the same), `free` leaves
/// them to the scheduler (`lmig_mem::set_fault_path_affinity`); unset: the
/// library's default. [`FAULT_CPU_ENV`], when set, goes first.
pub const FAULT_PATH_ENV: &str = "LMIG_KVD_FAULT_PATH";

/// Apply [`FAULT_CPU_ENV`], or else [`FAULT_PATH_ENV`], if set. A value
/// that is not a CPU this process may run on, or not a mode, is said on
/// stderr and ignored (the default stays).
pub fn apply_fault_path() {
    use lmig_mem::FaultPathAffinity;
    let (env, v) = match (std::env::var(FAULT_CPU_ENV), std::env::var(FAULT_PATH_ENV)) {
        (Ok(v), _) => (FAULT_CPU_ENV, v),
        (Err(_), Ok(v)) => (FAULT_PATH_ENV, v),
        (Err(_), Err(_)) => return,
    };
    let mode = match (env, v.as_str()) {
        (FAULT_PATH_ENV, "together") => Ok(FaultPathAffinity::Together),
        (FAULT_PATH_ENV, "free") => Ok(FaultPathAffinity::Free),
        (FAULT_PATH_ENV, _) => Err("expected together or free".to_string()),
        _ => v
            .parse::<usize>()
            .map(FaultPathAffinity::Cpu)
            .map_err(|e| e.to_string()),
    };
    let set = mode.and_then(|m| lmig_mem::set_fault_path_affinity(m).map_err(|e| e.to_string()));
    if let Err(e) = set {
        eprintln!("kvd: {env}={v} ignored: {e}");
    }
}

/// Environment variable: how many page requests kvd queues before it wakes
/// the destination's fault thread ([`request_batch`]); unset or `0`: each
/// request wakes it.
pub const REQUEST_BATCH_ENV: &str = "LMIG_KVD_REQUEST_BATCH";

/// Requests queued per wake-up of the fault thread: [`REQUEST_BATCH_ENV`]
/// (capped at 4096). With N > 0 the requests of one turn of the loop are
/// queued ([`PageResidency::request_deferred`]) and the fault thread is
/// woken once before the loop polls again, or after N: it sends them in
/// fewer, larger writes instead of taking the CPU from the loop once per
/// request. Off (0) by default: with N = 64 no gain in the clients'
/// figures beyond the spread showed (docs/benchmarks.md, s14-pc).
pub fn request_batch() -> usize {
    std::env::var(REQUEST_BATCH_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(0, |n| n.min(4096))
}

/// How long kvd's loop polls at most while its word that the resume's
/// parked work ran is unsaid: a poll that returns nothing after it, with
/// nothing parked, says it ([`Parking::quiet`]) — a destination with no
/// client work right after the resume does not hold the push until its
/// bound. Longer than the release of the packets held in the freeze
/// (those requests arrive within ~10 ms of the resume, docs/benchmarks.md,
/// s13-pc), so that their wave is not passed over.
pub const SETTLE_QUIET: Duration = Duration::from_millis(20);

/// Most requests one connection may have parked: a client pipelining
/// behind a missing key cannot make kvd hold more.
pub const MAX_PARKED_PER_CONN: usize = 1024;

/// One request's arguments.
pub type Args = Vec<Vec<u8>>;

/// One connection's parked requests.
#[derive(Default)]
struct Parked {
    requests: VecDeque<Args>,
    /// The first request's missing pages were asked for: their waiters
    /// stay until the pages are placed and then make the connection ready,
    /// so it is only looked at ([`PageResidency::is_resident`]), not asked
    /// for again (which would add a waiter and a request per look).
    asked: bool,
}

/// Requests parked until their pages are placed, per connection.
pub struct Parking {
    residency: Arc<dyn PageResidency>,
    region: RegionId,
    queues: HashMap<u64, Parked>,
    /// Requests parked so far (for INFO and tests).
    parked: u64,
    /// The first wave: what piled up in the freeze (see [`FirstWave`]).
    wave: FirstWave,
    /// Requests queued per wake-up of the fault thread (0: each wakes it).
    batch: usize,
    /// Requests queued since the last [`Parking::flush`].
    unflushed: Cell<usize>,
}

/// The connections that parked before any parked request could run (the
/// requests that piled up in the freeze, asked for in the first turns
/// after the resume). Once each of them ran all it had parked, kvd says
/// so ([`PageResidency::settled`]): the source's post-copy push, held off
/// meanwhile, then starts at once instead of at its bound, and no sooner
/// (a spell without requests comes whenever the loop is short of CPU).
#[derive(Default)]
struct FirstWave {
    /// kvd says it ([`Parking::saying_settled`]).
    enabled: bool,
    conns: HashSet<u64>,
    /// Pages came for a parked request: later parks are not in the wave.
    closed: bool,
    /// Said (once).
    settled: bool,
}

impl Parking {
    /// Parking over `residency` for the store in `region`.
    pub fn new(residency: Arc<dyn PageResidency>, region: RegionId) -> Self {
        Self {
            residency,
            region,
            queues: HashMap::new(),
            parked: 0,
            wave: FirstWave::default(),
            batch: 0,
            unflushed: Cell::new(0),
        }
    }

    /// Queue up to `batch` page requests before the fault thread is woken
    /// (also at each [`Self::flush`]); `0` (a new `Parking`'s) wakes it for
    /// each request. kvd's server takes [`request_batch`].
    #[must_use]
    pub fn requesting_in_batches(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Wake the fault thread for the requests queued since the last flush
    /// (kvd's loop calls it before each poll).
    pub fn flush(&self) {
        if self.unflushed.replace(0) > 0 {
            self.residency.flush_requests();
        }
    }

    /// Whether the loop should poll at most [`SETTLE_QUIET`]: the word that
    /// the resume's parked work ran is to be said and not said yet.
    pub fn awaiting_settle(&self) -> bool {
        self.wave.enabled && !self.wave.settled
    }

    /// The loop's poll returned nothing: with nothing parked, the work
    /// that piled up in the freeze ran (or there was none): say it, once.
    /// Not at the end of a pass that parked nothing: the requests held in
    /// the freeze may arrive after the first pass.
    pub fn quiet(&mut self) {
        if self.awaiting_settle() && self.queues.is_empty() {
            self.wave.settled = true;
            self.residency.settled();
        }
    }

    /// Say when the first wave ran (the connections that parked before any
    /// parked request could run). A new `Parking` does not; kvd's server
    /// turns it on unless `LMIG_KVD_HOLDOFF_SETTLED=0`.
    #[must_use]
    pub fn saying_settled(mut self, say: bool) -> Self {
        self.wave.enabled = say;
        self
    }

    /// The first wave ran in full: say it, once.
    fn settle_if_done(&mut self) {
        let w = &mut self.wave;
        if w.enabled && w.closed && !w.settled && w.conns.is_empty() {
            w.settled = true;
            self.residency.settled();
        }
    }

    /// Connection `id` has nothing parked any more.
    fn drained(&mut self, id: u64) {
        if self.wave.conns.remove(&id) {
            self.settle_if_done();
        }
    }

    /// Whether the first wave ran in full and was said.
    pub fn settled(&self) -> bool {
        self.wave.settled
    }

    /// The eventfd to poll: readable once parked requests may run.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.residency.ready_fd()
    }

    /// Requests parked so far.
    pub fn parked(&self) -> u64 {
        self.parked
    }

    /// Connections whose parked requests may run now (their pages came).
    /// The first that come close the first wave.
    pub fn take_ready(&mut self) -> Vec<u64> {
        let ready = self.residency.take_ready();
        if !ready.is_empty() && !self.wave.closed && !self.wave.conns.is_empty() {
            self.wave.closed = true;
            self.settle_if_done();
        }
        ready
    }

    /// The pages a request on `args` reads first.
    fn pages(&self, store: &Store<'_>, args: &[Vec<u8>]) -> Vec<PageRun> {
        let mut runs = vec![PageRun::new(self.region, 0, 1)];
        if let Some(key) = args.get(1) {
            let home = store.home_offset(key) as u64 / PAGE;
            let last = store.slots_end() as u64 / PAGE;
            let count = if home + 1 < last { 2 } else { 1 };
            runs.push(PageRun::new(self.region, home, count));
        }
        runs
    }

    /// Whether a page `args` needs is missing now (nothing asked for; a
    /// run that cannot be looked at counts as here: the request then runs
    /// and may fault, as without parking).
    fn still_missing(&self, store: &Store<'_>, args: &[Vec<u8>]) -> bool {
        self.pages(store, args)
            .iter()
            .any(|run| matches!(self.residency.is_resident(run), Ok(false)))
    }

    /// Whether a page `args` needs is missing now; the missing ones are
    /// requested with `id` as their token (a run that cannot be asked for
    /// counts as here: the request then runs and may fault, as without
    /// parking).
    fn missing(&self, id: u64, store: &Store<'_>, args: &[Vec<u8>]) -> bool {
        let mut missing = false;
        for run in self.pages(store, args) {
            let asked = if self.batch == 0 {
                self.residency.request(&run, id)
            } else {
                self.residency.request_deferred(&run, id)
            };
            match asked {
                Ok(true) | Err(_) => {}
                Ok(false) => missing = true,
            }
        }
        if missing && self.batch > 0 {
            let queued = self.unflushed.get() + 1;
            self.unflushed.set(queued);
            if queued >= self.batch {
                self.flush();
            }
        }
        missing
    }

    /// A request of connection `id` arrived: `Some(args)` to run it now,
    /// `None` when it was parked (its pages are asked for, or an earlier
    /// request of the connection waits).
    pub fn admit(&mut self, id: u64, store: &Store<'_>, args: Args) -> Option<Args> {
        if let Some(q) = self.queues.get_mut(&id) {
            q.requests.push_back(args);
            self.parked += 1;
            return None;
        }
        if !self.missing(id, store, &args) {
            return Some(args);
        }
        let q = self.queues.entry(id).or_default();
        q.requests.push_back(args);
        q.asked = true;
        self.parked += 1;
        if !self.wave.closed {
            self.wave.conns.insert(id);
        }
        None
    }

    /// The next parked request of `id` that may run now, in order; `None`
    /// when there is none, or when the first still waits (asked for again).
    pub fn next(&mut self, id: u64, store: &Store<'_>) -> Option<Args> {
        let q = self.queues.get(&id)?;
        let front = q.requests.front()?;
        let waiting = if q.asked {
            self.still_missing(store, front)
        } else {
            self.missing(id, store, front)
        };
        let q = self.queues.get_mut(&id)?;
        if waiting {
            q.asked = true;
            return None;
        }
        let args = q.requests.pop_front();
        q.asked = false;
        if q.requests.is_empty() {
            self.queues.remove(&id);
            self.drained(id);
        }
        args
    }

    /// Connection `id` holds as many parked requests as it may
    /// ([`MAX_PARKED_PER_CONN`]): its loop stops reading from it (TCP
    /// pushes back on the client) until they ran.
    pub fn full(&self, id: u64) -> bool {
        self.queues
            .get(&id)
            .is_some_and(|q| q.requests.len() >= MAX_PARKED_PER_CONN)
    }

    /// The connection closed: its parked requests go with it.
    pub fn forget(&mut self, id: u64) {
        self.queues.remove(&id);
        self.drained(id);
    }
}

#[cfg(test)]
mod tests;
