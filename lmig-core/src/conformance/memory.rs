//! The memory kit: [`check_source`] for a [`MemorySource`], [`check_sink`]
//! for a [`MemorySink`].
//!
//! Rules of a source:
//! * the layout is stable (two calls agree) and holds a region;
//! * pages read back as the program wrote them, one page or a run of several;
//! * `find_zero_pages`, when it answers, flags exactly the zero pages;
//! * `populated`, when it answers, lists every page that holds data;
//! * a bad run (unknown region, past the end, crossing the end, no pages)
//!   or a buffer of the wrong length is refused with an error, not a panic.
//!
//! Rules of a sink:
//! * `prepare` accepts the layout and refuses one that does not match
//!   (another region, another length) — and still accepts the right one after;
//! * pages read back as written; a rewrite wins; neighbours stay as they were;
//! * `zero_pages` zeroes exactly its run (a page or a whole region), and
//!   the zeroed pages take data again;
//! * a bad run or a buffer of the wrong length is refused with an error,
//!   not a panic, before any byte moves;
//! * pages placed from several threads at once all land;
//! * after `discard`, the sink takes a new attempt (`prepare` again, pages again).
//!
//! Rules of a post-copy sink ([`check_postcopy`]; a sink whose
//! `begin_postcopy` is `Unsupported` passes with a printed note):
//! * `begin_postcopy` drops the stale content of the missing pages and
//!   leaves the others as they were;
//! * a read of a missing page waits, `wait_fault` reports the page, and
//!   `write_pages` wakes the reader with the placed content;
//! * `end_postcopy` succeeds once every missing page is placed, and pages
//!   are written and read as before after it.
//!
//! The kit writes to every region it is given: run it on memory made for
//! the test, not on a running program's.

use std::time::{Duration, Instant};

use crate::MemorySink;
use crate::MemorySource;
use crate::error::MigrationError;
use crate::model::{PageRun, RegionId, RegionInfo, RegionLayout, RegionPages};

use super::{Conformance, Judge, Violation};

const READ_BACK: &str = "pages read back as written";
const BAD_RUN: &str = "a bad run or buffer is refused with an error, not a panic";
const UNTOUCHED: &str = "a refused call changes no byte";
const ZERO: &str = "zero_pages zeroes exactly its run";
const FIND_ZERO: &str = "find_zero_pages flags exactly the zero pages";
const POPULATED: &str = "populated lists every page that holds data";
const PREPARE: &str = "prepare accepts the announced layout";
const MISMATCH: &str = "prepare refuses a layout that does not match";
const THREADS: &str = "pages placed from several threads at once all land";
const RETRY: &str = "after discard the sink takes a new attempt";
const LAYOUT: &str = "the layout is stable and holds a region";
const POSTCOPY: &str =
    "a read of a missing page waits until it is placed, and wait_fault reports it";
const POSTCOPY_END: &str = "end_postcopy succeeds once every page is placed";

/// The content the kit writes to `page` of `region`: no page equals
/// another, none is zero.
fn pattern(region: RegionId, page: u64, salt: u8, len: usize) -> Vec<u8> {
    let seed = (u64::from(region.0) * 31 + page * 13 + u64::from(salt) * 101) as usize;
    let mut v: Vec<u8> = (0..len).map(|i| (seed + i * 7) as u8).collect();
    v[0] = salt | 1;
    if len >= 8 {
        v[len - 8..].copy_from_slice(&page.to_le_bytes());
    }
    v
}

/// The pages the kit probes in a region: the edges and the middle.
fn probe_pages(pages: u64) -> Vec<u64> {
    let mut v = vec![0, 1, pages / 2, pages.saturating_sub(2), pages - 1];
    v.retain(|p| *p < pages);
    v.sort_unstable();
    v.dedup();
    v
}

/// A region id absent from `layout`.
fn unknown_region(layout: &RegionLayout) -> RegionId {
    (0..=layout.regions().len() as u32)
        .map(RegionId)
        .find(|id| layout.get(*id).is_err())
        .unwrap_or(RegionId(u32::MAX))
}

/// The bad runs every backend must refuse, with the reason of each.
fn bad_runs(layout: &RegionLayout, r: &RegionInfo) -> Vec<(PageRun, &'static str)> {
    let pages = r.pages();
    vec![
        (
            PageRun::new(unknown_region(layout), 0, 1),
            "a region not in the layout",
        ),
        (PageRun::new(r.id, pages, 1), "a page past the end"),
        (
            PageRun::new(r.id, pages - 1, 2),
            "a run crossing the end (its first page is valid)",
        ),
        (PageRun::new(r.id, 0, 0), "a run of no pages"),
        (
            PageRun::new(r.id, u64::MAX, 1),
            "a first page whose byte offset overflows",
        ),
    ]
}

fn page_bytes(r: &RegionInfo, count: u64) -> usize {
    r.bytes(count) as usize
}

/// Check a [`MemorySource`]; `fill(region, page, bytes)` writes a whole
/// page of the source's memory as the program would.
pub fn check_source<S: MemorySource + ?Sized>(
    name: &str,
    source: &S,
    fill: &dyn Fn(RegionId, u64, &[u8]),
) -> Conformance {
    let j = Judge::new(name);
    let layout = j.no_panic(LAYOUT, "layout()", || source.layout())?;
    let again = j.no_panic(LAYOUT, "layout()", || source.layout())?;
    j.rule(
        LAYOUT,
        layout == again && !layout.regions().is_empty(),
        || format!("first {layout:?}, then {again:?}"),
    )?;
    let read = |run: &PageRun, len: usize| -> Result<Vec<u8>, Violation> {
        let mut buf = vec![0u8; len];
        let call = format!("read_pages({run})");
        j.no_panic(READ_BACK, &call, || source.read_pages(run, &mut buf))
            .and_then(|r| j.ok(READ_BACK, &call, r))?;
        Ok(buf)
    };
    for r in layout.regions() {
        let ps = page_bytes(r, 1);
        let pages = r.pages();
        // A run of up to four pages from page 0, page 1 of it zero, and the probes.
        let run_len = pages.min(4);
        let mut content: Vec<(u64, Vec<u8>)> = Vec::new();
        for p in (0..run_len).chain(probe_pages(pages)) {
            let data = if p == 1 {
                vec![0u8; ps]
            } else {
                pattern(r.id, p, 1, ps)
            };
            fill(r.id, p, &data);
            content.retain(|(q, _)| *q != p);
            content.push((p, data));
        }
        for (p, want) in &content {
            let got = read(&PageRun::new(r.id, *p, 1), ps)?;
            j.rule(READ_BACK, got == *want, || {
                format!("page {p} of region {} differs from what was written", r.id)
            })?;
        }
        let run = PageRun::new(r.id, 0, run_len as u32);
        let got = read(&run, page_bytes(r, run_len))?;
        let want: Vec<u8> = (0..run_len)
            .flat_map(|p| content.iter().find(|(q, _)| *q == p).unwrap().1.clone())
            .collect();
        j.rule(READ_BACK, got == want, || {
            format!("the run {run} differs from its pages as written")
        })?;
        let mut flags = vec![false; run_len as usize];
        let call = format!("find_zero_pages({run})");
        let answered = j
            .no_panic(FIND_ZERO, &call, || {
                source.find_zero_pages(&run, &mut flags)
            })
            .and_then(|r| j.ok(FIND_ZERO, &call, r))?;
        if answered {
            let want: Vec<bool> = (0..run_len).map(|p| p == 1).collect();
            j.rule(FIND_ZERO, flags == want, || {
                format!("flags {flags:?}, but the zero pages are {want:?}")
            })?;
        }
        check_source_refusals(&j, source, &layout, r)?;
    }
    let mut populated = RegionPages::empty(&layout);
    let answered = j
        .no_panic(POPULATED, "populated()", || {
            source.populated(&mut populated)
        })
        .and_then(|r| j.ok(POPULATED, "populated()", r))?;
    if answered {
        for r in layout.regions() {
            for p in (0..r.pages().min(4)).chain(probe_pages(r.pages())) {
                let listed = populated.get(r.id).is_ok_and(|s| s.contains(p));
                j.rule(POPULATED, p == 1 || listed, || {
                    format!("page {p} of region {} holds data but is not listed", r.id)
                })?;
            }
        }
    }
    Ok(())
}

fn check_source_refusals<S: MemorySource + ?Sized>(
    j: &Judge,
    source: &S,
    layout: &RegionLayout,
    r: &RegionInfo,
) -> Conformance {
    for (run, what) in bad_runs(layout, r) {
        let mut buf = vec![0u8; page_bytes(r, u64::from(run.count))];
        let call = format!("read_pages({run}) ({what})");
        j.refused(BAD_RUN, &call, || source.read_pages(&run, &mut buf))?;
    }
    let run = PageRun::new(r.id, 0, 1);
    for len in [page_bytes(r, 1) - 1, page_bytes(r, 1) + 1] {
        let mut buf = vec![0u8; len];
        let call = format!("read_pages({run}) into {len} bytes");
        j.refused(BAD_RUN, &call, || source.read_pages(&run, &mut buf))?;
    }
    // A flag slice shorter than the run: an error or "cannot tell", never a panic.
    let run = PageRun::new(r.id, 0, r.pages().min(2) as u32);
    let mut flags = vec![false; run.count as usize - 1];
    let call = format!("find_zero_pages({run}) with {} flags", flags.len());
    let _ = j.no_panic(BAD_RUN, &call, || source.find_zero_pages(&run, &mut flags))?;
    Ok(())
}

/// Check a [`MemorySink`] that will receive `layout` (at least one region;
/// regions of eight pages or more exercise every rule).
pub fn check_sink<K: MemorySink + ?Sized>(
    name: &str,
    sink: &K,
    layout: &RegionLayout,
) -> Conformance {
    let j = Judge::new(name);
    j.rule(LAYOUT, !layout.regions().is_empty(), || {
        "the kit was given a layout without regions".into()
    })?;
    prepare(&j, sink, layout)?;
    check_mismatches(&j, sink, layout)?;
    prepare(&j, sink, layout)?;
    for r in layout.regions() {
        check_sink_region(&j, sink, layout, r)?;
    }
    check_threads(&j, sink, &layout.regions()[0])?;
    j.no_panic(RETRY, "discard()", || sink.discard())?;
    let call = "prepare(the same layout) after discard";
    j.no_panic(RETRY, call, || sink.prepare(layout))
        .and_then(|r| j.ok(RETRY, call, r))?;
    for r in layout.regions() {
        let run = PageRun::new(r.id, 0, 1);
        let data = pattern(r.id, 0, 9, page_bytes(r, 1));
        let call = format!("write_pages({run}) after discard");
        j.no_panic(RETRY, &call, || sink.write_pages(&run, &data))
            .and_then(|r| j.ok(RETRY, &call, r))?;
        let got = sink_read(&j, RETRY, sink, &run, page_bytes(r, 1))?;
        j.rule(RETRY, got == data, || {
            format!(
                "page 0 of region {} differs after discard and rewrite",
                r.id
            )
        })?;
    }
    Ok(())
}

fn prepare<K: MemorySink + ?Sized>(j: &Judge, sink: &K, layout: &RegionLayout) -> Conformance {
    j.no_panic(PREPARE, "prepare(layout)", || sink.prepare(layout))
        .and_then(|r| j.ok(PREPARE, "prepare(layout)", r))
}

fn check_mismatches<K: MemorySink + ?Sized>(
    j: &Judge,
    sink: &K,
    layout: &RegionLayout,
) -> Conformance {
    let first = &layout.regions()[0];
    let mut extra = layout.regions().to_vec();
    let other = unknown_region(layout);
    extra.push(RegionInfo {
        id: other,
        len: first.bytes(4),
        page_size: first.page_size,
        fixed_addr: None,
    });
    let mut resized = layout.regions().to_vec();
    resized[0].len = if first.pages() > 1 {
        first.len - u64::from(first.page_size)
    } else {
        first.len + u64::from(first.page_size)
    };
    for (regions, what) in [(extra, "an extra region"), (resized, "region resized")] {
        let Ok(bad) = RegionLayout::new(regions) else {
            continue;
        };
        let call = format!("prepare(a layout with {what})");
        j.refused(MISMATCH, &call, || sink.prepare(&bad))?;
    }
    Ok(())
}

fn sink_read<K: MemorySink + ?Sized>(
    j: &Judge,
    rule: &'static str,
    sink: &K,
    run: &PageRun,
    len: usize,
) -> Result<Vec<u8>, Violation> {
    let mut buf = vec![0u8; len];
    let call = format!("read_pages({run})");
    j.no_panic(rule, &call, || sink.read_pages(run, &mut buf))
        .and_then(|r| j.ok(rule, &call, r))?;
    Ok(buf)
}

fn sink_write<K: MemorySink + ?Sized>(
    j: &Judge,
    rule: &'static str,
    sink: &K,
    run: &PageRun,
    data: &[u8],
) -> Conformance {
    let call = format!("write_pages({run})");
    j.no_panic(rule, &call, || sink.write_pages(run, data))
        .and_then(|r| j.ok(rule, &call, r))
}

fn check_sink_region<K: MemorySink + ?Sized>(
    j: &Judge,
    sink: &K,
    layout: &RegionLayout,
    r: &RegionInfo,
) -> Conformance {
    let ps = page_bytes(r, 1);
    let pages = r.pages();
    let page = |p: u64| PageRun::new(r.id, p, 1);
    let probes = probe_pages(pages);
    for &p in &probes {
        sink_write(j, READ_BACK, sink, &page(p), &pattern(r.id, p, 1, ps))?;
    }
    let expect = |rule: &'static str, p: u64, want: &[u8], when: &str| -> Conformance {
        let got = sink_read(j, rule, sink, &page(p), ps)?;
        j.rule(rule, got == want, || {
            format!("page {p} of region {} is not as written {when}", r.id)
        })
    };
    for &p in &probes {
        expect(READ_BACK, p, &pattern(r.id, p, 1, ps), "")?;
    }
    // A run of several pages, read whole and in part; then a rewrite.
    let n = pages.min(4);
    let data: Vec<u8> = (0..n).flat_map(|p| pattern(r.id, p, 2, ps)).collect();
    sink_write(j, READ_BACK, sink, &PageRun::new(r.id, 0, n as u32), &data)?;
    let got = sink_read(
        j,
        READ_BACK,
        sink,
        &PageRun::new(r.id, 0, n as u32),
        data.len(),
    )?;
    j.rule(READ_BACK, got == data, || {
        format!("a run of {n} pages of region {} differs", r.id)
    })?;
    for p in 0..n {
        expect(READ_BACK, p, &pattern(r.id, p, 2, ps), "(as part of a run)")?;
    }
    // Zero one page between two with data.
    if n >= 3 {
        let call = format!("zero_pages({})", page(1));
        j.no_panic(ZERO, &call, || sink.zero_pages(&page(1)))
            .and_then(|res| j.ok(ZERO, &call, res))?;
        expect(ZERO, 1, &vec![0; ps], "after zero_pages")?;
        expect(
            ZERO,
            0,
            &pattern(r.id, 0, 2, ps),
            "(its neighbour was zeroed)",
        )?;
        expect(
            ZERO,
            2,
            &pattern(r.id, 2, 2, ps),
            "(its neighbour was zeroed)",
        )?;
    }
    // Refusals leave every byte as it was.
    let last = pages - 1;
    sink_write(j, READ_BACK, sink, &page(last), &pattern(r.id, last, 3, ps))?;
    check_sink_refusals(j, sink, layout, r)?;
    expect(
        UNTOUCHED,
        last,
        &pattern(r.id, last, 3, ps),
        "after refused calls",
    )?;
    if last > 0 {
        expect(
            UNTOUCHED,
            0,
            &pattern(r.id, 0, 2, ps),
            "after refused calls",
        )?;
    }
    // The whole region zeroed, then written again.
    let all = PageRun::new(r.id, 0, pages.min(u64::from(u32::MAX)) as u32);
    let call = format!("zero_pages({all})");
    j.no_panic(ZERO, &call, || sink.zero_pages(&all))
        .and_then(|res| j.ok(ZERO, &call, res))?;
    for &p in &probes {
        expect(ZERO, p, &vec![0; ps], "after zeroing the whole region")?;
    }
    sink_write(j, ZERO, sink, &page(last), &pattern(r.id, last, 4, ps))?;
    expect(
        ZERO,
        last,
        &pattern(r.id, last, 4, ps),
        "after zeroing and rewriting",
    )
}

fn check_threads<K: MemorySink + ?Sized>(j: &Judge, sink: &K, r: &RegionInfo) -> Conformance {
    const WRITERS: u64 = 4;
    let ps = page_bytes(r, 1);
    let pages = r.pages().min(256);
    let results: Vec<Conformance> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|t| {
                s.spawn(move || -> Conformance {
                    for p in (t..pages).step_by(WRITERS as usize) {
                        let run = PageRun::new(r.id, p, 1);
                        sink_write(j, THREADS, sink, &run, &pattern(r.id, p, 5, ps))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(j.broke(THREADS, "a writer thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect::<Conformance>()?;
    for p in 0..pages {
        let got = sink_read(j, THREADS, sink, &PageRun::new(r.id, p, 1), ps)?;
        j.rule(THREADS, got == pattern(r.id, p, 5, ps), || {
            format!(
                "page {p} of region {} is not what its writer thread wrote",
                r.id
            )
        })?;
    }
    Ok(())
}

/// Check the post-copy calls of a [`MemorySink`] that will receive
/// `layout` (its first region, of three pages or more, is used). Needs
/// whatever the sink's page-fault handling needs (lmig-mem: userfaultfd
/// with kernel-mode faults).
pub fn check_postcopy<K: MemorySink + ?Sized>(
    name: &str,
    sink: &K,
    layout: &RegionLayout,
) -> Conformance {
    let j = Judge::new(name);
    let Some(r) = layout.regions().first().filter(|r| r.pages() >= 3) else {
        return Err(j.broke(LAYOUT, "the first region has fewer than three pages"));
    };
    prepare(&j, sink, layout)?;
    let ps = page_bytes(r, 1);
    let (present, missing_page) = (0, r.pages() / 2);
    for p in [present, missing_page] {
        sink_write(
            &j,
            POSTCOPY,
            sink,
            &PageRun::new(r.id, p, 1),
            &pattern(r.id, p, 6, ps),
        )?;
    }
    let mut missing = RegionPages::empty(layout);
    let missing_run = PageRun::new(r.id, missing_page, 1);
    j.ok(
        POSTCOPY,
        "RegionPages::insert_run",
        missing.insert_run(&missing_run),
    )?;
    match j.no_panic(POSTCOPY, "begin_postcopy", || sink.begin_postcopy(&missing))? {
        Err(MigrationError::Unsupported { feature, needs }) => {
            println!("{name}: post-copy rules not run: {feature} is not supported (needs {needs})");
            return Ok(());
        }
        other => j.ok(POSTCOPY, "begin_postcopy", other)?,
    }
    let got = sink_read(&j, POSTCOPY, sink, &PageRun::new(r.id, present, 1), ps)?;
    j.rule(POSTCOPY, got == pattern(r.id, present, 6, ps), || {
        format!("page {present}, not missing, changed when post-copy began")
    })?;
    let placed = pattern(r.id, missing_page, 7, ps);
    let outcome = std::thread::scope(|s| {
        let reader = s.spawn(|| sink_read(&j, POSTCOPY, sink, &missing_run, ps));
        let reported = wait_for_fault(&j, sink, &missing_run);
        let waited = !reader.is_finished();
        // Placed whatever happened, so that a waiting reader ends.
        let wrote = sink_write(&j, POSTCOPY, sink, &missing_run, &placed);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(j.broke(POSTCOPY, "the reader thread panicked")));
        reported.and(wrote).map(|()| (waited, read))
    });
    let (waited, read) = outcome?;
    j.rule(POSTCOPY, waited, || {
        format!("the read of missing page {missing_run} returned before the page was placed")
    })?;
    let read = read?;
    j.rule(POSTCOPY, read == placed, || {
        format!("the reader of {missing_run} got other content than what was placed")
    })?;
    j.no_panic(POSTCOPY_END, "end_postcopy", || sink.end_postcopy())
        .and_then(|res| j.ok(POSTCOPY_END, "end_postcopy", res))?;
    let after = PageRun::new(r.id, 1, 1);
    sink_write(&j, POSTCOPY_END, sink, &after, &pattern(r.id, 1, 8, ps))?;
    let got = sink_read(&j, POSTCOPY_END, sink, &after, ps)?;
    j.rule(POSTCOPY_END, got == pattern(r.id, 1, 8, ps), || {
        "a page written after end_postcopy differs".into()
    })
}

/// `wait_fault` until it reports a run holding `want` (bounded).
fn wait_for_fault<K: MemorySink + ?Sized>(j: &Judge, sink: &K, want: &PageRun) -> Conformance {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let got = j.no_panic(POSTCOPY, "wait_fault", || {
            sink.wait_fault(Duration::from_millis(100))
        })?;
        match j.ok(POSTCOPY, "wait_fault", got)? {
            Some(run)
                if run.region == want.region
                    && run.first <= want.first
                    && want.first < run.end() =>
            {
                return Ok(());
            }
            _ => {}
        }
    }
    Err(j.broke(
        POSTCOPY,
        format!("wait_fault never reported {want} while a reader waited on it"),
    ))
}

/// Bad runs and buffers of the wrong length, each refused by every call.
fn check_sink_refusals<K: MemorySink + ?Sized>(
    j: &Judge,
    sink: &K,
    layout: &RegionLayout,
    r: &RegionInfo,
) -> Conformance {
    let ps = page_bytes(r, 1);
    let last = PageRun::new(r.id, r.pages() - 1, 1);
    for (run, what) in bad_runs(layout, r) {
        let data = vec![0xEE; page_bytes(r, u64::from(run.count))];
        let call = format!("write_pages({run}) ({what})");
        j.refused(BAD_RUN, &call, || sink.write_pages(&run, &data))?;
        let call = format!("zero_pages({run}) ({what})");
        j.refused(BAD_RUN, &call, || sink.zero_pages(&run))?;
        let mut buf = vec![0u8; data.len()];
        let call = format!("read_pages({run}) ({what})");
        j.refused(BAD_RUN, &call, || sink.read_pages(&run, &mut buf))?;
    }
    for len in [ps - 1, ps + 1, 0] {
        let data = vec![0xEE; len];
        let call = format!("write_pages({last}) with {len} bytes");
        j.refused(BAD_RUN, &call, || sink.write_pages(&last, &data))?;
        let mut buf = vec![0u8; len];
        let call = format!("read_pages({last}) into {len} bytes");
        j.refused(BAD_RUN, &call, || sink.read_pages(&last, &mut buf))?;
    }
    Ok(())
}
