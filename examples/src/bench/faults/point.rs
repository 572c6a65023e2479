//! One fault point on a thread of its own, bounded in time: a point that
//! hangs (a session waiting forever, a blocked page read) fails with a
//! clear line instead of hanging the suite. The hung thread cannot be
//! stopped from outside; it is left behind (named, so that a stack dump
//! shows which point it was) and whatever it holds counts in the next
//! points' leak checks, so a hang never passes unseen.

use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use super::check::Verdict;

/// The thread running one fault point (the `FaultPoint` role).
pub struct PointThread<T> {
    rx: Receiver<T>,
    thread: JoinHandle<()>,
}

impl<T: Send + 'static> PointThread<T> {
    /// Start `f` on a thread named after the point.
    pub fn spawn(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let mut short: String = name.chars().take(15).collect();
        if short.is_empty() {
            short.push_str("fault-point");
        }
        let thread = std::thread::Builder::new().name(short).spawn(move || {
            // The receiver may be gone (the point timed out): nothing to do.
            let _ = tx.send(f());
        })?;
        Ok(Self { rx, thread })
    }

    /// The point's result within `limit`; `Err` says why there is none
    /// (it hung past the limit, or panicked).
    pub fn join(self, limit: Duration) -> Result<T, String> {
        match self.rx.recv_timeout(limit) {
            Ok(v) => {
                let _ = self.thread.join();
                Ok(v)
            }
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "the point did not end within {limit:?} (its thread is left hanging)"
            )),
            Err(RecvTimeoutError::Disconnected) => {
                let why = match self.thread.join() {
                    Err(p) => p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".into()),
                    Ok(()) => "the point ended without a verdict".into(),
                };
                Err(format!("the point panicked: {why}"))
            }
        }
    }
}

/// Run `f` as one point bounded by `limit`: its verdict, or a failed
/// verdict saying that it hung or panicked.
pub fn bounded<T: Send + 'static>(
    name: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Verdict> {
    let failed = |why: String| Verdict {
        problems: vec![why],
        ..Verdict::default()
    };
    PointThread::spawn(name, f)
        .map_err(|e| failed(format!("could not start the point's thread: {e}")))?
        .join(limit)
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_point_fails_within_its_limit() {
        let r = bounded("hang", Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(2));
            1
        });
        let v = r.expect_err("a hang is a failure");
        assert!(v.problems[0].contains("did not end"), "{:?}", v.problems);
    }

    #[test]
    fn a_panicking_point_fails_with_its_message() {
        let r = bounded("panic", Duration::from_secs(5), || -> u32 {
            panic!("boom at point 3")
        });
        let v = r.expect_err("a panic is a failure");
        assert!(
            v.problems[0].contains("boom at point 3"),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn a_point_that_ends_gives_its_result() {
        assert_eq!(bounded("ok", Duration::from_secs(5), || 7).ok(), Some(7));
    }
}
