//! `lmig_mem::cpu`: the lowest CPU class (`SCHED_IDLE`) for the calling
//! thread and for the whole process, and back, read back from the kernel
//! (`sched_getattr`). One test in this binary: `idle_process` moves every
//! thread of the process.

use std::sync::mpsc;

use lmig_mem::cpu;

#[test]
fn threads_and_the_process_move_to_the_lowest_class_and_back() {
    let me = cpu::current_tid();
    assert!(
        !cpu::is_idle(me),
        "a test thread starts in the normal class"
    );
    if !cpu::may_leave_idle() {
        // Without CAP_SYS_NICE or RLIMIT_NICE nothing may be lowered for
        // good: both refuse and leave every thread where it was.
        assert!(!cpu::idle_thread(true));
        assert!(!cpu::idle_process(true));
        assert!(!cpu::is_idle(me));
        return;
    }
    // The calling thread.
    assert!(cpu::idle_thread(true));
    assert!(cpu::is_idle(me));
    assert!(cpu::idle_thread(false));
    assert!(!cpu::is_idle(me));

    // The process: a thread already idle stays so, the others come back,
    // a thread started meanwhile by a lowered thread comes back too.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let waiter = std::thread::spawn(move || {
        tid_tx.send(cpu::current_tid()).unwrap();
        go_rx.recv().unwrap();
    });
    let waiter_tid = tid_rx.recv().unwrap();
    let (idle_tx, idle_rx) = mpsc::channel();
    let (go2_tx, go2_rx) = mpsc::channel::<()>();
    let already = std::thread::spawn(move || {
        assert!(cpu::idle_thread(true));
        idle_tx.send(cpu::current_tid()).unwrap();
        go2_rx.recv().unwrap();
    });
    let already_tid = idle_rx.recv().unwrap();

    assert!(cpu::idle_process(true));
    assert!(cpu::is_idle(me));
    assert!(cpu::is_idle(waiter_tid));
    let (late_tx, late_rx) = mpsc::channel();
    let (go3_tx, go3_rx) = mpsc::channel::<()>();
    let late = std::thread::spawn(move || {
        late_tx.send(cpu::current_tid()).unwrap();
        go3_rx.recv().unwrap();
    });
    let late_tid = late_rx.recv().unwrap();
    assert!(cpu::is_idle(late_tid), "inherited from the lowered thread");

    assert!(cpu::idle_process(false));
    assert!(!cpu::is_idle(me));
    assert!(!cpu::is_idle(waiter_tid));
    assert!(!cpu::is_idle(late_tid));
    assert!(cpu::is_idle(already_tid), "was idle before: left there");
    // Raising twice is a no-op.
    assert!(cpu::idle_process(false));

    for (tx, t) in [(go_tx, waiter), (go2_tx, already), (go3_tx, late)] {
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
