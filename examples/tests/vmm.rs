//! The micro-VMM (issue 21): a guest in 64-bit ring 3 on real KVM fills its
//! buffer, sends heartbeats, dirties pages and checks its buffer; bad input
//! (no KVM device, a guest that faults) gets clear errors.

use std::time::Duration;

use std::collections::BTreeSet;

use lmig_core::model::{RegionId, RegionLayout, RegionPages};
use lmig_core::testing::privileged;
use lmig_examples::vmm::guest::{BUFFER_AT, halting_program, pattern};
use lmig_examples::vmm::{GUEST_REGION, Machine, MachineConfig, VmmError};

fn needs_kvm(test: &str) -> bool {
    privileged(test, "/dev/kvm (root)")
}

/// ~200 ms of guest: heartbeats count up one by one, at least a guest
/// millisecond apart; the guest's own buffer check passes while it dirties
/// pages, and sees one qword the host corrupted.
#[test]
fn guest_runs_heartbeats_and_checks_its_buffer() {
    if !needs_kvm("guest_runs_heartbeats_and_checks_its_buffer") {
        return;
    }
    let mut m = Machine::new(MachineConfig::new(64)).expect("machine");
    m.boot(8).expect("boot");
    m.start().expect("start");
    m.vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .expect("guest filled its buffer");
    std::thread::sleep(Duration::from_millis(200));
    let log = m.heartbeats();
    let tsc_per_ms = u64::from(m.tsc_khz());
    assert!(
        log.beats.len() >= 2,
        "heartbeats arrived: {}",
        log.beats.len()
    );
    for w in log.beats.windows(2) {
        assert_eq!(w[1].count, w[0].count + 1, "heartbeats count up by one");
        assert!(
            w[1].tsc - w[0].tsc >= tsc_per_ms,
            "heartbeats at least 1 ms of guest TSC apart"
        );
    }
    let mut host_gaps: Vec<u64> = log
        .beats
        .windows(2)
        .map(|w| w[1].host_ns - w[0].host_ns)
        .collect();
    host_gaps.sort_unstable();
    eprintln!(
        "{} heartbeats in ~200 ms; host interval median {:.3} ms, max {:.3} ms",
        log.beats.len(),
        host_gaps[host_gaps.len() / 2] as f64 / 1e6,
        log.max_gap_ns as f64 / 1e6
    );
    assert!(m.dirtied().unwrap() > 0, "the guest dirtied pages");
    assert_eq!(
        m.check_buffer(Duration::from_secs(30)).expect("check"),
        0,
        "the buffer check passes"
    );
    // A qword the guest never dirties (the last word of the buffer's page
    // 3), corrupted by the host: the guest's check counts it.
    let at = BUFFER_AT + 3 * 4096 + 4088;
    assert_eq!(m.memory().read_u64(at).unwrap(), pattern(at));
    m.memory().write_u64(at, !pattern(at)).unwrap();
    assert_eq!(
        m.check_buffer(Duration::from_secs(30)).expect("check"),
        1,
        "the check sees the corruption"
    );
    m.stop().expect("stop");
}

/// No KVM device: a clear error naming /dev/kvm.
#[test]
fn missing_kvm_is_a_clear_error() {
    let err = Machine::new(MachineConfig::new(64).kvm_path("/nonexistent/kvm")).unwrap_err();
    assert!(matches!(err, VmmError::NoKvm(_)), "{err:?}");
    assert!(err.to_string().contains("/dev/kvm"), "{err}");
}

/// A guest that executes `hlt` in ring 3 faults, and with no IDT the fault
/// becomes a triple fault: the VMM reports it instead of hanging.
#[test]
fn faulting_guest_is_a_clear_error() {
    if !needs_kvm("faulting_guest_is_a_clear_error") {
        return;
    }
    let mut m = Machine::new(MachineConfig::new(8).program(halting_program())).expect("machine");
    m.boot(0).expect("boot");
    m.start().expect("start");
    let err = m
        .vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .unwrap_err();
    assert!(matches!(err, VmmError::GuestExit(_)), "{err:?}");
    eprintln!("{err}");
    assert!(
        m.stop().is_err(),
        "the vCPU thread ended with the guest's failure"
    );
}

/// Bad sizes are refused before KVM is touched.
#[test]
fn bad_guest_size_is_refused() {
    for mib in [0, 3, 8192] {
        let err = Machine::new(MachineConfig::new(mib)).unwrap_err();
        assert!(matches!(err, VmmError::BadInput(_)), "{mib}: {err:?}");
    }
}

/// Issue 21's question: does lmig's uffd-wp tracker on the VMM's mapping
/// see the guest's writes (made through KVM's stage-2 mapping, not the
/// VMM's page tables)? The guest dirties pages round robin and counts them;
/// every page it dirtied between two collections must be in the set.
#[test]
fn uffd_wp_tracker_sees_guest_writes() {
    if !needs_kvm("uffd_wp_tracker_sees_guest_writes") {
        return;
    }
    let mut m = running_guest(64);
    let (tracker, choice) = lmig_mem::best_tracker(m.regions()).expect("tracker");
    eprintln!("tracker: {choice}");
    tracker_sees_guest_writes(&m, tracker);
    m.stop().expect("stop");
}

/// The same with KVM's dirty log (lmig's `track::kvm`: `KVM_GET_DIRTY_LOG`
/// and chunked `KVM_CLEAR_DIRTY_LOG` on guest RAM's two slots), and with
/// `KVM_GET_DIRTY_LOG` alone.
#[test]
fn kvm_dirty_log_tracker_sees_guest_writes() {
    if !needs_kvm("kvm_dirty_log_tracker_sees_guest_writes") {
        return;
    }
    let mut m = running_guest(64);
    let log = m.dirty_log().expect("dirty log");
    eprintln!("{} ({})", log.method(), log.support());
    tracker_sees_guest_writes(&m, log.tracker(m.regions().layout()));
    let plain = m.dirty_log().expect("dirty log").without_manual_protect();
    tracker_sees_guest_writes(&m, plain.tracker(m.regions().layout()));
    m.stop().expect("stop");
}

/// lmig's dirty-log kit against KVM's log with a running guest: the kit's
/// writes are the guest's own (it rewrites a qword of the page, through
/// KVM), over the buffer region (the guest writes nothing else there
/// unless asked; its parameter page, in the other region, changes every
/// millisecond). Both with manual protection (get + chunked clear) and
/// with `KVM_GET_DIRTY_LOG` alone.
#[test]
fn kvm_dirty_log_conforms_with_a_running_guest() {
    if !needs_kvm("kvm_dirty_log_conforms_with_a_running_guest") {
        return;
    }
    let mut m = running_guest(64);
    let layout = buffer_layout(&m);
    let touch = |_: RegionId, page: u64| guest_touch(&m, page);
    let log = m.dirty_log().expect("dirty log");
    assert!(
        log.support().manual_protect,
        "this kernel offers KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {}",
        log.support()
    );
    lmig_mem::conformance::dirty_log::check("KVM get+clear", &layout, log, &touch)
        .expect("KVM dirty log with manual protection");
    let plain = m.dirty_log().expect("dirty log").without_manual_protect();
    lmig_mem::conformance::dirty_log::check("KVM get", &layout, plain, &touch)
        .expect("KVM_GET_DIRTY_LOG alone");
    assert_eq!(
        m.check_buffer(Duration::from_secs(30)).expect("check"),
        0,
        "the touches left the guest's buffer as it was"
    );
    m.stop().expect("stop");
}

/// One body over both trackers on the same running guest: uffd-wp +
/// `PAGEMAP_SCAN` on the VMM's mapping, and KVM's dirty log through
/// `DirtyLogTracker`. Nothing reported right after `start`; exactly the
/// pages the guest wrote (word edges, a chunk edge, the middle, the last
/// page); clean after a collect; one page written again reported alone;
/// pages written while stopped forgotten by a fresh `start`.
#[test]
fn trackers_conform_on_the_same_running_guest() {
    if !needs_kvm("trackers_conform_on_the_same_running_guest") {
        return;
    }
    let mut m = running_guest(64);
    let (uffd, choice) = lmig_mem::best_tracker(m.regions()).expect("tracker");
    eprintln!("{choice}");
    tracker_conforms_on_guest(&m, "uffd-wp", uffd);
    let kvm = m.dirty_log().expect("dirty log");
    tracker_conforms_on_guest(&m, "kvm", kvm.tracker(m.regions().layout()));
    m.stop().expect("stop");
}

/// KVM's dirty ring (lmig's `KvmRingTracker`) on a running guest: the
/// same kit as the other trackers (exactly the pages the guest wrote,
/// clean after a collect, the paused collect, a fresh start forgets), and
/// every page the dirtying guest wrote, with a one-page ring (256 entries)
/// so the ring fills: the vCPU exits with `KVM_EXIT_DIRTY_RING_FULL`, the
/// VMM harvests, and nothing is lost.
#[test]
fn kvm_dirty_ring_conforms_on_a_running_guest() {
    if !needs_kvm("kvm_dirty_ring_conforms_on_a_running_guest") {
        return;
    }
    let mut m = running_guest_with(MachineConfig::new(64).dirty_ring(4096));
    let ring = m.dirty_ring().expect("ring").clone();
    assert_eq!(ring.bytes(), 4096);
    tracker_conforms_on_guest(&m, "kvm-ring", m.dirty_ring_tracker().expect("tracker"));
    let before = ring.full_exits();
    tracker_sees_guest_writes(&m, m.dirty_ring_tracker().expect("tracker"));
    eprintln!(
        "ring full exits: {}, entries harvested: {}",
        ring.full_exits() - before,
        ring.harvested()
    );
    assert!(
        ring.full_exits() > before,
        "the guest's ~1600 writes filled the 256-entry ring"
    );
    assert_eq!(
        m.check_buffer(Duration::from_secs(30)).expect("check"),
        0,
        "the guest's buffer is intact"
    );
    m.stop().expect("stop");
}

/// A ring tracker on a machine built without the ring is a clear error.
#[test]
fn dirty_ring_tracker_needs_the_ring() {
    if !needs_kvm("dirty_ring_tracker_needs_the_ring") {
        return;
    }
    let m = Machine::new(MachineConfig::new(8)).expect("machine");
    let err = m.dirty_ring_tracker().unwrap_err();
    assert!(err.to_string().contains("dirty ring"), "{err}");
}

/// The buffer region's layout (the region the guest writes only when asked).
fn buffer_layout(m: &Machine) -> RegionLayout {
    let info = m
        .regions()
        .layout()
        .regions()
        .iter()
        .find(|r| r.id == GUEST_REGION)
        .cloned()
        .expect("buffer region");
    RegionLayout::new(vec![info]).expect("layout")
}

/// The guest rewrites word 2 of buffer page `page` (its value unchanged).
fn guest_touch(m: &Machine, page: u64) {
    m.vcpu()
        .unwrap()
        .touch(BUFFER_AT + page * 4096 + 16, Duration::from_secs(10))
        .expect("guest touch");
}

fn tracker_conforms_on_guest(m: &Machine, name: &str, mut tracker: impl lmig_core::DirtyTracker) {
    let layout = m.regions().layout();
    let collect = |t: &mut dyn lmig_core::DirtyTracker| -> BTreeSet<u64> {
        let mut d = RegionPages::empty(layout);
        t.collect(&mut d).expect("collect");
        d.get(GUEST_REGION).unwrap().iter().collect()
    };
    let pages = m.regions().get(GUEST_REGION).unwrap().pages();
    let kit: BTreeSet<u64> = [0, 1, 63, 64, 65, 1023, 1024, pages / 2, pages - 1].into();
    for round in 0..2 {
        tracker.start().expect("start");
        assert!(
            collect(&mut tracker).is_empty(),
            "{name} (start {round}): nothing reported right after start"
        );
        for &p in &kit {
            guest_touch(m, p);
        }
        assert_eq!(
            collect(&mut tracker),
            kit,
            "{name} (start {round}): exactly the pages the guest wrote"
        );
        assert!(
            collect(&mut tracker).is_empty(),
            "{name} (start {round}): clean after a collect"
        );
        guest_touch(m, 65);
        assert_eq!(
            collect(&mut tracker),
            [65].into(),
            "{name} (start {round}): a page written again, alone"
        );
        // The freeze's collect (one call per region or slot): pages in
        // several 4 MiB chunks, and clean after it.
        let spread: BTreeSet<u64> = [2, 1023, 1024, 2049, pages - 2].into();
        for &p in &spread {
            guest_touch(m, p);
        }
        let mut d = RegionPages::empty(layout);
        tracker.collect_paused(&mut d).expect("paused collect");
        let got: BTreeSet<u64> = d.get(GUEST_REGION).unwrap().iter().collect();
        assert_eq!(got, spread, "{name} (start {round}): the paused collect");
        assert!(
            collect(&mut tracker).is_empty(),
            "{name} (start {round}): clean after a paused collect"
        );
        tracker.stop().expect("stop");
        // Written while stopped: forgotten by the next start.
        guest_touch(m, 7);
    }
}

fn running_guest(mib: u64) -> Machine {
    running_guest_with(MachineConfig::new(mib))
}

fn running_guest_with(config: MachineConfig) -> Machine {
    let mut m = Machine::new(config).expect("machine");
    m.boot(0).expect("boot");
    m.start().expect("start");
    m.vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .expect("ready");
    m
}

/// The guest dirties pages round robin and counts them; every page it
/// dirtied between two collections must be in the second one.
fn tracker_sees_guest_writes(m: &Machine, mut tracker: impl lmig_core::DirtyTracker) {
    tracker.start().expect("start tracking");
    let mut dirty = RegionPages::empty(m.regions().layout());
    tracker.collect(&mut dirty).expect("collect");
    let before = m.dirtied().unwrap();
    m.set_dirty_rate(16).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    m.set_dirty_rate(0).unwrap();
    // Let the guest's current tick finish (the count is written after it).
    std::thread::sleep(Duration::from_millis(20));
    let after = m.dirtied().unwrap();
    let mut dirty = RegionPages::empty(m.regions().layout());
    tracker.collect(&mut dirty).expect("collect");
    tracker.stop().expect("stop tracking");
    let buffer_pages = (64 << 20) / 4096 - BUFFER_AT / 4096;
    assert_eq!(m.regions().get(GUEST_REGION).unwrap().pages(), buffer_pages);
    assert!(after > before, "the guest dirtied pages");
    let pages = dirty.get(GUEST_REGION).unwrap();
    let mut missed = 0;
    for stamp in before..after {
        // Stamp s (1-based) went to buffer page (s - 1) mod buffer_pages
        // (page p of the buffer region).
        let page = stamp % buffer_pages;
        if !pages.contains(page) {
            missed += 1;
        }
    }
    eprintln!(
        "guest dirtied {} pages; tracker saw {} pages dirty",
        after - before,
        pages.count()
    );
    assert_eq!(missed, 0, "pages the guest wrote that the tracker missed");
}

/// Live migration of the running guest between two VMMs (threads of this
/// process, a loopback channel), pre-copy with the uffd-wp tracker: the
/// heartbeat counter continues on B from where A stopped, the guest's own
/// check passes on B, the digests are verified (the session fails if not),
/// and A's vCPU is stopped.
#[test]
fn running_guest_migrates_precopy() {
    if needs_kvm("running_guest_migrates_precopy") {
        migrate_running_guest(lmig_core::session::Mode::Precopy, Tracker::Uffd);
    }
}

/// Pre-copy with KVM's dirty log (lmig's `track::kvm`) as the tracker.
#[test]
fn running_guest_migrates_precopy_with_kvm_dirty_log() {
    if needs_kvm("running_guest_migrates_precopy_with_kvm_dirty_log") {
        migrate_running_guest(lmig_core::session::Mode::Precopy, Tracker::KvmLog);
    }
}

/// Hybrid: pre-copy rounds, then post-copy for what is left, KVM's log
/// as the tracker.
#[test]
fn running_guest_migrates_hybrid() {
    if needs_kvm("running_guest_migrates_hybrid") {
        migrate_running_guest(lmig_core::session::Mode::Hybrid, Tracker::KvmLog);
    }
}

/// The same in post-copy: B's vCPU runs at once and faults on every page
/// not there yet — kernel-mode userfaultfd faults, KVM touching guest
/// memory on the vCPU's behalf — served from A.
#[test]
fn running_guest_migrates_postcopy() {
    if needs_kvm("running_guest_migrates_postcopy") {
        migrate_running_guest(lmig_core::session::Mode::Postcopy, Tracker::Uffd);
    }
}

/// Pre-copy with KVM's dirty ring as the tracker (a ring of 64 KiB per
/// vCPU: the guest's 8 pages/ms fill it only across rounds).
#[test]
fn running_guest_migrates_precopy_with_kvm_dirty_ring() {
    if needs_kvm("running_guest_migrates_precopy_with_kvm_dirty_ring") {
        migrate_running_guest(lmig_core::session::Mode::Precopy, Tracker::KvmRing);
    }
}

/// The source's tracker in [`migrate_running_guest`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Tracker {
    Uffd,
    KvmLog,
    KvmRing,
}

fn migrate_running_guest(mode: lmig_core::session::Mode, tracker: Tracker) {
    let mut config = MachineConfig::new(64);
    if tracker == Tracker::KvmRing {
        config = config.dirty_ring(64 << 10);
    }
    migrate_running_guest_with(mode, tracker, config, MachineConfig::new(64), None, |_| {});
}

/// [`migrate_running_guest`] with A's and B's configs; B receives on a
/// thread at nice `receive_nice` (if any); `check` looks at B (its guest
/// running) before it stops.
fn migrate_running_guest_with(
    mode: lmig_core::session::Mode,
    tracker: Tracker,
    config_a: MachineConfig,
    config_b: MachineConfig,
    receive_nice: Option<i32>,
    check: impl FnOnce(&Machine),
) {
    use lmig_examples::vmm::migrate::{migrate_out, receive};
    use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};

    let mut a = Machine::new(config_a).expect("machine A");
    a.boot(8).expect("boot");
    a.start().expect("start");
    a.vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .expect("ready");
    let mut b = Machine::new(config_b).expect("machine B");
    let key = [7u8; 32];
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        ChannelConfig::new(AuthKey::new(key).unwrap()),
    )
    .expect("listen");
    let target = listener.local_endpoint().clone();
    let (out, inn) = std::thread::scope(|s| {
        let dest = s.spawn(|| {
            if let Some(nice) = receive_nice {
                lmig_examples::vmm::set_thread_nice(nice).expect("receiving thread's nice");
            }
            let channel = listener
                .accept_timeout(Duration::from_secs(30))
                .expect("accept");
            receive(&mut b, &channel)
        });
        std::thread::sleep(Duration::from_millis(50));
        let channel =
            connect(&target, ChannelConfig::new(AuthKey::new(key).unwrap())).expect("connect");
        let out = match tracker {
            Tracker::KvmLog => {
                let log = a.dirty_log().expect("dirty log");
                migrate_out(&a, &channel, log.tracker(a.regions().layout()), mode)
            }
            Tracker::KvmRing => {
                let ring = a.dirty_ring_tracker().expect("dirty ring");
                migrate_out(&a, &channel, ring, mode)
            }
            Tracker::Uffd => {
                let (tracker, _) = lmig_mem::best_tracker(a.regions()).expect("tracker");
                migrate_out(&a, &channel, tracker, mode)
            }
        };
        (out, dest.join().unwrap())
    });
    let out = out.expect("source");
    let inn = inn.expect("destination");
    let parked = a.heartbeats().total;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        a.heartbeats().total,
        parked,
        "A's vCPU stays parked after the commit"
    );
    a.stop().expect("stop A");
    let last_a = a.heartbeats().last.expect("A beat");
    std::thread::sleep(Duration::from_millis(100));
    let log_b = b.heartbeats();
    let first_b = log_b.beats.first().copied().expect("B beats");
    assert_eq!(
        first_b.count,
        last_a.count + 1,
        "the heartbeat counter continues on B"
    );
    assert_eq!(
        b.check_buffer(Duration::from_secs(30)).expect("check on B"),
        0,
        "the guest's check passes on B"
    );
    if mode == lmig_core::session::Mode::Postcopy {
        assert!(inn.report.postcopy_pages > 0, "pages came after the commit");
    }
    eprintln!(
        "{mode:?}: rounds {}, bytes {}, downtime {:.3} ms (vCPU stopped on A to running on B), heartbeat gap {:.3} ms",
        out.report.rounds,
        out.report.bytes_sent,
        (inn.resumed_ns.unwrap() - out.paused_ns.unwrap()) as f64 / 1e6,
        (first_b.host_ns - last_a.host_ns) as f64 / 1e6
    );
    check(&b);
    b.stop().expect("stop B");
}

/// `(nice, rt_priority, policy)` of thread `tid` of this process, from
/// its `/proc` stat (fields 19, 40 and 41).
fn thread_sched(tid: i32) -> (i64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    // Fields after the command (in parentheses, which may hold spaces).
    let rest: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    // `rest[0]` is field 3.
    let field = |n: usize| rest[n - 3];
    (
        field(19).parse().unwrap(),
        field(40).parse().unwrap(),
        field(41).parse().unwrap(),
    )
}

/// The vCPU thread's priority is the machine's on both sides: B's vCPU
/// thread, started at `Commit` by the receiving thread (here at nice 10),
/// does not inherit that thread's priority — SCHED_FIFO 1 when asked, and
/// nice 0 otherwise.
#[test]
fn vcpu_priority_holds_on_both_sides() {
    if !needs_kvm("vcpu_priority_holds_on_both_sides") {
        return;
    }
    const SCHED_FIFO: u64 = 1;
    let rt = || MachineConfig::new(64).vcpu_realtime(1);
    migrate_running_guest_with(
        lmig_core::session::Mode::Precopy,
        Tracker::KvmLog,
        rt(),
        rt(),
        Some(10),
        |b| {
            let tid = b.vcpu().unwrap().tid().expect("B's vCPU thread");
            let (_, prio, policy) = thread_sched(tid);
            assert_eq!(
                (policy, prio),
                (SCHED_FIFO, 1),
                "B's vCPU thread in SCHED_FIFO 1"
            );
        },
    );
    migrate_running_guest_with(
        lmig_core::session::Mode::Precopy,
        Tracker::KvmLog,
        MachineConfig::new(64),
        MachineConfig::new(64).vcpu_nice(0),
        Some(10),
        |b| {
            let tid = b.vcpu().unwrap().tid().expect("B's vCPU thread");
            let (nice, _, policy) = thread_sched(tid);
            assert_eq!((policy, nice), (0, 0), "B's vCPU thread at nice 0, not 10");
        },
    );
}

/// A migration that fails before `Commit` (B's guest memory has another
/// size, so B refuses the layout) leaves the guest running on A: heartbeats
/// go on, its buffer check passes.
#[test]
fn failed_migration_leaves_guest_running_on_source() {
    use lmig_core::session::Mode;
    use lmig_examples::vmm::migrate::{migrate_out, receive};
    use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};

    if !needs_kvm("failed_migration_leaves_guest_running_on_source") {
        return;
    }
    let mut a = Machine::new(MachineConfig::new(32)).expect("machine A");
    a.boot(4).expect("boot");
    a.start().expect("start");
    a.vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .expect("ready");
    let mut b = Machine::new(MachineConfig::new(16)).expect("machine B");
    let key = [9u8; 32];
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        ChannelConfig::new(AuthKey::new(key).unwrap()),
    )
    .expect("listen");
    let target = listener.local_endpoint().clone();
    let (out, inn) = std::thread::scope(|s| {
        let dest = s.spawn(|| {
            let channel = listener
                .accept_timeout(Duration::from_secs(30))
                .expect("accept");
            receive(&mut b, &channel)
        });
        let channel =
            connect(&target, ChannelConfig::new(AuthKey::new(key).unwrap())).expect("connect");
        let (tracker, _) = lmig_mem::best_tracker(a.regions()).expect("tracker");
        let out = migrate_out(&a, &channel, tracker, Mode::Precopy);
        (out, dest.join().unwrap())
    });
    assert!(out.is_err(), "the source reports the failure");
    assert!(inn.is_err(), "the destination refused");
    let before = a.heartbeats().total;
    std::thread::sleep(Duration::from_millis(50));
    assert!(a.heartbeats().total > before, "the guest still beats on A");
    assert_eq!(
        a.check_buffer(Duration::from_secs(30)).expect("check on A"),
        0
    );
    assert!(b.vcpu().is_err(), "B's vCPU never ran");
    a.stop().expect("stop A");
}

/// Slots that do not fit their regions are refused, naming the slot,
/// before any KVM call: past the region's end, overlapping, a repeated
/// number, an unknown region.
#[test]
fn bad_kvm_slot_maps_are_refused() {
    use lmig_examples::vmm::{GUEST_SLOT, LOW_REGION, LOW_SLOT};
    use lmig_mem::MemError;
    use lmig_mem::track::kvm::{KvmDirtyLog, KvmSlot};

    if !needs_kvm("bad_kvm_slot_maps_are_refused") {
        return;
    }
    let m = Machine::new(MachineConfig::new(8)).expect("machine");
    let pages = m.regions().get(GUEST_REGION).unwrap().pages();
    let cases: [(&str, Vec<KvmSlot>); 4] = [
        (
            "past the end",
            vec![KvmSlot::new(GUEST_SLOT, BUFFER_AT, GUEST_REGION).part(1, pages)],
        ),
        (
            "overlapping",
            vec![
                KvmSlot::new(GUEST_SLOT, BUFFER_AT, GUEST_REGION).part(0, 64),
                KvmSlot::new(5, BUFFER_AT + 63 * 4096, GUEST_REGION).part(63, 64),
            ],
        ),
        (
            "a repeated number",
            vec![
                KvmSlot::new(LOW_SLOT, 0, LOW_REGION),
                KvmSlot::new(LOW_SLOT, BUFFER_AT, GUEST_REGION),
            ],
        ),
        (
            "an unknown region",
            vec![KvmSlot::new(LOW_SLOT, 0, RegionId(99))],
        ),
    ];
    for (what, slots) in cases {
        let err = KvmDirtyLog::new(m.vm(), m.regions(), &slots).unwrap_err();
        eprintln!("{what}: {err}");
        assert!(
            matches!(
                err,
                MemError::InvalidRegion { .. } | MemError::UnknownRegion { .. }
            ),
            "{what}: {err:?}"
        );
    }
    assert!(KvmDirtyLog::new(m.vm(), m.regions(), &m.kvm_slots()).is_ok());
}
