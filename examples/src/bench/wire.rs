//! `wire`: encode and decode of 4 KiB page frames with CRC-32C checksums,
//! against a plain memcpy of the same bytes in the same run.
//!
//! * `encode_gbps`: `encode_message` of one-page `Pages` messages: the
//!   header, the fixed fields and the CRC-32C of the page; the page bytes
//!   themselves are referenced, not copied (the kernel copies them on the
//!   vectored write).
//! * `decode_gbps`: the stream decoder over a buffer of such frames: header
//!   checks, CRC-32C, message parse; page bytes are slices of the buffer.
//! * `memcpy_gbps`: copying the same number of bytes between two buffers.

use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use clap::Args as ClapArgs;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_transport::wire::{MessageDecoder, WireItem, encode_message};
use serde_json::json;

use super::{Output, round};

/// Options of the `wire` scenario.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// MiB of page data per repetition (larger than the caches by default).
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// Repetitions; the best one is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

/// Run the scenario.
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn Error>> {
    let pages = (args.mib << 20) / 4096;
    let total = pages * 4096;
    let data: Vec<u8> = (0..total).map(|i| (i as u8) ^ ((i >> 12) as u8)).collect();
    let data = Bytes::from(data);
    let batches: Vec<Message> = (0..pages)
        .map(|i| {
            Message::Pages(PageBatch {
                round: 0,
                run: PageRun::new(RegionId(0), i as u64, 1),
                data: PageData::Raw(data.slice(i * 4096..(i + 1) * 4096)),
            })
        })
        .collect();

    let (mut enc_best, mut dec_best, mut cpy_best) = (f64::MAX, f64::MAX, f64::MAX);
    let mut wire = Vec::new();
    // Touched before timing, so the copy measures memory bandwidth, not page faults.
    let mut dst = vec![1u8; total];
    for _ in 0..args.reps.max(1) {
        // Encode.
        let t = Instant::now();
        let mut frames = Vec::with_capacity(pages);
        for m in &batches {
            frames.push(encode_message(m)?);
        }
        enc_best = enc_best.min(t.elapsed().as_secs_f64());
        if wire.is_empty() {
            wire = Vec::with_capacity(frames.iter().map(|f| f.len()).sum());
            for f in &frames {
                f.write_to(&mut wire)?;
            }
        }
        black_box(&frames);
        drop(frames);

        // Decode.
        let mut buf = BytesMut::from(&wire[..]);
        let mut dec = MessageDecoder::new();
        let t = Instant::now();
        let mut n = 0usize;
        while let Some(item) = dec.decode(&mut buf)? {
            if let WireItem::Message(Message::Pages(b)) = item {
                n += b.run.count as usize;
                black_box(&b);
            }
        }
        dec_best = dec_best.min(t.elapsed().as_secs_f64());
        if n != pages {
            return Err(format!("decoded {n} pages of {pages}").into());
        }

        // memcpy of the same bytes.
        let t = Instant::now();
        dst.copy_from_slice(&data);
        cpy_best = cpy_best.min(t.elapsed().as_secs_f64());
        black_box(&dst);
    }
    out.emit(&json!({
        "scenario": "wire",
        "page_bytes": 4096,
        "mib": args.mib,
        "encode_gbps": round(gbps(total, enc_best), 2),
        "decode_gbps": round(gbps(total, dec_best), 2),
        "memcpy_gbps": round(gbps(total, cpy_best), 2),
    }));
    Ok(())
}
