//! tokiod's program state: every connection's buffered bytes at the park,
//! by the connection's id.
//!
//! ```text
//! u64 count, then per connection: u64 id, u64 len, input bytes, u64 len, output bytes
//! ```
//! (little-endian). A decoder never allocates beyond what its input holds.

/// One connection's buffered bytes: id, unfinished input, unsent output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnBuffers {
    /// The connection's id (the socket's id in the migration records).
    pub id: u64,
    /// Input read but not a whole request yet.
    pub input: Vec<u8>,
    /// Replies the socket did not take yet.
    pub output: Vec<u8>,
}

/// Most connections a state may claim.
const MAX_CONNS: u64 = 1 << 20;
/// The smallest encoding of one connection (id and two lengths).
const MIN_CONN: usize = 24;

/// Encode the buffers of every connection.
pub fn encode<'a>(conns: impl ExactSizeIterator<Item = &'a ConnBuffers>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(conns.len() as u64).to_le_bytes());
    for c in conns {
        out.extend_from_slice(&c.id.to_le_bytes());
        for b in [&c.input, &c.output] {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
    out
}

/// Decode what [`encode`] wrote; an error names what is wrong. Bytes after
/// the last connection are an error too (a state is never padded).
pub fn decode(mut s: &[u8]) -> Result<Vec<ConnBuffers>, String> {
    fn take<'a>(s: &mut &'a [u8], n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "tokiod state: length too large")?;
        if s.len() < n {
            return Err("tokiod state truncated".into());
        }
        let (a, b) = s.split_at(n);
        *s = b;
        Ok(a)
    }
    fn word(s: &mut &[u8]) -> Result<u64, String> {
        Ok(u64::from_le_bytes(take(s, 8)?.try_into().expect("8 bytes")))
    }
    let n = word(&mut s)?;
    if n > MAX_CONNS {
        return Err(format!("tokiod state claims {n} connections"));
    }
    let mut out = Vec::with_capacity((n as usize).min(s.len() / MIN_CONN));
    for _ in 0..n {
        let id = word(&mut s)?;
        let len = word(&mut s)?;
        let input = take(&mut s, len)?.to_vec();
        let len = word(&mut s)?;
        let output = take(&mut s, len)?.to_vec();
        out.push(ConnBuffers { id, input, output });
    }
    if !s.is_empty() {
        return Err(format!(
            "tokiod state: {} bytes after the last connection",
            s.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_input() {
        let conns = vec![
            ConnBuffers {
                id: 3,
                input: b"*2\r\n$4\r\nINCR".to_vec(),
                output: b":7\r\n".to_vec(),
            },
            ConnBuffers {
                id: 9,
                ..ConnBuffers::default()
            },
        ];
        let bytes = encode(conns.iter());
        assert_eq!(decode(&bytes).unwrap(), conns);
        assert_eq!(decode(&encode([].iter())).unwrap(), vec![]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode(&padded).is_err());
        // A huge count or length fails without reserving for it.
        assert!(decode(&u64::MAX.to_le_bytes()).is_err());
        let mut huge = 1u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
