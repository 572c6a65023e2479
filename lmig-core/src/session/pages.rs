//! Reading pages out of a memory source into batches, zero detection.

use bytes::{Bytes, BytesMut};

use super::pace::Meter;
use crate::error::Result;
use crate::model::{PageRun, RegionLayout, RegionPages};
use crate::protocol::{Message, PageBatch, PageData};
use crate::traits::{Channel, MemorySource};

/// Is every byte zero? Checks 64-byte blocks so the compiler can vectorize.
pub fn is_zero(data: &[u8]) -> bool {
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

/// Bytes of a fresh send buffer (one chunk of 4 KiB pages); data runs are
/// cut from its front until it is used up.
const BUF_BYTES: usize = crate::protocol::CHUNK_PAGES as usize * 4096;

/// Reads runs from memory into one reusable buffer and sends them, zero
/// pages as flags.
pub(crate) struct PageSender<'a, M: MemorySource + ?Sized, C: Channel + ?Sized> {
    pub memory: &'a M,
    pub channel: &'a C,
    pub layout: &'a RegionLayout,
    buf: BytesMut,
    /// Per page of the run being sent: does it read as zero?
    zero: Vec<bool>,
    /// Counts what goes out and, when `paced`, holds it to the bandwidth limit.
    meter: Option<&'a Meter>,
    /// Non-urgent sends wait for the meter's bandwidth limit.
    paced: bool,
    /// Ends a wait for the bandwidth limit (a cancel).
    stop: Option<&'a (dyn Fn() -> bool + Sync)>,
    /// Urgent messages held until [`PageSender::flush_urgent`] (`None`:
    /// each is sent at once).
    held: Option<Vec<Message>>,
}

impl<'a, M: MemorySource + ?Sized, C: Channel + ?Sized> PageSender<'a, M, C> {
    pub fn new(memory: &'a M, channel: &'a C, layout: &'a RegionLayout) -> Self {
        Self {
            memory,
            channel,
            layout,
            buf: BytesMut::new(),
            zero: Vec::new(),
            meter: None,
            paced: false,
            stop: None,
            held: None,
        }
    }

    /// Hold urgent messages until [`PageSender::flush_urgent`], which sends
    /// them together ([`Channel::send_urgent_many`]).
    pub fn holding_urgent(mut self) -> Self {
        self.held = Some(Vec::new());
        self
    }

    /// Send the urgent messages held so far, in order, in one call.
    pub fn flush_urgent(&mut self) -> Result<()> {
        match &mut self.held {
            Some(held) if !held.is_empty() => {
                let sent = self.channel.send_urgent_many(held);
                held.clear();
                sent
            }
            _ => Ok(()),
        }
    }

    /// Count what this sender puts on the channel in `meter`; when `paced`,
    /// non-urgent sends also keep to its bandwidth limit (a wait that `stop`
    /// ends early).
    pub fn metered(
        mut self,
        meter: &'a Meter,
        paced: bool,
        stop: Option<&'a (dyn Fn() -> bool + Sync)>,
    ) -> Self {
        self.meter = Some(meter);
        self.paced = paced;
        self.stop = stop;
        self
    }

    /// Send `run` (inside one chunk) on `lane`, urgent or not. Zero pages
    /// travel as flags. When the memory source can test pages in place
    /// ([`MemorySource::find_zero_pages`]) only the other pages are copied;
    /// otherwise the whole run is copied and the copy tested.
    pub fn send_run(
        &mut self,
        run: PageRun,
        round: u32,
        lane: usize,
        urgent: bool,
    ) -> Result<Sent> {
        let region = self.layout.check_run(&run)?;
        let ps = region.page_size as usize;
        let count = run.count as usize;
        let mut zero = std::mem::take(&mut self.zero);
        zero.clear();
        zero.resize(count, false);
        let in_place = self.memory.find_zero_pages(&run, &mut zero)?;
        let whole = if in_place {
            None
        } else {
            let mut buf = self.take_buf(count * ps);
            self.memory.read_pages(&run, &mut buf)?;
            for (flag, page) in zero.iter_mut().zip(buf.chunks_exact(ps)) {
                *flag = is_zero(page);
            }
            Some(buf.freeze())
        };

        let mut sent = Sent::default();
        let mut p = 0usize;
        while p < count {
            let is_zero_run = zero[p];
            let q = p + zero[p..].iter().take_while(|&&z| z == is_zero_run).count();
            let sub = PageRun::new(run.region, run.first + p as u64, (q - p) as u32);
            let payload = match (&whole, is_zero_run) {
                (_, true) => PageData::Zero,
                (Some(data), false) => PageData::Raw(data.slice(p * ps..q * ps)),
                (None, false) => {
                    let mut buf = self.take_buf((q - p) * ps);
                    self.memory.read_pages(&sub, &mut buf)?;
                    PageData::Raw(buf.freeze())
                }
            };
            let reclaim = match (&whole, &payload) {
                (None, PageData::Raw(b)) => Some(b.clone()),
                _ => None,
            };
            sent.add(self.send_batch(sub, payload, ps, round, lane, urgent)?);
            if let Some(b) = reclaim {
                self.give_back(b);
            }
            p = q;
        }
        if let Some(data) = whole {
            self.give_back(data);
        }
        self.zero = zero;
        Ok(sent)
    }

    /// First pass of a two-pass send: test `run` (inside one chunk) in
    /// place, send its zero pages and add its data sub-runs to `data` (for
    /// the caller to send later with [`PageSender::send_run`]). `None`, with
    /// nothing sent, when the memory source cannot test in place.
    pub fn send_zeros(
        &mut self,
        run: PageRun,
        round: u32,
        lane: usize,
        data: &mut Vec<PageRun>,
    ) -> Result<Option<Sent>> {
        let region = self.layout.check_run(&run)?;
        let ps = region.page_size as usize;
        let count = run.count as usize;
        let mut zero = std::mem::take(&mut self.zero);
        zero.clear();
        zero.resize(count, false);
        if !self.memory.find_zero_pages(&run, &mut zero)? {
            self.zero = zero;
            return Ok(None);
        }
        let mut sent = Sent::default();
        let mut p = 0usize;
        while p < count {
            let is_zero_run = zero[p];
            let q = p + zero[p..].iter().take_while(|&&z| z == is_zero_run).count();
            let sub = PageRun::new(run.region, run.first + p as u64, (q - p) as u32);
            if is_zero_run {
                sent.add(self.send_batch(sub, PageData::Zero, ps, round, lane, false)?);
            } else {
                data.push(sub);
            }
            p = q;
        }
        self.zero = zero;
        Ok(Some(sent))
    }

    /// `len` bytes from the front of the reusable buffer.
    fn take_buf(&mut self, len: usize) -> BytesMut {
        if self.buf.len() < len {
            self.buf = BytesMut::zeroed(len.max(BUF_BYTES));
        }
        self.buf.split_to(len)
    }

    /// Take the front of the buffer back when the channel kept no reference
    /// to it (it was split off last, so it sits right before the rest).
    fn give_back(&mut self, data: Bytes) {
        if let Ok(mut back) = data.try_into_mut() {
            back.unsplit(std::mem::take(&mut self.buf));
            self.buf = back;
        }
    }

    /// Send `run` (inside one chunk) as zero pages without reading it: the
    /// memory source said these pages read as zero
    /// ([`MemorySource::populated`]).
    pub fn send_zero_run(&mut self, run: PageRun, round: u32, lane: usize) -> Result<Sent> {
        let region = self.layout.check_run(&run)?;
        let ps = region.page_size as usize;
        self.send_batch(run, PageData::Zero, ps, round, lane, false)
    }

    fn send_batch(
        &mut self,
        run: PageRun,
        data: PageData,
        page_size: usize,
        round: u32,
        lane: usize,
        urgent: bool,
    ) -> Result<Sent> {
        let pages = u64::from(run.count);
        let zero = matches!(data, PageData::Zero);
        let bytes = MESSAGE_OVERHEAD + if zero { 0 } else { pages * page_size as u64 };
        if let Some(meter) = self.meter {
            if self.paced && !urgent {
                meter.pace(bytes, &|| self.stop.is_some_and(|s| s()));
            }
        }
        let batch = PageBatch { round, run, data };
        if urgent {
            let msg = Message::Pages(batch);
            match &mut self.held {
                Some(held) => held.push(msg),
                None => self.channel.send_urgent(&msg)?,
            }
        } else {
            self.channel.send_pages(lane, &batch)?;
        }
        if let Some(meter) = self.meter {
            meter.count(pages, bytes);
        }
        Ok(Sent {
            pages,
            zero_pages: if zero { pages } else { 0 },
            bytes,
            messages: 1,
        })
    }
}

/// Every run of `pages`, cut where a count would not fit a `u32`.
pub(crate) fn runs_of(pages: &RegionPages) -> Vec<PageRun> {
    const MAX: u64 = 1 << 31;
    pages
        .sets()
        .flat_map(|(id, s)| s.runs().map(move |(f, c)| (id, f, c)))
        .flat_map(|(id, f, c)| {
            (0..c.div_ceil(MAX))
                .map(move |i| PageRun::new(id, f + i * MAX, (c - i * MAX).min(MAX) as u32))
        })
        .collect()
}

/// The data lane of a run: every version of a page travels on the same lane.
pub(crate) fn lane_of(run: &PageRun, lanes: usize) -> usize {
    let chunk = run.first / u64::from(crate::protocol::CHUNK_PAGES);
    ((chunk + u64::from(run.region.0)) % lanes.max(1) as u64) as usize
}

/// The sender threads of a round over `lanes` data lanes: one per lane,
/// or at most `idle_threads` while the senders are in the lowest class
/// (`Some`; 0: one per lane), at least one
/// ([`SourceConfig::idle_threads`](crate::session::SourceConfig::idle_threads)).
pub(crate) fn sender_threads(lanes: usize, idle_threads: Option<usize>) -> usize {
    let lanes = lanes.max(1);
    match idle_threads {
        Some(n) if n > 0 => n.min(lanes),
        _ => lanes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_senders_only_in_the_lowest_class() {
        assert_eq!(sender_threads(2, None), 2);
        assert_eq!(sender_threads(2, Some(0)), 2);
        assert_eq!(sender_threads(2, Some(1)), 1);
        assert_eq!(sender_threads(2, Some(8)), 2);
        assert_eq!(sender_threads(0, Some(1)), 1);
        assert_eq!(sender_threads(0, None), 1);
    }

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
