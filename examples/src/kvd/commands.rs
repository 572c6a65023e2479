//! kvd's commands: what a request does to the store and what it answers,
//! as Redis would for the subset kvd keeps. What kvd cannot do as Redis
//! does (expiry, sorted-set flags) is refused with an error, never ignored.

use std::sync::atomic::Ordering;

use super::collections::End;
use super::resp;
use super::server::{Counters, POSTCOPY_PAUSED};
use super::store::{Kind, Store, StoreError};

/// Every command kvd answers, for the error naming an unknown one.
pub const COMMANDS: &str = "PING GET SET MSET MGET DEL INCR DBSIZE INFO DEBUG POPULATE \
    LPUSH RPUSH LPOP RPOP LLEN LRANGE SADD SREM SCARD SISMEMBER SMEMBERS SPOP \
    HSET HMSET HGET HDEL HLEN HGETALL ZADD ZCARD ZSCORE ZPOPMIN CONFIG GET";

fn store_error(out: &mut Vec<u8>, e: StoreError) {
    match e {
        StoreError::WrongType => {
            out.extend_from_slice(b"-");
            out.extend_from_slice(e.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        e => resp::error(out, &e.to_string()),
    }
}

fn array(out: &mut Vec<u8>, items: impl ExactSizeIterator<Item = Vec<u8>>) {
    out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
    for i in items {
        resp::bulk(out, Some(&i));
    }
}

fn int_arg(a: &[u8]) -> Option<i64> {
    std::str::from_utf8(a).ok()?.parse().ok()
}

fn float_arg(a: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(a).ok()?;
    match s.to_ascii_lowercase().as_str() {
        "+inf" | "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok().filter(|x: &f64| !x.is_nan()),
    }
}

/// A score as Redis prints it (integers without a fraction).
fn score_text(x: f64) -> Vec<u8> {
    if x.is_infinite() {
        return if x > 0.0 {
            b"inf".to_vec()
        } else {
            b"-inf".to_vec()
        };
    }
    if x.fract() == 0.0 && x.abs() < 1e17 {
        format!("{}", x as i64).into_bytes()
    } else {
        format!("{x}").into_bytes()
    }
}

/// The count argument of LPOP/RPOP/SPOP/ZPOPMIN: `None` without one (one
/// element, answered as a single reply), `Err` when it is not a positive
/// integer.
fn count_arg(args: &[Vec<u8>], at: usize) -> Result<Option<usize>, &'static str> {
    match args.get(at) {
        None => Ok(None),
        Some(a) => int_arg(a)
            .filter(|n| *n >= 0)
            .map(|n| Some(n as usize))
            .ok_or("value is out of range, must be positive"),
    }
}

/// `SET key value [NX|XX]`: the options kvd honours; expiry is refused.
fn set(store: &Store<'_>, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let (mut nx, mut xx) = (false, false);
    for opt in &args[3..] {
        match opt.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"EX" | b"PX" | b"EXAT" | b"PXAT" | b"KEEPTTL" => {
                return resp::error(
                    out,
                    "kvd keeps no expiry: EX, PX, EXAT, PXAT and KEEPTTL are not supported",
                );
            }
            b"GET" => return resp::error(out, "kvd does not support SET ... GET"),
            _ => return resp::error(out, "syntax error"),
        }
    }
    if nx && xx {
        return resp::error(out, "syntax error");
    }
    let exists = store.kind_of(&args[1]).is_some();
    if (nx && exists) || (xx && !exists) {
        return resp::bulk(out, None);
    }
    match store.set(&args[1], &args[2]) {
        Ok(()) => resp::simple(out, "OK"),
        Err(e) => store_error(out, e),
    }
}

/// `CONFIG GET name`: what redis-benchmark and redis-cli ask; kvd saves
/// nothing to disk.
fn config(args: &[Vec<u8>], out: &mut Vec<u8>) {
    if args.len() != 3 || !args[1].eq_ignore_ascii_case(b"GET") {
        return resp::error(out, "kvd answers CONFIG GET only");
    }
    let value: Option<&[u8]> = match args[2].to_ascii_lowercase().as_slice() {
        b"save" => Some(b""),
        b"appendonly" => Some(b"no"),
        _ => None,
    };
    match value {
        Some(v) => array(out, [args[2].clone(), v.to_vec()].into_iter()),
        None => out.extend_from_slice(b"*0\r\n"),
    }
}

fn list(
    store: &Store<'_>,
    cmd: &[u8],
    args: &[Vec<u8>],
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let key = &args[1];
    match cmd {
        b"LPUSH" | b"RPUSH" => {
            let end = if cmd == b"LPUSH" {
                End::Left
            } else {
                End::Right
            };
            resp::integer(out, store.push(key, end, &args[2..])? as i64);
        }
        b"LPOP" | b"RPOP" => {
            let end = if cmd == b"LPOP" {
                End::Left
            } else {
                End::Right
            };
            match count_arg(args, 2) {
                Err(e) => resp::error(out, e),
                Ok(None) => resp::bulk(out, store.pop(key, end, 1)?.first().map(Vec::as_slice)),
                Ok(Some(n)) => array(out, store.pop(key, end, n)?.into_iter()),
            }
        }
        b"LLEN" => resp::integer(out, store.list_len(key)? as i64),
        _ => match (int_arg(&args[2]), int_arg(&args[3])) {
            (Some(a), Some(b)) => array(out, store.range(key, a, b)?.into_iter()),
            _ => resp::error(out, "value is not an integer or out of range"),
        },
    }
    Ok(())
}

fn members(
    store: &Store<'_>,
    cmd: &[u8],
    args: &[Vec<u8>],
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let key = &args[1];
    match cmd {
        b"SADD" => {
            let mut n = 0;
            for m in &args[2..] {
                n += i64::from(store.add_member(key, Kind::Set, m, b"")?);
            }
            resp::integer(out, n);
        }
        b"SREM" | b"HDEL" => {
            let kind = if cmd == b"SREM" {
                Kind::Set
            } else {
                Kind::Hash
            };
            let mut n = 0;
            for m in &args[2..] {
                n += i64::from(store.remove_member(key, kind, m)?);
            }
            resp::integer(out, n);
        }
        b"SCARD" => resp::integer(out, store.card(key, Kind::Set)? as i64),
        b"HLEN" => resp::integer(out, store.card(key, Kind::Hash)? as i64),
        b"ZCARD" => resp::integer(out, store.card(key, Kind::Zset)? as i64),
        b"SISMEMBER" => resp::integer(
            out,
            i64::from(store.member(key, Kind::Set, &args[2])?.is_some()),
        ),
        b"SMEMBERS" => array(out, store.members(key, Kind::Set)?.into_iter().map(|m| m.0)),
        b"SPOP" => match count_arg(args, 2) {
            Err(e) => resp::error(out, e),
            Ok(None) => resp::bulk(out, store.pop_members(key, 1)?.first().map(Vec::as_slice)),
            Ok(Some(n)) => array(out, store.pop_members(key, n)?.into_iter()),
        },
        b"HSET" | b"HMSET" => {
            if args.len() < 4 || !args.len().is_multiple_of(2) {
                resp::error(out, "wrong number of arguments for 'hset' command");
                return Ok(());
            }
            let mut n = 0;
            for fv in args[2..].chunks(2) {
                n += i64::from(store.add_member(key, Kind::Hash, &fv[0], &fv[1])?);
            }
            if cmd == b"HMSET" {
                resp::simple(out, "OK");
            } else {
                resp::integer(out, n);
            }
        }
        b"HGET" => resp::bulk(out, store.member(key, Kind::Hash, &args[2])?.as_deref()),
        b"HGETALL" => array(
            out,
            store
                .members(key, Kind::Hash)?
                .into_iter()
                .flat_map(|(f, v)| [f, v])
                .collect::<Vec<_>>()
                .into_iter(),
        ),
        b"ZADD" => zadd(store, args, out)?,
        b"ZSCORE" => {
            let s = store.member(key, Kind::Zset, &args[2])?;
            let s = s
                .and_then(|p| p.get(..8)?.try_into().ok())
                .map(f64::from_le_bytes);
            resp::bulk(out, s.map(score_text).as_deref());
        }
        _ => match count_arg(args, 2) {
            Err(e) => resp::error(out, e),
            Ok(n) => {
                let popped = store.pop_min(key, n.unwrap_or(1))?;
                array(
                    out,
                    popped
                        .into_iter()
                        .flat_map(|(m, s)| [m, score_text(s)])
                        .collect::<Vec<_>>()
                        .into_iter(),
                )
            }
        },
    }
    Ok(())
}

/// `ZADD key score member [score member ...]`; the flags (NX, XX, GT, LT,
/// CH, INCR) are refused.
fn zadd(store: &Store<'_>, args: &[Vec<u8>], out: &mut Vec<u8>) -> Result<(), StoreError> {
    if args.len() < 4 || !args.len().is_multiple_of(2) {
        if args.get(2).is_some_and(|a| float_arg(a).is_none()) {
            resp::error(
                out,
                "kvd does not support ZADD flags (NX, XX, GT, LT, CH, INCR)",
            );
        } else {
            resp::error(out, "wrong number of arguments for 'zadd' command");
        }
        return Ok(());
    }
    let mut pairs = Vec::new();
    for sm in args[2..].chunks(2) {
        match float_arg(&sm[0]) {
            Some(s) => pairs.push((s, &sm[1])),
            None => {
                resp::error(
                    out,
                    "value is not a valid float (kvd does not support ZADD flags)",
                );
                return Ok(());
            }
        }
    }
    let mut n = 0;
    for (s, m) in pairs {
        n += i64::from(store.add_member(&args[1], Kind::Zset, m, &s.to_le_bytes())?);
    }
    resp::integer(out, n);
    Ok(())
}

/// The fewest arguments (command included) each command takes.
fn min_args(cmd: &[u8]) -> Option<usize> {
    Some(match cmd {
        b"PING" | b"DBSIZE" | b"INFO" => 1,
        b"GET" | b"INCR" | b"DEL" | b"LLEN" | b"SCARD" | b"SMEMBERS" | b"HLEN" | b"HGETALL"
        | b"ZCARD" | b"LPOP" | b"RPOP" | b"SPOP" | b"ZPOPMIN" | b"MGET" => 2,
        b"SET" | b"MSET" | b"LPUSH" | b"RPUSH" | b"SADD" | b"SREM" | b"SISMEMBER" | b"HGET"
        | b"HDEL" | b"ZSCORE" | b"CONFIG" | b"DEBUG" => 3,
        b"LRANGE" => 4,
        b"HSET" | b"HMSET" | b"ZADD" => 4,
        b"COMMAND" | b"CLIENT" => 1,
        _ => return None,
    })
}

/// Run one request and append its reply.
pub fn execute(store: &Store<'_>, args: &[Vec<u8>], out: &mut Vec<u8>, counters: &Counters) {
    let paused = POSTCOPY_PAUSED.load(Ordering::Acquire);
    execute_with(store, args, out, counters, paused);
}

/// [`execute`] with post-copy paused and `paused` pages missing (0: not
/// paused). Paused, every request that would touch the store is refused
/// with an error saying why (it could block the loop on a missing page);
/// PING and INFO answer.
pub fn execute_with(
    store: &Store<'_>,
    args: &[Vec<u8>],
    out: &mut Vec<u8>,
    counters: &Counters,
    paused: u64,
) {
    let cmd = args[0].to_ascii_uppercase();
    if paused > 0 && !matches!(cmd.as_slice(), b"PING" | b"INFO") {
        return resp::error(
            out,
            &format!(
                "post-copy paused: the source was lost with {paused} pages still missing; request refused"
            ),
        );
    }
    let Some(min) = min_args(&cmd) else {
        return resp::error(
            out,
            &format!(
                "unknown command '{}' (kvd answers {COMMANDS})",
                String::from_utf8_lossy(&args[0])
            ),
        );
    };
    if args.len() < min {
        return resp::error(
            out,
            &format!(
                "wrong number of arguments for '{}' command",
                String::from_utf8_lossy(&args[0])
            ),
        );
    }
    match cmd.as_slice() {
        b"PING" => match args.get(1) {
            Some(m) => resp::bulk(out, Some(m)),
            None => resp::simple(out, "PONG"),
        },
        b"GET" => match store.get(&args[1]) {
            Ok(v) => resp::bulk(out, v.as_deref()),
            Err(e) => store_error(out, e),
        },
        b"MGET" => {
            let values: Vec<Option<Vec<u8>>> = args[1..]
                .iter()
                .map(|k| store.get(k).ok().flatten())
                .collect();
            out.extend_from_slice(format!("*{}\r\n", values.len()).as_bytes());
            for v in values {
                resp::bulk(out, v.as_deref());
            }
        }
        b"SET" => set(store, args, out),
        b"MSET" if args.len() % 2 == 1 => {
            for kv in args[1..].chunks(2) {
                if let Err(e) = store.set(&kv[0], &kv[1]) {
                    return store_error(out, e);
                }
            }
            resp::simple(out, "OK");
        }
        b"MSET" => resp::error(out, "wrong number of arguments for 'mset' command"),
        b"DEL" => {
            let n = args[1..].iter().filter(|k| store.del(k)).count();
            resp::integer(out, n as i64);
        }
        b"INCR" => match store.incr(&args[1]) {
            Ok(n) => resp::integer(out, n),
            Err(e) => store_error(out, e),
        },
        b"DBSIZE" => resp::integer(out, store.len() as i64),
        b"INFO" => {
            // Paused: the key count could sit on a missing page.
            let keyspace = match paused {
                0 => format!("# Keyspace\r\ndb0:keys={}\r\n", store.len()),
                _ => String::new(),
            };
            let info = format!(
                "# Server\r\nkvd_version:{}\r\nprocess_id:{}\r\n# Clients\r\nconnected_clients:{}\r\n# Stats\r\ntotal_commands_processed:{}\r\npostcopy_paused:{}\r\npostcopy_missing_pages:{paused}\r\n{keyspace}",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                counters.clients.load(Ordering::Relaxed),
                counters.requests.load(Ordering::Relaxed),
                u8::from(paused > 0),
            );
            resp::bulk(out, Some(info.as_bytes()));
        }
        b"DEBUG" if args[1].eq_ignore_ascii_case(b"POPULATE") => {
            let n = std::str::from_utf8(&args[2])
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            let size = args
                .get(4)
                .and_then(|s| std::str::from_utf8(s).ok()?.parse::<usize>().ok());
            match n {
                Some(n) => match store.populate(n, size.unwrap_or(100)) {
                    Ok(()) => resp::simple(out, "OK"),
                    Err(e) => store_error(out, e),
                },
                None => resp::error(out, "value is not an integer or out of range"),
            }
        }
        b"DEBUG" => resp::error(out, "kvd answers DEBUG POPULATE only"),
        b"CONFIG" => config(args, out),
        // Clients probe these at start-up (redis-cli, redis-benchmark).
        b"COMMAND" | b"CLIENT" => out.extend_from_slice(b"*0\r\n"),
        b"LPUSH" | b"RPUSH" | b"LPOP" | b"RPOP" | b"LLEN" | b"LRANGE" => {
            if let Err(e) = list(store, &cmd, args, out) {
                store_error(out, e);
            }
        }
        _ => {
            if let Err(e) = members(store, &cmd, args, out) {
                store_error(out, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_core::model::RegionId;
    use lmig_mem::RegionOptions;

    fn run(store: &Store<'_>, line: &str) -> String {
        let args: Vec<Vec<u8>> = line.split(' ').map(|a| a.as_bytes().to_vec()).collect();
        let mut out = Vec::new();
        execute_with(store, &args, &mut out, &Counters::default(), 0);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answers_as_redis_does_for_what_redis_benchmark_sends() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let s = Store::format(&region);
        assert_eq!(run(&s, "SET k v NX"), "+OK\r\n");
        assert_eq!(run(&s, "SET k w NX"), "$-1\r\n");
        assert_eq!(run(&s, "SET k w XX"), "+OK\r\n");
        assert_eq!(run(&s, "SET n w XX"), "$-1\r\n");
        assert!(run(&s, "SET k v EX 10").starts_with("-ERR kvd keeps no expiry"));
        assert_eq!(run(&s, "MSET a 1 b 2"), "+OK\r\n");
        assert_eq!(
            run(&s, "MGET a b zz"),
            "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n"
        );
        assert_eq!(run(&s, "LPUSH l x y"), ":2\r\n");
        assert_eq!(run(&s, "RPUSH l z"), ":3\r\n");
        assert_eq!(run(&s, "LRANGE l 0 1"), "*2\r\n$1\r\ny\r\n$1\r\nx\r\n");
        assert_eq!(run(&s, "LPOP l"), "$1\r\ny\r\n");
        assert_eq!(run(&s, "RPOP l"), "$1\r\nz\r\n");
        assert!(run(&s, "GET l").starts_with("-WRONGTYPE"));
        assert!(run(&s, "LPUSH k x").starts_with("-WRONGTYPE"));
        assert_eq!(run(&s, "SADD s m m2"), ":2\r\n");
        assert_eq!(run(&s, "SADD s m"), ":0\r\n");
        assert_eq!(run(&s, "SCARD s"), ":2\r\n");
        assert_eq!(run(&s, "SPOP s 5").matches("$").count(), 2);
        assert_eq!(run(&s, "SPOP s"), "$-1\r\n");
        assert_eq!(run(&s, "HSET h f 1 g 2"), ":2\r\n");
        assert_eq!(run(&s, "HGET h g"), "$1\r\n2\r\n");
        assert_eq!(run(&s, "ZADD z 2 b 1 a"), ":2\r\n");
        assert_eq!(run(&s, "ZPOPMIN z"), "*2\r\n$1\r\na\r\n$1\r\n1\r\n");
        assert!(run(&s, "ZADD z NX 1 a").starts_with("-ERR kvd does not support ZADD flags"));
        assert_eq!(run(&s, "CONFIG GET save"), "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
        assert_eq!(run(&s, "CONFIG GET maxmemory"), "*0\r\n");
        assert!(run(&s, "XADD x * a b").starts_with("-ERR unknown command 'XADD'"));
        assert!(run(&s, "HSET h f").starts_with("-ERR wrong number"));
        assert_eq!(run(&s, "DBSIZE"), ":6\r\n", "k a b l h z and nothing of s");
        assert_eq!(run(&s, "DEL l h z"), ":3\r\n");
        assert_eq!(s.used(), 3, "k a b: no item left behind");
    }

    /// While post-copy is paused (its source lost), requests that read or
    /// write the store get a clear error instead of blocking on a missing
    /// page; PING and INFO answer, INFO says so.
    #[test]
    fn paused_postcopy_refuses_store_requests_and_says_so() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        store.set(b"k", b"v").unwrap();
        let counters = Counters::default();
        let paused = std::cell::Cell::new(7);
        let run = |args: &[&[u8]]| {
            let mut out = Vec::new();
            let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
            execute_with(&store, &args, &mut out, &counters, paused.get());
            String::from_utf8(out).unwrap()
        };
        for req in [
            &[&b"GET"[..], b"k"][..],
            &[b"SET", b"k", b"w"],
            &[b"DBSIZE"],
        ] {
            let reply = run(req);
            assert!(
                reply.starts_with("-ERR post-copy paused") && reply.contains("7 pages"),
                "{reply}"
            );
        }
        assert_eq!(run(&[b"PING"]), "+PONG\r\n");
        let info = run(&[b"INFO"]);
        assert!(info.contains("postcopy_paused:1"), "{info}");
        assert!(info.contains("postcopy_missing_pages:7"), "{info}");
        assert!(!info.contains("db0:keys"), "{info}");
        paused.set(0);
        assert_eq!(run(&[b"GET", b"k"]), "$1\r\nv\r\n", "the SET was refused");
    }
}
