//! The page host of split memory (`lmig-pagehost`, and the page hosts the
//! `split` benchmark starts): holds part of a split region's pages for a
//! running host, serves its fetches, stores evicted pages and sends its
//! share straight to other hosts (lmig-mem's `PageHost` over lmig-transport
//! channels on TCP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmig_core::Channel;
use lmig_core::split::HostId;
use lmig_mem::split::{Dial, PageHost};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};

type BoxError = Box<dyn std::error::Error>;

/// Environment variable holding the hex key of page hosts.
pub const KEY_ENV: &str = "LMIG_PAGEHOST_KEY";

/// The channel configuration of page hosts and the running host.
pub fn channel_config(key: &[u8]) -> Result<ChannelConfig, BoxError> {
    let mut c = ChannelConfig::new(AuthKey::new(key)?);
    c.write_timeout = Some(Duration::from_secs(120));
    Ok(c)
}

/// A [`Dial`] over TCP with `key`.
pub fn tcp_dial(key: Vec<u8>) -> Dial {
    Arc::new(move |ep: &str| {
        let addr = ep
            .parse()
            .map_err(|e| lmig_core::MigrationError::invalid("endpoint", format!("{ep}: {e}")))?;
        let config = channel_config(&key)
            .map_err(|e| lmig_core::MigrationError::invalid("key", e.to_string()))?;
        let ch = connect(&Endpoint::Tcp(addr), config)
            .map_err(|e| lmig_core::MigrationError::channel(format!("dial {ep}"), e))?;
        Ok(Box::new(ch) as Box<dyn Channel>)
    })
}

/// A page host listening for channels: the running host's and other page
/// hosts'.
pub struct PageHostService {
    host: PageHost,
    listener: Listener,
    addr: SocketAddr,
}

impl PageHostService {
    /// Page host `id` listening on `listen` (TCP) for peers holding `key`.
    /// A stranger costs its own connection only: refused, logged, and the
    /// host serves on.
    pub fn bind(id: u32, listen: &str, key: &[u8]) -> Result<Self, BoxError> {
        let host = PageHost::new(HostId(id), tcp_dial(key.to_vec()));
        let config = channel_config(key)?
            .on_reject(|r: &lmig_transport::Rejection| eprintln!("lmig-pagehost: {r}"));
        let listener = Listener::bind(&Endpoint::Tcp(listen.parse()?), config)?;
        let Endpoint::Tcp(addr) = listener.local_endpoint().clone() else {
            return Err("TCP listener expected".into());
        };
        Ok(Self {
            host,
            listener,
            addr,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve every channel that arrives while `go_on()` holds (asked at
    /// least every `poll`).
    pub fn serve_while(&self, poll: Duration, go_on: impl Fn() -> bool) {
        while go_on() {
            if let Ok(ch) = self.listener.accept_timeout(poll) {
                self.host.serve(Box::new(ch));
            }
        }
    }
}

/// Run a page host: listen on `listen`, print `LISTENING <addr>`, serve
/// every channel until the parent process goes away (at most `lifetime`).
pub fn page_host_main(
    id: u32,
    listen: &str,
    key: &[u8],
    lifetime: Duration,
) -> Result<(), BoxError> {
    let service = PageHostService::bind(id, listen, key)?;
    println!("LISTENING {}", service.addr());
    let parent = std::os::unix::process::parent_id();
    let end = Instant::now() + lifetime;
    service.serve_while(Duration::from_millis(200), || {
        Instant::now() < end && std::os::unix::process::parent_id() == parent
    });
    Ok(())
}
