//! A TCP proxy for the post-copy scenarios: it forwards every connection
//! and can cut all of them at once, or cut them and refuse new ones until it
//! heals (a source that is lost, then comes back).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A proxy that forwards TCP connections and can cut all of them at once.
pub struct Proxy {
    /// Where clients dial.
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    /// New connections are refused (closed at once) while set.
    refuse: Arc<AtomicBool>,
}

impl Proxy {
    /// Forward connections to `target`.
    pub fn new(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let (c, st, r) = (conns.clone(), stop.clone(), refuse.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                if r.load(Ordering::Acquire) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                let mut list = c.lock().unwrap_or_else(|p| p.into_inner());
                list.push(down);
                list.push(up);
            }
        });
        Ok(Self {
            addr,
            conns,
            stop,
            refuse,
        })
    }

    /// Cut every connection and refuse new ones until [`Self::heal`].
    pub fn lose(&self) {
        self.refuse.store(true, Ordering::Release);
        self.cut();
    }

    /// Accept connections again.
    pub fn heal(&self) {
        self.refuse.store(false, Ordering::Release);
    }

    /// Cut every connection now.
    pub fn cut(&self) {
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
    }
}
