//! The `Pages` body codec, shared by `Message::Pages` (`message.rs`) and
//! the split-memory `Data` message (`split.rs`): a fixed 21-byte header,
//! then the page bytes (raw) or nothing (zero pages).

use bytes::Bytes;
use lmig_core::model::{MAX_PAGE_SIZE, MIN_PAGE_SIZE, PageRun, RegionId};
use lmig_core::protocol::{PageBatch, PageData};

use super::{Result, WireError};

mod field {
    use std::ops::Range;

    pub const ROUND: Range<usize> = 0..4;
    pub const REGION: Range<usize> = 4..8;
    pub const FIRST: Range<usize> = 8..16;
    pub const COUNT: Range<usize> = 16..20;
    pub const DATA_KIND: usize = 20;
    pub const DATA: usize = 21;
}

wire_enum! {
    /// The data-kind byte of a `Pages` body.
    enum DataKind [] {
        /// Zero pages: no bytes follow.
        Zero = 0 => "zero",
        /// The page bytes follow.
        Raw = 1 => "raw",
    }
    unknown |k| WireError::bad("page data kind", format!("{k}"))
}

/// A view of the fixed header of a `Pages` body:
///
/// ```text
/// 0        4         8               16       20         21
/// | round  | region  |     first     | count  | data kind | page bytes…
/// |  u32   |  u32    |      u64      |  u32   | 0 zero, 1 raw |
/// ```
#[derive(Debug, Clone)]
pub struct PagesHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> PagesHeader<T> {
    /// Length of the fixed header.
    pub const LEN: usize = field::DATA;

    /// A view without checks.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// A view whose accessors cannot panic.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let h = Self::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }

    /// Check that the fixed header is present.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < Self::LEN {
            return Err(WireError::Truncated {
                what: "Pages header",
                needed: Self::LEN,
                available: len,
            });
        }
        Ok(())
    }

    fn u32_at(&self, r: std::ops::Range<usize>) -> u32 {
        u32::from_le_bytes(self.buffer.as_ref()[r].try_into().unwrap_or_default())
    }

    /// The round field.
    pub fn round(&self) -> u32 {
        self.u32_at(field::ROUND)
    }

    /// The region field.
    pub fn region(&self) -> u32 {
        self.u32_at(field::REGION)
    }

    /// The first-page field.
    pub fn first(&self) -> u64 {
        u64::from_le_bytes(
            self.buffer.as_ref()[field::FIRST]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// The page-count field.
    pub fn count(&self) -> u32 {
        self.u32_at(field::COUNT)
    }

    /// The data-kind field (0 zero pages, 1 raw).
    pub fn data_kind(&self) -> u8 {
        self.buffer.as_ref()[field::DATA_KIND]
    }

    /// The page bytes after the header.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA..]
    }
}

/// Write the fixed header of `batch` (the buffer holds at least `LEN` bytes).
pub(crate) fn emit_pages_header(batch: &PageBatch, buf: &mut [u8]) {
    {
        buf[field::ROUND].copy_from_slice(&batch.round.to_le_bytes());
        buf[field::REGION].copy_from_slice(&batch.run.region.0.to_le_bytes());
        buf[field::FIRST].copy_from_slice(&batch.run.first.to_le_bytes());
        buf[field::COUNT].copy_from_slice(&batch.run.count.to_le_bytes());
        buf[field::DATA_KIND] = match batch.data {
            PageData::Raw(_) => DataKind::Raw.to_u8(),
            PageData::Zero => DataKind::Zero.to_u8(),
        };
    }
}

/// Parse a `Pages` body; the page bytes are a slice of `payload`.
pub(crate) fn parse_pages(payload: Bytes) -> Result<PageBatch> {
    let h = PagesHeader::new_checked(&payload[..])?;
    let run = PageRun::new(RegionId(h.region()), h.first(), h.count());
    if run.count == 0 || run.first.checked_add(u64::from(run.count)).is_none() {
        return Err(WireError::bad(
            "page run",
            format!("{} pages from {}", run.count, run.first),
        ));
    }
    let round = h.round();
    let data = match DataKind::from_u8(h.data_kind())? {
        DataKind::Zero => {
            if !h.data().is_empty() {
                return Err(WireError::TrailingBytes(h.data().len(), "zero Pages"));
            }
            PageData::Zero
        }
        DataKind::Raw => {
            let len = h.data().len();
            let count = run.count as usize;
            let page = len / count;
            if len % count != 0
                || !page.is_power_of_two()
                || !(MIN_PAGE_SIZE as usize..=MAX_PAGE_SIZE as usize).contains(&page)
            {
                return Err(WireError::bad(
                    "page data",
                    format!("{len} bytes for {count} pages is no valid page size"),
                ));
            }
            PageData::Raw(payload.slice(PagesHeader::<&[u8]>::LEN..))
        }
    };
    Ok(PageBatch { round, run, data })
}
