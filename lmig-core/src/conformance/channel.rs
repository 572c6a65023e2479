//! The channel kit: [`check`] runs every rule of [`Channel`] against fresh
//! pairs of connected ends.
//!
//! Rules:
//! * `recv` with a timeout returns `Ok(None)` when nothing came, within a bound;
//! * control messages arrive complete and in the order sent, both ways;
//! * pages sent on one data lane arrive in the order sent, byte for byte,
//!   on every lane, and a lane number past `data_lanes()` is folded onto a
//!   lane (`lane % data_lanes()`), not refused;
//! * urgent messages arrive in order: through `recv_urgent` from its first
//!   call on (and never through `recv` then), or — for a channel whose
//!   `recv_urgent` is `Unsupported` — through `recv`;
//! * a large message (a run of pages of several MiB, a state blob of one)
//!   arrives intact;
//! * when the peer closes, what it sent before still arrives, then `recv`
//!   fails — with an error, within a bound, and from then on — and sends
//!   fail within a bounded number of attempts;
//! * after `shutdown`, the end's own `recv` and `send` fail, and its peer
//!   sees the end;
//! * no call blocks past its timeout plus a grace bound on a dead peer.
//!
//! Each rule gets a fresh pair from `make_pair`, which the kit calls several
//! times; both ends are moved to threads, hence the `'static` bounds.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::Channel;
use crate::error::MigrationError;
use crate::model::{PageRun, ProgramState, RegionId};
use crate::protocol::{Message, PageBatch, PageData};

use super::{Conformance, Judge, Violation};

/// How long the kit waits for anything that should arrive. Not a
/// performance figure: a message missing after this long is lost.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// What a timeout may overrun before the call counts as blocked.
const GRACE: Duration = Duration::from_secs(5);

const TIMEOUT: &str = "recv with a timeout returns Ok(None) when nothing came";
const CONTROL: &str = "control messages arrive complete and in order";
const LANES: &str = "pages of one data lane arrive in order, byte for byte";
const FOLD: &str = "a lane past data_lanes() is folded onto a lane";
const URGENT: &str = "urgent messages arrive in order on their path";
const LARGE: &str = "large messages arrive intact";
const CLOSED: &str = "a closed peer ends recv with an error, after what it sent";
const SEND_CLOSED: &str = "sends to a closed peer fail";
const SHUTDOWN: &str = "after shutdown the end's own recv and send fail";
const BOUNDED: &str = "no call blocks past its timeout on a dead peer";

const PAGE: usize = 4096;
const CONTROL_MESSAGES: u64 = 200;
const VERSIONS: u32 = 16;

/// Run every rule; `make_pair` returns two fresh, connected ends.
pub fn check<A, B>(name: &str, mut make_pair: impl FnMut() -> (A, B)) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    let j = Judge::new(name);
    let mut pair = || {
        let (a, b) = make_pair();
        (Arc::new(a), Arc::new(b))
    };
    {
        let (a, b) = pair();
        check_timeout(&j, &b)?;
        check_control(&j, &a, &b)?;
        check_control(&j, &b, &a)?;
        check_lanes(&j, &a, &b)?;
        check_large(&j, &a, &b)?;
    }
    {
        let (a, b) = pair();
        check_urgent(&j, &a, &b)?;
    }
    {
        let (a, b) = pair();
        check_closed(&j, a, b)?;
    }
    {
        let (a, b) = pair();
        check_shutdown(&j, a, b)?;
    }
    Ok(())
}

/// Run `f` on a thread; a violation of [`BOUNDED`] if it has not returned
/// after `limit` (the thread is left behind: the check failed anyway).
fn within<T: Send + 'static>(
    j: &Judge,
    call: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Violation> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lmig-conformance".into())
        .spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        })
        .map_err(|e| j.broke(BOUNDED, format!("cannot spawn a thread for {call}: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(j.broke(BOUNDED, format!("{call} panicked"))),
        Err(_) => Err(j.broke(BOUNDED, format!("{call} had not returned after {limit:?}"))),
    }
}

/// `recv(timeout)` on a thread, bounded by the timeout plus [`GRACE`].
fn recv<C: Channel + 'static>(
    j: &Judge,
    c: &Arc<C>,
    timeout: Duration,
) -> Result<crate::Result<Option<Message>>, Violation> {
    let c = Arc::clone(c);
    within(
        j,
        &format!("recv(Some({timeout:?}))"),
        timeout + GRACE,
        move || c.recv(Some(timeout)),
    )
}

/// The next message, which must come within [`PATIENCE`].
fn next<C: Channel + 'static>(
    j: &Judge,
    rule: &'static str,
    c: &Arc<C>,
) -> Result<Message, Violation> {
    match recv(j, c, PATIENCE)? {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(j.broke(rule, format!("nothing arrived within {PATIENCE:?}"))),
        Err(e) => Err(j.broke(rule, format!("recv failed: {e}"))),
    }
}

fn numbered(n: u64) -> Message {
    Message::PageRequest(PageRun::new(RegionId(7), n, 1))
}

fn check_timeout<C: Channel + 'static>(j: &Judge, b: &Arc<C>) -> Conformance {
    let got = recv(j, b, Duration::from_millis(50))?;
    j.rule(TIMEOUT, matches!(got, Ok(None)), || {
        format!("recv on a quiet channel returned {got:?}")
    })
}

fn check_control<A, B>(j: &Judge, a: &Arc<A>, b: &Arc<B>) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    let sent: Vec<Message> = (0..CONTROL_MESSAGES)
        .map(|n| match n % 4 {
            0 => Message::Ready,
            1 => Message::Abort {
                reason: format!("reason {n}"),
            },
            2 => Message::State(ProgramState::new(n as u32, vec![n as u8; n as usize])),
            _ => numbered(n),
        })
        .collect();
    let sender = {
        let (a, sent) = (Arc::clone(a), sent.clone());
        std::thread::spawn(move || sent.iter().try_for_each(|m| a.send(m)))
    };
    for (i, want) in sent.iter().enumerate() {
        let got = next(j, CONTROL, b)?;
        j.rule(CONTROL, got == *want, || {
            format!(
                "message {i}: got {}, sent {} (lost, reordered or changed)",
                got.name(),
                want.name()
            )
        })?;
    }
    let sent = sender
        .join()
        .map_err(|_| j.broke(CONTROL, "the sending thread panicked"))?;
    j.ok(CONTROL, "send", sent)
}

/// A page batch on `lane`, version `v`: its run names the lane, its bytes
/// the lane and version.
fn lane_batch(lane: usize, v: u32, pages: u32) -> PageBatch {
    let mut data = vec![0u8; pages as usize * PAGE];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u32 ^ v.wrapping_mul(2654435761) ^ lane as u32) as u8;
    }
    PageBatch {
        round: v,
        run: PageRun::new(RegionId(lane as u32), u64::from(v % 4) * 1024, pages),
        data: PageData::Raw(Bytes::from(data)),
    }
}

fn check_lanes<A, B>(j: &Judge, a: &Arc<A>, b: &Arc<B>) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    let lanes = a.data_lanes();
    j.rule(LANES, lanes >= 1, || "data_lanes() is 0".into())?;
    // One lane more than there are: the last folds onto lane 0.
    let used = lanes + 1;
    let sender = {
        let a = Arc::clone(a);
        std::thread::spawn(move || -> Result<(), (usize, MigrationError)> {
            for v in 0..VERSIONS {
                for lane in 0..used {
                    let pages = 1 + (v % 3);
                    a.send_pages(lane, &lane_batch(lane, v, pages))
                        .map_err(|e| (lane, e))?;
                }
                a.send(&numbered(u64::from(v)))
                    .map_err(|e| (usize::MAX, e))?;
            }
            a.flush().map_err(|e| (usize::MAX, e))
        })
    };
    let mut next_version = vec![0u32; used];
    let mut control = 0u64;
    let total = used * VERSIONS as usize;
    let mut pages = 0;
    while pages < total || control < u64::from(VERSIONS) {
        match next(j, LANES, b)? {
            Message::Pages(got) => {
                let lane = got.run.region.0 as usize;
                j.rule(LANES, lane < used, || {
                    format!("a batch for unknown lane {lane}")
                })?;
                let want = lane_batch(lane, next_version[lane], 1 + next_version[lane] % 3);
                j.rule(LANES, got == want, || {
                    format!(
                        "on lane {lane}, expected version {} next, got round {} ({} pages): \
                         reordered, lost or changed",
                        next_version[lane], got.round, got.run.count
                    )
                })?;
                next_version[lane] += 1;
                pages += 1;
            }
            m => {
                j.rule(LANES, m == numbered(control), || {
                    format!("control message {control} arrived as {}", m.name())
                })?;
                control += 1;
            }
        }
    }
    match sender.join() {
        Err(_) => Err(j.broke(LANES, "the sending thread panicked")),
        Ok(Err((lane, e))) if lane == lanes => Err(j.broke(
            FOLD,
            format!("send_pages({lane}) with data_lanes() = {lanes} failed: {e}"),
        )),
        Ok(Err((_, e))) => Err(j.broke(LANES, format!("sending failed: {e}"))),
        Ok(Ok(())) => Ok(()),
    }
}

fn check_large<A, B>(j: &Judge, a: &Arc<A>, b: &Arc<B>) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    let batch = lane_batch(0, 77, 2048); // 8 MiB of pages
    let state = Message::State(ProgramState::new(
        3,
        (0..1 << 20)
            .map(|i: u32| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    ));
    let sender = {
        let (a, batch, state) = (Arc::clone(a), batch.clone(), state.clone());
        std::thread::spawn(move || -> crate::Result<()> {
            a.send_pages(0, &batch)?;
            a.flush()?;
            a.send(&state)
        })
    };
    let mut got_pages = false;
    let mut got_state = false;
    while !(got_pages && got_state) {
        match next(j, LARGE, b)? {
            Message::Pages(p) => {
                j.rule(LARGE, !got_pages && p == batch, || {
                    format!(
                        "a run of {} pages arrived as {} pages, round {}, changed",
                        batch.run.count, p.run.count, p.round
                    )
                })?;
                got_pages = true;
            }
            m => {
                j.rule(LARGE, !got_state && m == state, || {
                    format!("a 1 MiB state blob arrived as {} and differs", m.name())
                })?;
                got_state = true;
            }
        }
    }
    let sent = sender
        .join()
        .map_err(|_| j.broke(LARGE, "the sending thread panicked"))?;
    j.ok(LARGE, "sending 8 MiB of pages and a 1 MiB state", sent)
}

fn check_urgent<A, B>(j: &Judge, a: &Arc<A>, b: &Arc<B>) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    // The first call decides the path: the urgent lane's own receiver, or `recv`.
    let own_receiver = {
        let b2 = Arc::clone(b);
        let first = within(
            j,
            "recv_urgent(50 ms)",
            Duration::from_millis(50) + GRACE,
            move || b2.recv_urgent(Duration::from_millis(50)),
        )?;
        match first {
            Ok(None) => true,
            Err(MigrationError::Unsupported { .. }) => false,
            other => {
                return Err(j.broke(
                    URGENT,
                    format!("recv_urgent on a quiet channel returned {other:?}"),
                ));
            }
        }
    };
    // Urgent messages overtaking bulk pages the receiver has not read yet.
    for v in 0..4 {
        j.ok(URGENT, "send_pages", a.send_pages(0, &lane_batch(0, v, 16)))?;
    }
    j.ok(URGENT, "flush", a.flush())?;
    for n in 0..50 {
        j.ok(URGENT, "send_urgent", a.send_urgent(&numbered(n)))?;
    }
    j.ok(URGENT, "send", a.send(&Message::Ready))?;
    let mut pages = 0;
    let mut urgent = 0u64;
    let mut ready = false;
    let deadline = Instant::now() + PATIENCE;
    while pages < 4 || urgent < 50 || !ready {
        j.rule(URGENT, Instant::now() < deadline, || {
            format!("after {PATIENCE:?}: {urgent} of 50 urgent messages, {pages} of 4 batches")
        })?;
        if own_receiver && urgent < 50 {
            let b2 = Arc::clone(b);
            let got = within(
                j,
                "recv_urgent(100 ms)",
                Duration::from_millis(100) + GRACE,
                move || b2.recv_urgent(Duration::from_millis(100)),
            )?;
            match got {
                Ok(Some(m)) => {
                    j.rule(URGENT, m == numbered(urgent), || {
                        format!("urgent message {urgent} arrived as {}", m.name())
                    })?;
                    urgent += 1;
                }
                Ok(None) => {}
                Err(e) => return Err(j.broke(URGENT, format!("recv_urgent failed: {e}"))),
            }
        }
        let got = match recv(j, b, Duration::from_millis(20))? {
            Ok(m) => m,
            Err(e) => return Err(j.broke(URGENT, format!("recv failed: {e}"))),
        };
        match got {
            None => {}
            Some(Message::Pages(_)) => pages += 1,
            Some(Message::Ready) => ready = true,
            Some(m) if !own_receiver && m == numbered(urgent) => urgent += 1,
            Some(m) => {
                return Err(j.broke(
                    URGENT,
                    if own_receiver {
                        format!(
                            "recv returned {} after recv_urgent took the urgent lane",
                            m.name()
                        )
                    } else {
                        format!("urgent message {urgent} arrived as {}", m.name())
                    },
                ));
            }
        }
    }
    Ok(())
}

fn check_closed<A, B>(j: &Judge, a: Arc<A>, b: Arc<B>) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    j.ok(CLOSED, "send", a.send(&Message::Ready))?;
    j.ok(CLOSED, "send", a.send(&numbered(1)))?;
    // The peer goes away (its process ends, say): its end is dropped.
    drop(a);
    for want in [Message::Ready, numbered(1)] {
        let got = next(j, CLOSED, &b)?;
        j.rule(CLOSED, got == want, || {
            format!("sent {} before closing, got {}", want.name(), got.name())
        })?;
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        match recv(j, &b, Duration::from_millis(100))? {
            Err(_) => break,
            Ok(None) if Instant::now() < deadline => {}
            Ok(None) => {
                return Err(j.broke(
                    CLOSED,
                    format!("recv kept returning Ok(None) for {PATIENCE:?} after the peer closed"),
                ));
            }
            Ok(Some(m)) => {
                return Err(j.broke(
                    CLOSED,
                    format!("recv returned {} after the peer closed", m.name()),
                ));
            }
        }
    }
    let again = recv(j, &b, Duration::from_millis(100))?;
    j.rule(CLOSED, again.is_err(), || {
        format!("after failing once, recv returned {again:?}")
    })?;
    // The urgent receiver does not hang on a dead peer either: it returns
    // within its timeout (a broken link is `recv`'s to report, so `None`
    // or an error), and never a message.
    let b2 = Arc::clone(&b);
    let urgent = within(
        j,
        "recv_urgent(100 ms) after the peer closed",
        Duration::from_millis(100) + GRACE,
        move || b2.recv_urgent(Duration::from_millis(100)),
    )?;
    j.rule(BOUNDED, !matches!(urgent, Ok(Some(_))), || {
        format!("recv_urgent returned {urgent:?} after the peer closed")
    })?;
    // A first write may be buffered by the kernel; a later one must fail.
    for attempt in 0..200 {
        let b2 = Arc::clone(&b);
        let sent = within(j, "send to a closed peer", GRACE, move || {
            b2.send(&Message::Ready)
        })?;
        if sent.is_err() {
            return Ok(());
        }
        if attempt % 10 == 9 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Err(j.broke(SEND_CLOSED, "200 sends to a closed peer succeeded"))
}

fn check_shutdown<A, B>(j: &Judge, a: Arc<A>, b: Arc<B>) -> Conformance
where
    A: Channel + 'static,
    B: Channel + 'static,
{
    a.shutdown();
    let got = recv(j, &a, PATIENCE)?;
    j.rule(SHUTDOWN, got.is_err(), || {
        format!("recv after shutdown returned {got:?}")
    })?;
    let a2 = Arc::clone(&a);
    let sent = within(j, "send after shutdown", GRACE, move || {
        a2.send(&Message::Ready)
    })?;
    j.rule(SHUTDOWN, sent.is_err(), || {
        "send after shutdown succeeded".into()
    })?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        match recv(j, &b, Duration::from_millis(100))? {
            Err(_) => return Ok(()),
            Ok(None) if Instant::now() < deadline => {}
            other => {
                return Err(j.broke(
                    SHUTDOWN,
                    format!("the peer of a shut-down end got {other:?} instead of an error"),
                ));
            }
        }
    }
}
