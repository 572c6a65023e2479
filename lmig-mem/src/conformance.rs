//! The dirty-log kit (feature `conformance`): [`dirty_log::check`] runs
//! the rules of a [`DirtyLog`](crate::DirtyLog) — a VMM's own dirty bitmap
//! — directly and through [`DirtyLogTracker`](crate::DirtyLogTracker), the
//! adapter that makes it a [`DirtyTracker`](lmig_core::DirtyTracker).
//!
//! The kits of the other traits are in `lmig_core::conformance`; this one
//! lives here, beside the trait it checks. Run it from a `#[test]`:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use lmig_core::BoxError;
//! use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
//! let layout = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 100 * 4096, 4096)?])?;
//! // A VMM's bitmap: one bit per page, set by its "guest writes".
//! let words: Arc<Vec<AtomicU64>> = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect());
//! let vmm = Arc::clone(&words);
//! let write = move |_: RegionId, page: u64| {
//!     vmm[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
//! };
//! let log = move |_: &RegionInfo, out: &mut [u64]| -> Result<(), BoxError> {
//!     for (o, w) in out.iter_mut().zip(words.iter()) {
//!         *o = w.swap(0, Ordering::Relaxed);
//!     }
//!     Ok(())
//! };
//! lmig_mem::conformance::dirty_log::check("my VMM's log", &layout, log, &write).unwrap();
//! # Ok::<_, lmig_core::MigrationError>(())
//! ```

/// The rules of a [`DirtyLog`](crate::DirtyLog).
///
/// * `start` succeeds; after it and one fetch every page is clean;
/// * a fetch sets exactly the bits of the pages written since the last
///   one — word edges and the last page included, never a bit past the
///   region's last page, never a page of another region;
/// * a fetch resets what it returned: the next one is empty unless
///   written to again, and a page written again is set again;
/// * through the adapter: pages written are reported dirty by `collect`,
///   and are clean after it; `stop` succeeds, and a new `start` begins clean.
pub mod dirty_log {
    use std::collections::BTreeSet;

    use lmig_core::DirtyTracker;
    use lmig_core::conformance::{Conformance, Violation};
    use lmig_core::model::{RegionId, RegionInfo, RegionLayout, RegionPages};

    use crate::track::{DirtyLog, DirtyLogTracker};

    const START: &str = "start and stop succeed, and every page starts clean";
    const EXACT: &str = "a fetch sets exactly the bits of the pages written";
    const RESET: &str = "a fetch resets what it returned";
    const TAIL: &str = "no bit is set past a region's last page";
    const ADAPTER: &str = "pages written are reported dirty, and clean after collect";

    type Pages = BTreeSet<(u32, u64)>;

    /// The pages the kit writes in a region of `pages` pages: word edges,
    /// the middle, the last page.
    fn pages_to_write(pages: u64) -> Vec<u64> {
        let mut v = vec![0, 1, 63, 64, 65, 127, 128, pages / 2, pages - 1];
        v.retain(|p| *p < pages);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Fetch every region's bitmap; the pages set.
    fn fetch_all<L: DirtyLog>(
        name: &str,
        log: &mut L,
        layout: &RegionLayout,
    ) -> Result<Pages, Violation> {
        let mut set = Pages::new();
        for r in layout.regions() {
            let mut bitmap = vec![0u64; r.pages().div_ceil(64) as usize];
            log.fetch_and_reset(r, &mut bitmap).map_err(|e| {
                Violation::new(
                    name,
                    EXACT,
                    format!("fetch_and_reset({}) failed: {e}", r.id),
                )
            })?;
            check_tail(name, r, &bitmap)?;
            for (w, word) in bitmap.iter().enumerate() {
                for bit in 0..64 {
                    if word & (1 << bit) != 0 {
                        set.insert((r.id.0, w as u64 * 64 + bit));
                    }
                }
            }
        }
        Ok(set)
    }

    fn check_tail(name: &str, r: &RegionInfo, bitmap: &[u64]) -> Conformance {
        let pages = r.pages();
        let Some(last) = bitmap.last() else {
            return Ok(());
        };
        let used = pages % 64;
        if used != 0 && last >> used != 0 {
            return Err(Violation::new(
                name,
                TAIL,
                format!(
                    "region {} has {pages} pages, but bits past them are set: {:#x}",
                    r.id,
                    last >> used
                ),
            ));
        }
        Ok(())
    }

    fn expect(
        name: &str,
        rule: &'static str,
        got: &Pages,
        want: &Pages,
        when: &str,
    ) -> Conformance {
        if got == want {
            return Ok(());
        }
        let missed: Vec<_> = want.difference(got).take(8).collect();
        let extra: Vec<_> = got.difference(want).take(8).collect();
        Err(Violation::new(
            name,
            rule,
            format!(
                "{when}: pages (region, page) missed {missed:?}, reported without a write {extra:?}"
            ),
        ))
    }

    /// Write the kit's pages of every region (or of `only`).
    fn write_pages(
        layout: &RegionLayout,
        only: Option<RegionId>,
        write: &dyn Fn(RegionId, u64),
    ) -> Pages {
        let mut written = Pages::new();
        for r in layout
            .regions()
            .iter()
            .filter(|r| only.is_none_or(|o| o == r.id))
        {
            for p in pages_to_write(r.pages()) {
                write(r.id, p);
                written.insert((r.id.0, p));
            }
        }
        written
    }

    /// Check `log` over the regions of `layout`; `write(region, page)`
    /// dirties a page as the program (or guest) would.
    pub fn check<L: DirtyLog>(
        name: &str,
        layout: &RegionLayout,
        mut log: L,
        write: &dyn Fn(RegionId, u64),
    ) -> Conformance {
        let start = |log: &mut L| {
            log.start(layout)
                .map_err(|e| Violation::new(name, START, format!("start failed: {e}")))
        };
        start(&mut log)?;
        // The adapter discards one fetch after start; from then on, clean.
        fetch_all(name, &mut log, layout)?;
        expect(
            name,
            START,
            &fetch_all(name, &mut log, layout)?,
            &Pages::new(),
            "nothing written since start",
        )?;
        let written = write_pages(layout, None, write);
        expect(
            name,
            EXACT,
            &fetch_all(name, &mut log, layout)?,
            &written,
            "after the first writes",
        )?;
        expect(
            name,
            RESET,
            &fetch_all(name, &mut log, layout)?,
            &Pages::new(),
            "a second fetch",
        )?;
        // One region only, written twice: the other regions stay clean.
        let first = layout.regions()[0].id;
        write_pages(layout, Some(first), write);
        let again = write_pages(layout, Some(first), write);
        expect(
            name,
            EXACT,
            &fetch_all(name, &mut log, layout)?,
            &again,
            "pages of one region written twice",
        )?;
        log.stop()
            .map_err(|e| Violation::new(name, START, format!("stop failed: {e}")))?;
        // Through the adapter.
        let mut tracker = DirtyLogTracker::new(layout, log);
        let collect = |t: &mut DirtyLogTracker<L>| -> Result<Pages, Violation> {
            let mut d = RegionPages::empty(layout);
            t.collect(&mut d)
                .map_err(|e| Violation::new(name, ADAPTER, format!("collect failed: {e}")))?;
            Ok(d.sets()
                .flat_map(|(id, s)| s.iter().map(move |p| (id.0, p)))
                .collect())
        };
        write(first, 0);
        tracker
            .start()
            .map_err(|e| Violation::new(name, START, format!("the adapter's start failed: {e}")))?;
        expect(
            name,
            START,
            &collect(&mut tracker)?,
            &Pages::new(),
            "the adapter, right after start",
        )?;
        let written = write_pages(layout, None, write);
        expect(
            name,
            ADAPTER,
            &collect(&mut tracker)?,
            &written,
            "the adapter's first collect",
        )?;
        expect(
            name,
            ADAPTER,
            &collect(&mut tracker)?,
            &Pages::new(),
            "the adapter's second collect",
        )?;
        write(first, 1);
        expect(
            name,
            ADAPTER,
            &collect(&mut tracker)?,
            &[(first.0, 1)].into(),
            "one page written after a collect",
        )?;
        tracker
            .stop()
            .map_err(|e| Violation::new(name, START, format!("the adapter's stop failed: {e}")))?;
        Ok(())
    }
}
