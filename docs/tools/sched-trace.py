#!/usr/bin/env python3
"""What a thread waited for in a window of a `perf record` of sched events.

Record (one migration, every CPU; s14-pre):
  quietrun sh -c 'perf record -a -m 16M -o trace.data -e sched:sched_switch \
    -e sched:sched_wakeup -e exceptions:page_fault_user -e tlb:tlb_flush \
    -e irq_vectors:call_function_entry -e irq_vectors:call_function_single_entry \
    -- lmig-bench migrate --mib 1024 --conns 1000 --mode precopy --dirty-mbps 100 --json'
  perf script -i trace.data -F comm,pid,tid,cpu,time,event,trace > trace.txt

Then: sched-trace.py trace.txt TID FROM:TO [FROM:TO ...]
(seconds from the first event). kvd's loop is the main thread of the source's
kvd process (the `lmig-bench` pid whose `kvd-admin-conn` thread faults most at
the start: the key load); the client load is the `netns-lmig*` thread with the
most switches; the rounds run while `lmig-lane*` threads exist (the first
lines print their span). Per window: the thread's wake-ups and who woke it,
its run-queue wait after a wake-up and after a preemption, its time on a CPU,
the events it took while there (faults, TLB flushes, IPIs), what ran on its
CPU and on the other one while it waited more than 0.1 ms, and every
thread's share of the CPUs.
"""
import collections
import re
import sys

SW = re.compile(r'prev_comm=(.*) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)')
WK = re.compile(r' pid=(\d+) .*target_cpu=(\d+)')


def pct(a, q):
    a = sorted(a)
    return a[min(len(a) - 1, int(q * len(a)))] if a else 0.0


def events(path):
    t0 = None
    for line in open(path):
        p = line.split(None, 5)
        if len(p) < 5:
            continue
        try:
            t = float(p[3].rstrip(':'))
        except ValueError:
            continue
        t0 = t if t0 is None else t0
        yield t - t0, p[0], p[1].split('/')[-1], int(p[2].strip('[]')), p[4], p[5] if len(p) > 5 else ''


def main():
    path, tid = sys.argv[1], sys.argv[2]
    wins = [tuple(map(float, w.split(':'))) for w in sys.argv[3:]]
    win = lambda t: next((i for i, (a, b) in enumerate(wins) if a <= t < b), None)
    n = len(wins)
    waits = [[] for _ in wins]        # (ms, after wake-up or preemption)
    bursts = [[] for _ in wins]
    wakers = [collections.Counter() for _ in wins]
    on_cpu = [collections.Counter() for _ in wins]
    here = [collections.Counter() for _ in wins]
    there = [collections.Counter() for _ in wins]
    share = [collections.Counter() for _ in wins]
    lanes = []
    cur, since = {}, {}
    state, t_wait, wcpu, t_in, cpu_in, last = 'S', None, None, None, None, None
    seg_here, seg_there = collections.Counter(), collections.Counter()

    def account(t):
        nonlocal last
        if state == 'R' and last is not None and wcpu is not None:
            seg_here[cur.get(wcpu, '?')] += t - last
            for c, who in cur.items():
                if c != wcpu:
                    seg_there[who] += t - last
        last = t

    for t, comm, ttid, cpu, ev, rest in events(path):
        if comm.startswith('lmig-lane'):
            lanes.append(t)
        w = win(t)
        if ev == 'sched:sched_switch:':
            account(t)
            _, prev, pst, ncomm, nxt = SW.search(rest).groups()
            if cpu in cur:
                for i, (a, b) in enumerate(wins):
                    lo, hi = max(since[cpu], a), min(t, b)
                    if hi > lo:
                        share[i][cur[cpu]] += hi - lo
            cur[cpu], since[cpu] = f'{ncomm}/{nxt}', t
            if prev == tid:
                if w is not None and t_in is not None:
                    bursts[w].append((t - t_in) * 1e3)
                t_in = None
                if pst.startswith('R'):
                    state, t_wait, wcpu, kind = 'R', t, cpu, 'preempted'
                    seg_here.clear(); seg_there.clear()
                else:
                    state = 'S'
            if nxt == tid:
                if state == 'R' and t_wait is not None and w is not None:
                    waits[w].append(((t - t_wait) * 1e3, kind))
                    if t - t_wait > 1e-4:
                        here[w].update(seg_here); there[w].update(seg_there)
                state, t_in, cpu_in, t_wait = 'ON', t, cpu, None
        elif ev == 'sched:sched_wakeup:':
            m = WK.search(rest)
            if m and m.group(1) == tid and state == 'S':
                account(t)
                state, t_wait, wcpu, kind = 'R', t, int(m.group(2)), 'woken'
                seg_here.clear(); seg_there.clear()
                if w is not None:
                    wakers[w][f'{comm}/{ttid}'] += 1
        elif state == 'ON' and cpu == cpu_in and w is not None:
            m = re.search(r'reason:([a-zA-Z ]+)', rest)
            on_cpu[w][ev.rstrip(':') + (' ' + m.group(1).strip() if m else '')] += 1
    if lanes:
        print(f'lanes from {min(lanes):.3f} to {max(lanes):.3f} s')
    ms = lambda c: [(k, round(v * 1e3, 1)) for k, v in c.most_common(8)]
    for i, (a, b) in enumerate(wins):
        d = b - a
        wk = [x for x, k in waits[i] if k == 'woken']
        pr = [x for x, k in waits[i] if k == 'preempted']
        print(f'== {a}-{b} s')
        print(f'  woken {len(wk) / d:.0f}/s, by {wakers[i].most_common(4)}')
        print(f'  wait after a wake-up ms: p50 {pct(wk, .5):.3f} p90 {pct(wk, .9):.3f} p99 {pct(wk, .99):.3f} '
              f'max {max(wk or [0]):.3f}, total {sum(wk):.1f} ({sum(wk) / d / 10:.1f} % of the window)')
        print(f'  preempted {len(pr) / d:.0f}/s, wait p99 {pct(pr, .99):.3f} total {sum(pr):.1f} ms')
        print(f'  on a CPU {sum(bursts[i]) / d / 10:.1f} %, bursts p50 {pct(bursts[i], .5):.3f} p99 {pct(bursts[i], .99):.3f} ms')
        print(f'  events on its CPU per s: {dict((k, round(v / d)) for k, v in on_cpu[i].items())}')
        print(f'  waits > 0.1 ms: its CPU ran {ms(here[i])}')
        print(f'                  the other CPU ran {ms(there[i])}')
        print(f'  CPU shares %: {[(k, round(v / d * 100, 1)) for k, v in share[i].most_common(10)]}')


if __name__ == '__main__':
    main()
