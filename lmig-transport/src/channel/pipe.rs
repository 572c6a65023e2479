//! An in-memory duplex byte pipe, so the in-memory channel runs the same
//! framing, authentication and reader threads as the socket channels.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::conn::Conn;

/// Bytes buffered per direction before a writer blocks.
const PIPE_CAPACITY: usize = 4 << 20;

#[derive(Default)]
struct State {
    data: VecDeque<u8>,
    /// The writing end closed: readers see EOF once `data` is drained.
    write_closed: bool,
    /// The reading end closed: writers get `BrokenPipe`.
    read_closed: bool,
}

#[derive(Default)]
struct Direction {
    state: Mutex<State>,
    cond: Condvar,
}

impl Direction {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One end of an in-memory pipe.
pub(crate) struct PipeEnd {
    rx: Arc<Direction>,
    tx: Arc<Direction>,
    timeouts: Arc<Mutex<(Option<Duration>, Option<Duration>)>>,
}

/// Two connected ends.
pub(crate) fn pipe() -> (PipeEnd, PipeEnd) {
    let a = Arc::new(Direction::default());
    let b = Arc::new(Direction::default());
    (
        PipeEnd {
            rx: a.clone(),
            tx: b.clone(),
            timeouts: Arc::default(),
        },
        PipeEnd {
            rx: b,
            tx: a,
            timeouts: Arc::default(),
        },
    )
}

fn wait<'a>(
    dir: &'a Direction,
    guard: MutexGuard<'a, State>,
    deadline: Option<Instant>,
) -> io::Result<MutexGuard<'a, State>> {
    match deadline {
        None => Ok(dir.cond.wait(guard).unwrap_or_else(|p| p.into_inner())),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "pipe timeout"));
            }
            Ok(dir
                .cond
                .wait_timeout(guard, d - now)
                .unwrap_or_else(|p| p.into_inner())
                .0)
        }
    }
}

impl Read for PipeEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self
            .timeouts
            .lock()
            .map(|t| t.0)
            .unwrap_or(None)
            .map(|t| Instant::now() + t);
        let mut s = self.rx.lock();
        loop {
            if s.read_closed {
                return Ok(0);
            }
            if !s.data.is_empty() {
                let n = buf.len().min(s.data.len());
                let (a, b) = s.data.as_slices();
                let from_a = n.min(a.len());
                buf[..from_a].copy_from_slice(&a[..from_a]);
                buf[from_a..n].copy_from_slice(&b[..n - from_a]);
                s.data.drain(..n);
                self.rx.cond.notify_all();
                return Ok(n);
            }
            if s.write_closed {
                return Ok(0);
            }
            s = wait(&self.rx, s, deadline)?;
        }
    }
}

impl Write for PipeEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self
            .timeouts
            .lock()
            .map(|t| t.1)
            .unwrap_or(None)
            .map(|t| Instant::now() + t);
        let mut s = self.tx.lock();
        loop {
            if s.read_closed || s.write_closed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "pipe closed"));
            }
            let room = PIPE_CAPACITY.saturating_sub(s.data.len());
            if room > 0 {
                let n = room.min(buf.len());
                s.data.extend(&buf[..n]);
                self.tx.cond.notify_all();
                return Ok(n);
            }
            s = wait(&self.tx, s, deadline)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn for PipeEnd {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(PipeEnd {
            rx: self.rx.clone(),
            tx: self.tx.clone(),
            timeouts: self.timeouts.clone(),
        }))
    }

    fn shutdown_conn(&self) {
        for (dir, read_side) in [(&self.rx, true), (&self.tx, false)] {
            let mut s = dir.lock();
            if read_side {
                s.read_closed = true;
            } else {
                s.write_closed = true;
            }
            dir.cond.notify_all();
        }
    }

    fn shutdown_read(&self) {
        let mut s = self.rx.lock();
        s.read_closed = true;
        self.rx.cond.notify_all();
    }

    fn peer_name(&self) -> String {
        "memory".into()
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        if let Ok(mut t) = self.timeouts.lock() {
            *t = (read, write);
        }
        Ok(())
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Some(Instant::now() + timeout);
        let mut s = self.rx.lock();
        loop {
            if s.read_closed || s.write_closed || !s.data.is_empty() {
                return Ok(true);
            }
            s = match wait(&self.rx, s, deadline) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(false),
                Err(e) => return Err(e),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_and_close() {
        let (mut a, mut b) = pipe();
        a.write_all(b"hello").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        a.shutdown_conn();
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        assert!(b.write(b"x").is_err());
    }

    #[test]
    fn read_timeout() {
        let (a, mut b) = pipe();
        b.set_timeouts(Some(Duration::from_millis(10)), None)
            .unwrap();
        assert!(b.read(&mut [0u8; 4]).is_err());
        drop(a);
    }
}
