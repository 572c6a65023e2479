//! A run of pages with its content: what a `Pages` message (and split
//! memory's page messages) carry. Below both [`crate::protocol`] and
//! [`crate::split`], which re-export or use it.

use bytes::Bytes;

use super::PageRun;

/// The content of a `Pages` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageData {
    /// `run.count * page_size` bytes of page content.
    Raw(Bytes),
    /// Every page of the run is zero; no bytes follow.
    Zero,
}

/// A run of pages with its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBatch {
    /// The pre-copy round (or post-copy phase marker) the pages belong to.
    pub round: u32,
    /// Which pages.
    pub run: PageRun,
    /// Their content.
    pub data: PageData,
}
