//! Comparing the regions mapped here with the ones a source offers.

use lmig_core::model::RegionLayout;

/// The first difference between the regions `here` and the `offered` ones,
/// in words naming the field, or `None` when they match.
pub fn layout_difference(here: &RegionLayout, offered: &RegionLayout) -> Option<String> {
    for o in offered.regions() {
        let Ok(h) = here.get(o.id) else {
            return Some(format!("region {} is offered but not mapped here", o.id));
        };
        if h.page_size != o.page_size {
            return Some(format!(
                "region {}: page size {} bytes here, {} offered",
                o.id, h.page_size, o.page_size
            ));
        }
        if h.len != o.len {
            return Some(format!(
                "region {}: {} bytes here, {} offered",
                o.id, h.len, o.len
            ));
        }
        if let Some(want) = o.fixed_addr {
            if h.fixed_addr != Some(want) {
                return Some(format!(
                    "region {}: must be at {want:#x}, here it is {}",
                    o.id,
                    h.fixed_addr
                        .map_or("not pinned".to_string(), |a| format!("at {a:#x}"))
                ));
            }
        }
    }
    here.regions()
        .iter()
        .find(|h| offered.get(h.id).is_err())
        .map(|h| format!("region {} is mapped here but not offered", h.id))
}
