//! Every protocol message round-trips through the wire format; bad frames are errors.

use bytes::{Bytes, BytesMut};
use lmig_core::protocol::Message;
use lmig_transport::fuzzing::{sample_handshakes, sample_messages};
use lmig_transport::wire::{
    MessageDecoder, WireError, WireItem, encode_handshake, encode_message, parse_message,
};

#[test]
fn every_message_variant_roundtrips() {
    let msgs = sample_messages();
    let mut names: Vec<&str> = msgs.iter().map(Message::name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 19, "a sample of every variant: {names:?}");
    for m in &msgs {
        let wire = Bytes::from(encode_message(m).unwrap().to_vec());
        assert_eq!(&parse_message(wire).unwrap(), m);
    }
}

#[test]
fn stream_of_everything_decodes_in_order() {
    let msgs = sample_messages();
    let hs = sample_handshakes();
    let mut wire = Vec::new();
    for h in &hs {
        wire.extend(encode_handshake(h).unwrap().to_vec());
    }
    for m in &msgs {
        wire.extend(encode_message(m).unwrap().to_vec());
    }
    let mut dec = MessageDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in wire.chunks(97) {
        buf.extend_from_slice(chunk);
        while let Some(item) = dec.decode(&mut buf).unwrap() {
            out.push(item);
        }
    }
    let expected: Vec<WireItem> = hs
        .into_iter()
        .map(WireItem::Handshake)
        .chain(msgs.into_iter().map(WireItem::Message))
        .collect();
    assert_eq!(out, expected);
}

#[test]
fn bad_frames_are_errors() {
    let good = encode_message(&Message::Abort {
        reason: "why".into(),
    })
    .unwrap()
    .to_vec();
    let parse = |b: &[u8]| parse_message(Bytes::copy_from_slice(b));
    parse(&good).unwrap();
    for cut in 0..good.len() {
        assert!(
            matches!(parse(&good[..cut]), Err(WireError::Truncated { .. })),
            "cut {cut}"
        );
    }
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(parse(&b), Err(WireError::BadMagic { .. })));
    let mut b = good.clone();
    b[4] = 9;
    assert!(matches!(parse(&b), Err(WireError::BadVersion { .. })));
    let mut b = good.clone();
    b[6] = 0;
    assert!(matches!(parse(&b), Err(WireError::BadKind(0))));
    let mut b = good.clone();
    b[6] = 200;
    assert!(matches!(parse(&b), Err(WireError::BadKind(200))));
    let mut b = good.clone();
    b[17] ^= 0xff;
    assert!(matches!(parse(&b), Err(WireError::BadChecksum { .. })));
    let mut b = good.clone();
    b[8..12].copy_from_slice(&(65u32 << 20).to_le_bytes());
    assert!(matches!(parse(&b), Err(WireError::TooLong { .. })));
}

#[test]
fn every_split_message_roundtrips() {
    use lmig_core::split::SplitMessage;
    use lmig_transport::fuzzing::sample_split_messages;
    let msgs = sample_split_messages();
    let mut names: Vec<&str> = msgs.iter().map(SplitMessage::name).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        11,
        "a sample of every split message: {names:?}"
    );
    for m in msgs {
        let m = Message::Split(m);
        let wire = Bytes::from(encode_message(&m).unwrap().to_vec());
        assert_eq!(wire[6], 16, "frame kind Split");
        assert_eq!(parse_message(wire.clone()).unwrap(), m);
        // Every strict prefix of the body is an error, never a panic.
        for cut in 17..wire.len() {
            let mut w = wire[..cut].to_vec();
            let len = (cut - 16) as u32;
            w[8..12].copy_from_slice(&len.to_le_bytes());
            let crc = crc32c::crc32c(&w[16..]);
            w[12..16].copy_from_slice(&crc.to_le_bytes());
            assert!(
                parse_message(Bytes::from(w)).is_err(),
                "{} cut at {cut}",
                m.name()
            );
        }
    }
}
