//! Memory the freeze will fill, touched before it.

/// Touch every page of `v`'s unused capacity, so that filling it later (in
/// the freeze) does not fault in memory fresh from the kernel (a virtual
/// machine that hands free memory back to its hypervisor pays for a page's
/// first touch again).
pub(crate) fn prefault_spare<T>(v: &mut Vec<T>) {
    let spare = v.spare_capacity_mut();
    let len = std::mem::size_of_val(spare);
    if len == 0 {
        return;
    }
    let base = spare.as_mut_ptr().cast::<u8>();
    let mut off = 0;
    while off < len {
        // SAFETY: `base..base + len` is the vector's allocated and unused
        // capacity; a byte written there stays uninitialized to the vector.
        unsafe { base.add(off).write_volatile(0) };
        off += 4096;
    }
    // SAFETY: as above; the last byte covers a page the stride skipped.
    unsafe { base.add(len - 1).write_volatile(0) };
}
