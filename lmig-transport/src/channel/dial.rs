//! The connect side: dial every stream of one generation and run the
//! dialer's half of each stream's handshake.

use super::conn::{Conn, FrameReader, HandshakeConn};
use super::{ChannelConfig, Dial, Stream, Streams, secure};
use crate::auth;
use crate::error::{Result, TransportError};
use crate::wire::{Hello, SESSION_ID_LEN, StreamRole};

/// The streams of a channel in the order the dialer opens them: control,
/// data lanes, urgent.
fn lane_plan(data_streams: u16) -> impl Iterator<Item = (StreamRole, u16)> {
    std::iter::once((StreamRole::Control, 0))
        .chain((0..data_streams).map(|i| (StreamRole::Data, i)))
        .chain(std::iter::once((StreamRole::Urgent, 0)))
}

/// Dial and authenticate every stream of one generation.
pub(super) fn dial_streams(
    dialer: &dyn Dial,
    config: &ChannelConfig,
    session: [u8; SESSION_ID_LEN],
    generation: u32,
) -> Result<Streams> {
    let n = config.data_streams as u16;
    let mut control = None;
    let mut urgent = None;
    let mut data = Vec::with_capacity(n.into());
    for (role, index) in lane_plan(n) {
        let conn = dialer.dial(config)?;
        let stream = handshake_dial(conn, config, session, generation, role, index)?;
        match role {
            StreamRole::Control => control = Some(stream),
            StreamRole::Data => data.push(stream),
            StreamRole::Urgent => urgent = Some(stream),
        }
    }
    match (control, urgent) {
        (Some(control), Some(urgent)) => Ok(Streams {
            control,
            data,
            urgent,
        }),
        _ => Err(TransportError::Handshake {
            detail: "stream plan incomplete".into(),
        }),
    }
}

/// Run the dialer's half of one stream's handshake on `conn`.
fn handshake_dial(
    conn: Box<dyn Conn>,
    config: &ChannelConfig,
    session: [u8; SESSION_ID_LEN],
    generation: u32,
    role: StreamRole,
    index: u16,
) -> Result<Stream> {
    let io_err = |e| TransportError::io("preparing a stream", e);
    conn.set_timeouts(
        Some(config.handshake_timeout),
        Some(config.handshake_timeout),
    )
    .map_err(io_err)?;
    let opened = secure::open(conn, &config.security, true)?;
    let mut writer = opened.writer;
    let mut reader = FrameReader::new(opened.reader);
    let hello = Hello {
        session,
        role,
        index,
        data_streams: config.data_streams as u16,
        generation,
        nonce: auth::nonce()?,
    };
    let result = auth::dial(
        &mut HandshakeConn {
            reader: &mut reader,
            writer: &mut *writer,
            timeout: config.handshake_timeout,
            hello_seen: None,
        },
        &opened.key,
        opened.mode,
        hello,
    );
    let keys = match result {
        Ok(a) => a.keys,
        Err(e) => {
            writer.shutdown_conn();
            return Err(e);
        }
    };
    writer
        .set_timeouts(None, config.write_timeout)
        .map_err(io_err)?;
    reader.set_authenticated();
    let (reader, writer) = secure::seal(reader, writer, keys, opened.mode);
    Ok(Stream {
        writer,
        reader,
        cipher: opened.cipher,
    })
}
