//! Restore and activation work split over threads, results in order.

use crate::inject::Injector;

/// Fewest records per thread for [`split_work`] to start threads: a thread
/// costs tens of µs to start and wake, a record about 8 µs to restore.
const MIN_PER_THREAD: usize = 32;

/// How many threads share `len` items (1: run on the calling thread).
fn threads_for(len: usize, threads: usize) -> usize {
    let threads = threads.clamp(1, 16);
    if len < MIN_PER_THREAD * threads {
        1
    } else {
        threads
    }
}

/// `work` on every part, the first on the calling thread and each other on
/// a thread of its own; the results in order. (The caller would only wait:
/// one thread fewer to start per batch, ~40 batches in a 10,000-connection
/// freeze.)
fn on_threads<P: Send, R: Send>(parts: Vec<P>, work: impl Fn(P) -> Vec<R> + Sync) -> Vec<R> {
    let work = &work;
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Vec::new();
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = parts.map(|part| s.spawn(move || work(part))).collect();
        let mut out = work(first);
        for h in handles {
            out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        out
    })
}

/// `f` on every item, on up to `threads` threads (each with its own
/// injector); the results in the items' order.
pub(super) fn split_work<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    f: impl Fn(T, &mut Injector) -> R + Sync,
) -> Vec<R> {
    let run = |part: Vec<T>| -> Vec<R> {
        let mut inj = Injector::default();
        part.into_iter().map(|t| f(t, &mut inj)).collect()
    };
    let threads = threads_for(items.len(), threads);
    if threads == 1 {
        return run(items);
    }
    let per = items.len().div_ceil(threads);
    let mut it = items.into_iter();
    let parts = (0..threads)
        .map(|_| it.by_ref().take(per).collect())
        .collect();
    on_threads(parts, run)
}

/// `f` on every item in place, as [`split_work`] splits; the items `f`
/// failed, by index, in order.
pub(super) fn split_in_place<T: Send, E: Send>(
    items: &mut [T],
    threads: usize,
    f: impl Fn(&mut T, &mut Injector) -> Option<E> + Sync,
) -> Vec<(usize, E)> {
    let run = |(first, part): (usize, &mut [T])| -> Vec<(usize, E)> {
        let mut inj = Injector::default();
        part.iter_mut()
            .enumerate()
            .filter_map(|(i, t)| f(t, &mut inj).map(|e| (first + i, e)))
            .collect()
    };
    let threads = threads_for(items.len(), threads);
    if threads == 1 {
        return run((0, items));
    }
    let per = items.len().div_ceil(threads);
    let parts = items
        .chunks_mut(per)
        .enumerate()
        .map(|(k, c)| (k * per, c))
        .collect();
    on_threads(parts, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_work_keeps_order_and_in_place_reports_failures_by_index() {
        for (len, threads) in [(0, 2), (5, 1), (5, 2), (1000, 2), (1001, 3), (4096, 16)] {
            let mut items: Vec<usize> = (0..len).collect();
            let failed = split_in_place(&mut items, threads, |x, _| {
                let seen = *x;
                *x += 1_000_000;
                (seen % 7 == 3).then_some(seen)
            });
            assert!(items.iter().enumerate().all(|(i, x)| *x == i + 1_000_000));
            let want: Vec<(usize, usize)> =
                (0..len).filter(|i| i % 7 == 3).map(|i| (i, i)).collect();
            assert_eq!(failed, want, "{len} items on {threads} threads");
            let doubled = split_work((0..len).collect(), threads, |x: usize, _| 2 * x);
            assert_eq!(doubled, (0..len).map(|x| 2 * x).collect::<Vec<_>>());
        }
    }
}
