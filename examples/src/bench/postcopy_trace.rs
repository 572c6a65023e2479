//! Where `lmig-bench postcopy`'s network faults spent their time
//! (`fault_tail`, `fault_middle`), from the destination's per-fault trace,
//! the program's own clock and the source's reads of requested pages
//! (lmig-mem feature `bench-internals`). Both processes run on one host, so
//! their `CLOCK_MONOTONIC` times compare.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::round;
use crate::common::clock::mono_ns;

/// Faults of a band whose times are sent to the source to be matched.
const MAX_SAMPLES: usize = 2000;

/// Where the network faults that took `band` µs (at least its first, at
/// most its second figure) spent their time, from the sink's per-fault
/// trace and the program's own clock: `deliver` from the touch to the fault
/// thread reading the fault, `serve` from there to the page's placement
/// (request, source, reply, placement, or the pushed message that brought
/// it) — split into `reply` (to the placement's start: the request out, the
/// source, the page back and decoded) and `place` (the claim and the
/// fill) —, `wake` from the placement to the program running again; means
/// in µs, and how many of those pages came in a one-page reply rather than
/// a pushed message. `samples` (for [`source_split`]): up to
/// [`MAX_SAMPLES`] of them as `[page, read, placement began]`
/// (`CLOCK_MONOTONIC` ns).
pub(super) fn fault_tail(
    stats: &lmig_mem::PostcopyStats,
    order: &[u64],
    starts: &[Instant],
    durations: &[u32],
    band: (f64, f64),
) -> Value {
    let index: HashMap<u64, usize> = order.iter().enumerate().map(|(i, &p)| (p, i)).collect();
    let (mut n, mut deliver, mut serve, mut wake, mut by_reply) = (0u64, 0.0, 0.0, 0.0, 0u64);
    let (mut reply, mut place) = (0.0, 0.0);
    let mut samples = Vec::new();
    for t in &stats.fault_trace {
        let (Some(&i), Some(placed)) = (index.get(&t.page), t.placed_at) else {
            continue;
        };
        let (Some(&start), Some(&ns)) = (starts.get(i), durations.get(i)) else {
            continue;
        };
        let took = f64::from(ns) / 1e3;
        if took < band.0 || took > band.1 {
            continue;
        }
        let end = start + Duration::from_nanos(u64::from(ns));
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e6;
        let began = t.place_began.unwrap_or(placed);
        n += 1;
        deliver += us(start, t.read_at);
        serve += us(t.read_at, placed);
        reply += us(t.read_at, began);
        place += us(began, placed);
        wake += us(placed, end);
        by_reply += u64::from(t.placed_with == 1);
        if samples.len() < MAX_SAMPLES && t.placed_with == 1 {
            samples.push([t.page, mono_ns(t.read_at), mono_ns(began)]);
        }
    }
    let mean = |x: f64| if n == 0 { 0.0 } else { round(x / n as f64, 1) };
    json!({
        "faults": n,
        "deliver_us": mean(deliver),
        "serve_us": mean(serve),
        "reply_us": mean(reply),
        "place_us": mean(place),
        "wake_us": mean(wake),
        "by_reply": by_reply,
        "samples": samples,
    })
}

/// Split `band`'s `reply_us` at the source (in the source process, with
/// the reads its request server made): `request_us` from the fault read to
/// the source reading the page (the request written, carried, the server
/// woken, the request decoded), `back_us` from there to the placement's
/// start at the destination (the page encoded and sent, the reply thread
/// woken, the reply decoded); means over the `matched` samples (a one-page
/// reply whose read by the source lies between the two). Takes `samples`
/// out of `band`.
pub(super) fn source_split(band: &mut Value, served: &HashMap<u64, Vec<u64>>) {
    let Some(obj) = band.as_object_mut() else {
        return;
    };
    let samples = obj.remove("samples").unwrap_or(Value::Null);
    let (mut n, mut request, mut back) = (0u64, 0.0, 0.0);
    for s in samples.as_array().into_iter().flatten() {
        let (Some(page), Some(read), Some(began)) = (s[0].as_u64(), s[1].as_u64(), s[2].as_u64())
        else {
            continue;
        };
        let Some(at) = served
            .get(&page)
            .and_then(|v| v.iter().copied().find(|&t| t >= read && t <= began))
        else {
            continue;
        };
        n += 1;
        request += (at - read) as f64 / 1e3;
        back += (began - at) as f64 / 1e3;
    }
    let mean = |x: f64| if n == 0 { 0.0 } else { round(x / n as f64, 1) };
    obj.insert("matched".into(), json!(n));
    obj.insert("request_us".into(), json!(mean(request)));
    obj.insert("back_us".into(), json!(mean(back)));
}

/// This process's reads of requested pages by page (`CLOCK_MONOTONIC` ns,
/// in order), taken from lmig-mem.
pub(super) fn served_reads() -> HashMap<u64, Vec<u64>> {
    let mut by_page: HashMap<u64, Vec<u64>> = HashMap::new();
    for r in lmig_mem::postcopy::take_served_reads() {
        let at = mono_ns(r.read_at);
        for p in r.run.first..r.run.end() {
            by_page.entry(p).or_default().push(at);
        }
    }
    by_page
}
