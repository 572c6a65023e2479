//! The Redis protocol (RESP2) subset kvd speaks: requests as arrays of bulk
//! strings or inline commands, replies as simple strings, errors, integers,
//! bulk strings and nil.

/// Longest request kvd accepts (1 MiB); longer ones are a protocol error.
pub const MAX_REQUEST: usize = 1 << 20;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 1024;

/// A request that cannot be parsed; the connection is closed after the error reply.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_int(bytes: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ProtocolError(format!(
                "invalid length {:?}",
                String::from_utf8_lossy(bytes)
            ))
        })
}

/// A parsed request: its arguments and the bytes it took.
pub type Request = (Vec<Vec<u8>>, usize);

/// Parse one request from the front of `buf`. `Ok(None)`: need more bytes.
/// On success returns the arguments and the number of bytes consumed.
pub fn parse(buf: &[u8]) -> Result<Option<Request>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        // Inline command: words up to CRLF (or LF).
        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
            return if buf.len() > MAX_REQUEST {
                Err(ProtocolError("inline request too long".into()))
            } else {
                Ok(None)
            };
        };
        let line = &buf[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let args: Vec<Vec<u8>> = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        return Ok(Some((args, end + 1)));
    }
    let Some(eol) = find_crlf(buf, 1) else {
        return Ok(None);
    };
    let n = parse_int(&buf[1..eol])?;
    if !(0..=MAX_ARGS as i64).contains(&n) {
        return Err(ProtocolError(format!("bad argument count {n}")));
    }
    let mut pos = eol + 2;
    let mut args = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if pos >= buf.len() {
            return Ok(None);
        }
        if buf[pos] != b'$' {
            return Err(ProtocolError("expected '$'".into()));
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            return Ok(None);
        };
        let len = parse_int(&buf[pos + 1..eol])?;
        if !(0..=MAX_REQUEST as i64).contains(&len) {
            return Err(ProtocolError(format!("bad bulk length {len}")));
        }
        let start = eol + 2;
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not terminated by CRLF".into()));
        }
        args.push(buf[start..end].to_vec());
        pos = end + 2;
    }
    Ok(Some((args, pos)))
}

/// Append a simple string reply.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Append an error reply.
pub fn error(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(b"-ERR ");
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Append an integer reply.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(format!(":{n}\r\n").as_bytes());
}

/// Append a bulk string reply, or nil for `None`.
pub fn bulk(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        None => out.extend_from_slice(b"$-1\r\n"),
        Some(s) => {
            out.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Encode a request as an array of bulk strings (for clients).
pub fn request(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        bulk(out, Some(a));
    }
}

/// A reply as a client sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n ...` or nil
    Bulk(Option<Vec<u8>>),
}

/// Parse one reply from the front of `buf` (for clients). `Ok(None)`: need more bytes.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some(eol) = find_crlf(buf, 1) else {
        return Ok(None);
    };
    let line = &buf[1..eol];
    let text = || String::from_utf8_lossy(line).into_owned();
    let reply = match buf[0] {
        b'+' => Reply::Simple(text()),
        b'-' => Reply::Error(text()),
        b':' => Reply::Integer(parse_int(line)?),
        b'$' => {
            let len = parse_int(line)?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), eol + 2)));
            }
            let end = eol + 2 + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            return Ok(Some((
                Reply::Bulk(Some(buf[eol + 2..end].to_vec())),
                end + 2,
            )));
        }
        other => {
            return Err(ProtocolError(format!(
                "unexpected reply type {:?}",
                other as char
            )));
        }
    };
    Ok(Some((reply, eol + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arrays_and_inline() {
        let (args, n) = parse(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(n, 20);
        let (args, n) = parse(b"PING\r\n").unwrap().unwrap();
        assert_eq!((args, n), (vec![b"PING".to_vec()], 6));
        assert_eq!(parse(b"*2\r\n$3\r\nGET\r\n$1\r\n").unwrap(), None);
        assert!(parse(b"*1\r\n$3\r\nGETxx").is_err());
        assert!(parse(b"*-5\r\n").is_err());
    }

    #[test]
    fn replies_round_trip() {
        let mut out = Vec::new();
        integer(&mut out, 42);
        bulk(&mut out, Some(b"v"));
        bulk(&mut out, None);
        simple(&mut out, "OK");
        let mut pos = 0;
        let mut got = Vec::new();
        while let Some((r, n)) = parse_reply(&out[pos..]).unwrap() {
            got.push(r);
            pos += n;
            if pos == out.len() {
                break;
            }
        }
        assert_eq!(
            got,
            vec![
                Reply::Integer(42),
                Reply::Bulk(Some(b"v".to_vec())),
                Reply::Bulk(None),
                Reply::Simple("OK".into())
            ]
        );
    }
}
