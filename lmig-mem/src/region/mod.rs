//! Memory regions a program registers for migration, the [`RegionSet`] that
//! holds them (a [`MemorySource`](lmig_core::MemorySource) on the source and
//! a [`MemorySink`](lmig_core::MemorySink) on the destination) and
//! [`DestinationRegions`], a sink that maps the source's layout when the
//! session offers it.
//!
//! Files by role, each importing only what lies below it:
//!
//! | file | holds |
//! |---|---|
//! | `crate::memory` | [`Region`], [`Backing`], the low-level page writes (shared with post-copy) |
//! | `crate::memory::adopt` | [`Region::adopt`], [`ForeignBacking`] and the `/proc/self/maps` checks |
//! | `crate::sys::foreign` | [`ForeignMemory`]: the program's `unsafe` promise about memory it mapped |
//! | `options.rs` | [`RegionOptions`]: how a region is mapped |
//! | `layout.rs` | [`layout_difference`] |
//! | `set.rs` | [`RegionSet`]: the regions by id |
//! | `source.rs` | `RegionSet`'s `MemorySource` implementation |
//! | `sink_state.rs` | the sink state a set holds: which pages hold data, the post-copy switch |
//! | `sink.rs` | `RegionSet`'s sink side: placing runs, post-copy calls, its `MemorySink` implementation |
//! | `destination.rs` | [`DestinationRegions`] |
//!
//! Every access to region memory copies through raw pointers: the program's
//! threads keep writing while pre-copy reads, so no `&[u8]` over region
//! memory is ever formed.

mod destination;
mod layout;
mod options;
mod set;
mod sink;
mod sink_state;
mod source;
#[cfg(test)]
mod tests;

pub use crate::memory::{Backing, DISCARD_PAGES, ForeignBacking, Region};
pub use crate::sys::foreign::ForeignMemory;
pub use destination::DestinationRegions;
pub use layout::layout_difference;
pub use options::RegionOptions;
pub use set::RegionSet;
pub use source::BACKGROUND_THREAD_NICE;
