//! The in-memory channel pair: [`pair`], over pipes, with the same codec,
//! handshake and reader threads as the socket channels.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use super::conn::Conn;
use super::dial::dial_streams;
use super::listening::ListenerCore;
use super::stream::{Side, StreamChannel};
use super::{AcceptConn, ChannelConfig, Dial, lock, pipe};
use crate::auth;
use crate::error::{Result, TransportError};
use crate::wire::SESSION_ID_LEN;

/// The dialer of an in-memory pair: hands one end of a fresh pipe to the
/// listening side per stream.
struct MemDial(Mutex<std::sync::mpsc::Sender<pipe::PipeEnd>>);

impl Dial for MemDial {
    fn dial(&self, _config: &ChannelConfig) -> Result<Box<dyn Conn>> {
        let (a, b) = pipe::pipe();
        lock(&self.0).send(b).map_err(|_| TransportError::Closed {
            during: "while connecting (in-memory listener gone)",
        })?;
        Ok(Box::new(a))
    }
}

struct MemAccept(Mutex<Receiver<pipe::PipeEnd>>);

impl AcceptConn for MemAccept {
    fn accept_conn(
        &self,
        _config: &ChannelConfig,
        deadline: Option<Instant>,
    ) -> std::io::Result<Option<Box<dyn Conn>>> {
        let rx = lock(&self.0);
        let r = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match r {
            Ok(p) => Ok(Some(Box::new(p))),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "in-memory dialer gone",
            )),
        }
    }
}

/// An in-memory channel pair `(dialer, listener)`: every message still goes
/// through the frame codec, the handshake and the reader threads. Both
/// support `reconnect` (call it on both, from two threads).
pub fn pair(config: ChannelConfig) -> Result<(StreamChannel, StreamChannel)> {
    config.check()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (core, _acceptor_thread) =
        ListenerCore::start(Box::new(MemAccept(Mutex::new(rx))), config.clone())?;
    let dial = MemDial(Mutex::new(tx));
    let mut session = [0u8; SESSION_ID_LEN];
    auth::fill_random(&mut session)?;
    // The listening side's handshakes run on its own threads.
    let dialed = dial_streams(&dial, &config, session, 0)?;
    let ((session_l, generation), accepted) = core.accept_set(
        &|k| k.0 == session && k.1 == 0,
        Some(config.handshake_timeout),
    )?;
    let a = StreamChannel::start(
        dialed,
        config.clone(),
        session,
        0,
        Side::Dialer(Box::new(dial)),
    );
    let b = StreamChannel::start(
        accepted,
        config,
        session_l,
        generation,
        Side::Listener(core),
    );
    Ok((a, b))
}
