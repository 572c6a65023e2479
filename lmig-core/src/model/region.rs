use std::fmt;

use crate::error::{MigrationError, Result};

/// Smallest page size a region may declare (4 KiB).
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size a region may declare (1 GiB huge pages).
pub const MAX_PAGE_SIZE: u32 = 1 << 30;
/// Largest region accepted from a peer (1 TiB).
pub const MAX_REGION_BYTES: u64 = 1 << 40;
/// Most regions one layout may hold.
pub const MAX_REGIONS: usize = 4096;

/// Identifies a region inside one migration; chosen by the program.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u32);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One contiguous range of memory registered for migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region's id.
    pub id: RegionId,
    /// Length in bytes, a multiple of `page_size`.
    pub len: u64,
    /// Page size in bytes: a power of two between [`MIN_PAGE_SIZE`] and [`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// The address the region must be mapped at on the destination, when the
    /// program keeps pointers into it; `None` lets the destination choose.
    pub fixed_addr: Option<u64>,
}

impl RegionInfo {
    /// A region of `len` bytes with `page_size` pages, checked.
    pub fn new(id: RegionId, len: u64, page_size: u32) -> Result<Self> {
        let info = Self {
            id,
            len,
            page_size,
            fixed_addr: None,
        };
        info.validate()?;
        Ok(info)
    }

    /// Require the destination to map this region at `addr`.
    pub fn at_fixed_addr(mut self, addr: u64) -> Result<Self> {
        self.fixed_addr = Some(addr);
        self.validate()?;
        Ok(self)
    }

    /// Check the invariants; values from a peer go through here.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(MigrationError::LayoutMismatch {
                detail: format!("region {}: {detail}", self.id),
            })
        };
        if !self.page_size.is_power_of_two()
            || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&self.page_size)
        {
            return bad(format!(
                "page size {} is not a power of two in 4 KiB..1 GiB",
                self.page_size
            ));
        }
        if self.len == 0 || self.len > MAX_REGION_BYTES {
            return bad(format!(
                "length {} is 0 or over {MAX_REGION_BYTES}",
                self.len
            ));
        }
        if !self.len.is_multiple_of(u64::from(self.page_size)) {
            return bad(format!(
                "length {} is not a multiple of the page size {}",
                self.len, self.page_size
            ));
        }
        if let Some(addr) = self.fixed_addr {
            if addr % u64::from(self.page_size) != 0 || addr.checked_add(self.len).is_none() {
                return bad(format!("fixed address {addr:#x} is unaligned or overflows"));
            }
        }
        Ok(())
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / u64::from(self.page_size)
    }

    /// Byte length of `count` pages of this region.
    pub fn bytes(&self, count: u64) -> u64 {
        count * u64::from(self.page_size)
    }

    /// Check that `run` lies inside this region.
    pub fn check_run(&self, run: &PageRun) -> Result<()> {
        if run.region != self.id {
            return Err(MigrationError::UnknownRegion { region: run.region });
        }
        let pages = self.pages();
        if run.count == 0 || run.first >= pages || u64::from(run.count) > pages - run.first {
            return Err(MigrationError::PageOutsideRegion {
                run: *run,
                region_pages: pages,
            });
        }
        Ok(())
    }
}

/// The set of regions of one migration, sorted by id, ids unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionLayout {
    regions: Vec<RegionInfo>,
}

impl RegionLayout {
    /// A layout from regions in any order; rejects duplicates and invalid regions.
    pub fn new(mut regions: Vec<RegionInfo>) -> Result<Self> {
        if regions.len() > MAX_REGIONS {
            return Err(MigrationError::LayoutMismatch {
                detail: format!("{} regions, at most {MAX_REGIONS} allowed", regions.len()),
            });
        }
        regions.sort_by_key(|r| r.id);
        for r in &regions {
            r.validate()?;
        }
        if let Some(w) = regions.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(MigrationError::LayoutMismatch {
                detail: format!("region {} registered twice", w[0].id),
            });
        }
        Ok(Self { regions })
    }

    /// The regions, sorted by id.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// The region with this id.
    pub fn get(&self, id: RegionId) -> Result<&RegionInfo> {
        self.index_of(id).map(|i| &self.regions[i])
    }

    /// Position of region `id` in [`RegionLayout::regions`].
    pub fn index_of(&self, id: RegionId) -> Result<usize> {
        self.regions
            .binary_search_by_key(&id, |r| r.id)
            .map_err(|_| MigrationError::UnknownRegion { region: id })
    }

    /// Check that `run` names a registered region and lies inside it.
    pub fn check_run(&self, run: &PageRun) -> Result<&RegionInfo> {
        let region = self.get(run.region)?;
        region.check_run(run)?;
        Ok(region)
    }

    /// Total bytes over all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(RegionInfo::pages).sum()
    }

    /// Explain how `other` differs from `self`, or `Ok` when they match.
    pub fn check_matches(&self, other: &RegionLayout) -> Result<()> {
        if self == other {
            return Ok(());
        }
        let detail = match (self.regions.len(), other.regions.len()) {
            (a, b) if a != b => format!("{a} regions here, {b} offered"),
            _ => {
                let (a, b) = self
                    .regions
                    .iter()
                    .zip(&other.regions)
                    .find(|(a, b)| a != b)
                    .expect("layouts differ, so one region differs");
                format!("region {} here is {a:?}, offered {b:?}", a.id)
            }
        };
        Err(MigrationError::LayoutMismatch { detail })
    }
}

/// `count` consecutive pages of one region starting at page `first`.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// The region.
    pub region: RegionId,
    /// First page index inside the region.
    pub first: u64,
    /// Number of pages (at least 1 in a valid run).
    pub count: u32,
}

impl PageRun {
    /// A run of `count` pages from `first`.
    pub fn new(region: RegionId, first: u64, count: u32) -> Self {
        Self {
            region,
            first,
            count,
        }
    }

    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }
}

impl fmt::Display for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A peer's run may end past `u64::MAX`: shown exactly, never a panic.
        let end = u128::from(self.first) + u128::from(self.count);
        write!(f, "{}[{}..{end})", self.region, self.first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_rejects_bad_sizes() {
        assert!(RegionInfo::new(RegionId(1), 4096 * 3, 4096).is_ok());
        assert!(RegionInfo::new(RegionId(1), 4095, 4096).is_err());
        assert!(RegionInfo::new(RegionId(1), 8192, 3000).is_err());
        assert!(RegionInfo::new(RegionId(1), 0, 4096).is_err());
        assert!(RegionInfo::new(RegionId(1), 4096, 1024).is_err());
    }

    #[test]
    fn runs_are_checked_against_regions() {
        let layout = RegionLayout::new(vec![
            RegionInfo::new(RegionId(2), 4096 * 4, 4096).unwrap(),
            RegionInfo::new(RegionId(1), 4096 * 8, 4096).unwrap(),
        ])
        .unwrap();
        assert_eq!(layout.regions()[0].id, RegionId(1));
        assert!(layout.check_run(&PageRun::new(RegionId(1), 7, 1)).is_ok());
        assert!(matches!(
            layout.check_run(&PageRun::new(RegionId(1), 7, 2)),
            Err(MigrationError::PageOutsideRegion { .. })
        ));
        assert!(matches!(
            layout.check_run(&PageRun::new(RegionId(3), 0, 1)),
            Err(MigrationError::UnknownRegion { .. })
        ));
        assert!(layout.check_run(&PageRun::new(RegionId(2), 0, 0)).is_err());
        assert!(
            layout
                .check_run(&PageRun::new(RegionId(2), u64::MAX, 1))
                .is_err()
        );
    }

    #[test]
    fn duplicate_regions_rejected() {
        let r = RegionInfo::new(RegionId(1), 4096, 4096).unwrap();
        assert!(RegionLayout::new(vec![r.clone(), r]).is_err());
    }

    #[test]
    fn layout_mismatch_is_explained() {
        let a = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 4096, 4096).unwrap()]).unwrap();
        let b = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 8192, 4096).unwrap()]).unwrap();
        let err = a.check_matches(&b).unwrap_err().to_string();
        assert!(err.contains("region #1"), "{err}");
        assert!(a.check_matches(&a.clone()).is_ok());
    }
}
