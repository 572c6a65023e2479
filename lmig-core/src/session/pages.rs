//! Reading pages out of a memory source into batches, zero detection.

use bytes::{Bytes, BytesMut};

use crate::error::Result;
use crate::model::{PageRun, RegionLayout};
use crate::protocol::{PageBatch, PageData};
use crate::traits::{Channel, MemorySource};

/// Is every byte zero? Checks 64-byte blocks so the compiler can vectorize.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Totals of what a sender put on the channel.
#[derive(Copy, Clone, Debug, Default)]
pub(crate) struct Sent {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub messages: u64,
}

impl Sent {
    pub fn add(&mut self, o: Sent) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.bytes += o.bytes;
        self.messages += o.messages;
    }
}

/// Per-message overhead counted in `bytes` (frame header and run fields), so
/// that byte totals stay comparable whatever the transport.
pub(crate) const MESSAGE_OVERHEAD: u64 = 40;

/// Reads runs from memory into one reusable buffer and sends them, zero
/// pages as flags.
pub(crate) struct PageSender<'a, M: MemorySource + ?Sized, C: Channel + ?Sized> {
    pub memory: &'a M,
    pub channel: &'a C,
    pub layout: &'a RegionLayout,
    buf: BytesMut,
}

impl<'a, M: MemorySource + ?Sized, C: Channel + ?Sized> PageSender<'a, M, C> {
    pub fn new(memory: &'a M, channel: &'a C, layout: &'a RegionLayout) -> Self {
        Self {
            memory,
            channel,
            layout,
            buf: BytesMut::new(),
        }
    }

    /// Send `run` (inside one chunk) on `lane`, urgent or not.
    pub fn send_run(
        &mut self,
        run: PageRun,
        round: u32,
        lane: usize,
        urgent: bool,
    ) -> Result<Sent> {
        let region = self.layout.check_run(&run)?;
        let ps = region.page_size as usize;
        let len = ps * run.count as usize;
        if self.buf.len() < len {
            self.buf = BytesMut::zeroed(len.max(64 * ps));
        }
        self.memory.read_pages(&run, &mut self.buf[..len])?;
        let data: Bytes = self.buf.split_to(len).freeze();

        let mut sent = Sent::default();
        let mut p = 0usize;
        let count = run.count as usize;
        while p < count {
            let zero = is_zero(&data[p * ps..(p + 1) * ps]);
            let mut q = p + 1;
            while q < count && is_zero(&data[q * ps..(q + 1) * ps]) == zero {
                q += 1;
            }
            let sub = PageRun::new(run.region, run.first + p as u64, (q - p) as u32);
            let payload = if zero {
                PageData::Zero
            } else {
                PageData::Raw(data.slice(p * ps..q * ps))
            };
            let batch = PageBatch {
                round,
                run: sub,
                data: payload,
            };
            if urgent {
                self.channel
                    .send_urgent(&crate::protocol::Message::Pages(batch))?;
            } else {
                self.channel.send_pages(lane, &batch)?;
            }
            sent.pages += (q - p) as u64;
            sent.messages += 1;
            sent.bytes += MESSAGE_OVERHEAD;
            if zero {
                sent.zero_pages += (q - p) as u64;
            } else {
                sent.bytes += ((q - p) * ps) as u64;
            }
            p = q;
        }
        // Take the buffer back when the channel kept no reference to it.
        if let Ok(mut back) = data.try_into_mut() {
            back.unsplit(std::mem::take(&mut self.buf));
            self.buf = back;
        }
        Ok(sent)
    }
}

/// The data lane of a run: every version of a page travels on the same lane.
pub(crate) fn lane_of(run: &PageRun, lanes: usize) -> usize {
    let chunk = run.first / u64::from(crate::protocol::CHUNK_PAGES);
    ((chunk + u64::from(run.region.0)) % lanes.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 1;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0u8; 3]));
        assert!(!is_zero(&[0, 0, 1]));
    }
}
