//! The listening side as its owners hold it: the listener's shared state
//! ([`Shared`], `accept.rs`) and the acceptor thread that feeds it
//! (`acceptor.rs`), started together and stopped when the last owner goes.

use std::sync::Arc;
use std::thread;

use super::accept::Shared;
use super::acceptor::AcceptorThread;
use super::{AcceptConn, ChannelConfig};
use crate::error::{Result, TransportError};

/// The listening side as its owners hold it: the [`super::Listener`] and
/// every channel it accepted (for `reconnect`). When the last one goes, the
/// acceptor thread stops (within [`TICK`](super::acceptor::TICK)), the handshakes in flight are
/// cut and the listening socket closes.
pub(super) struct ListenerCore {
    shared: Arc<Shared>,
}

impl std::ops::Deref for ListenerCore {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for ListenerCore {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl ListenerCore {
    /// Start accepting on `acceptor`: the acceptor thread runs until the
    /// returned core is dropped.
    pub(super) fn start(
        acceptor: Box<dyn AcceptConn>,
        config: ChannelConfig,
    ) -> Result<(Arc<Self>, thread::JoinHandle<()>)> {
        let shared = Arc::new(Shared::new(acceptor, config));
        let handle = AcceptorThread::new(shared.clone())
            .spawn()
            .map_err(|e| TransportError::io("starting the acceptor thread", e))?;
        Ok((Arc::new(Self { shared }), handle))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::acceptor::TICK;
    use super::super::{Endpoint, net};
    use super::*;
    use crate::AuthKey;

    #[test]
    fn acceptor_thread_stops_when_the_owners_are_gone() {
        let config = ChannelConfig::new(AuthKey::new([1u8; 32]).unwrap());
        let (acceptor, _) =
            net::listen(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), &config).unwrap();
        let (core, thread) = ListenerCore::start(acceptor, config).unwrap();
        let other_owner = core.clone();
        drop(core);
        std::thread::sleep(TICK * 2);
        assert!(!thread.is_finished(), "an owner is left");
        drop(other_owner);
        for _ in 0..100 {
            if thread.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            thread.is_finished(),
            "the acceptor thread outlived its listener"
        );
        thread.join().expect("the acceptor thread panicked");
    }
}
