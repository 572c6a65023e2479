//! The commands tokiod answers, on the store in its region: the subset the
//! scenario's clients and key check use (`PING`, `GET`, `SET`, `DEL`,
//! `INCR`, `DBSIZE`). Anything else is refused with an error naming them.

use crate::kvd::resp;
use crate::kvd::store::{Store, StoreError};

/// Every command tokiod answers.
pub const COMMANDS: &str = "PING GET SET DEL INCR DBSIZE";

fn store_error(out: &mut Vec<u8>, e: &StoreError) {
    match e {
        // Redis's own prefix, not `ERR`.
        StoreError::WrongType => {
            out.extend_from_slice(b"-");
            out.extend_from_slice(e.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        e => resp::error(out, &e.to_string()),
    }
}

/// Run one request (its arguments, at least one) and append its reply.
pub fn execute(store: &Store<'_>, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let Some(name) = args.first() else {
        return;
    };
    let cmd = name.to_ascii_uppercase();
    let arity = match cmd.as_slice() {
        b"PING" => 1..=2,
        b"GET" | b"INCR" => 2..=2,
        b"SET" => 3..=3,
        b"DEL" => 2..=usize::MAX,
        b"DBSIZE" => 1..=1,
        _ => {
            return resp::error(
                out,
                &format!(
                    "unknown command '{}' (tokiod answers {COMMANDS})",
                    String::from_utf8_lossy(name)
                ),
            );
        }
    };
    if !arity.contains(&args.len()) {
        return resp::error(
            out,
            &format!(
                "wrong number of arguments for '{}' command",
                String::from_utf8_lossy(name)
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
            Err(e) => store_error(out, &e),
        },
        b"SET" => match store.set(&args[1], &args[2]) {
            Ok(()) => resp::simple(out, "OK"),
            Err(e) => store_error(out, &e),
        },
        b"DEL" => {
            let n = args[1..].iter().filter(|k| store.del(k)).count();
            resp::integer(out, n as i64);
        }
        b"INCR" => match store.incr(&args[1]) {
            Ok(n) => resp::integer(out, n),
            Err(e) => store_error(out, &e),
        },
        _ => resp::integer(out, store.len() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_core::model::RegionId;
    use lmig_mem::RegionOptions;

    fn run(store: &Store<'_>, words: &[&str]) -> String {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        let mut out = Vec::new();
        execute(store, &args, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answers_as_redis_would() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        assert_eq!(run(&store, &["ping"]), "+PONG\r\n");
        assert_eq!(run(&store, &["PING", "hi"]), "$2\r\nhi\r\n");
        assert_eq!(run(&store, &["INCR", "a"]), ":1\r\n");
        assert_eq!(run(&store, &["incr", "a"]), ":2\r\n");
        assert_eq!(run(&store, &["GET", "a"]), "$1\r\n2\r\n");
        assert_eq!(run(&store, &["GET", "b"]), "$-1\r\n");
        assert_eq!(run(&store, &["SET", "b", "x"]), "+OK\r\n");
        assert!(run(&store, &["INCR", "b"]).starts_with("-ERR"));
        assert_eq!(run(&store, &["DBSIZE"]), ":2\r\n");
        assert_eq!(run(&store, &["DEL", "a", "b", "c"]), ":2\r\n");
        assert_eq!(run(&store, &["DBSIZE"]), ":0\r\n");
        assert!(run(&store, &["GET"]).starts_with("-ERR wrong number"));
        assert!(run(&store, &["FLUSHALL"]).contains("tokiod answers"));
    }
}
