//! kvd's key-value store, kept entirely inside one lmig region so that it
//! moves with the region's pages: an open-addressing hash table of fixed-size
//! slots plus a scratch area a background writer dirties at a chosen rate.
//!
//! ```text
//! page 0        header: magic, slot count, item count, scratch offset
//! pages 1..     slots of 256 bytes: state, key length, value length, key (64), value (184)
//! last 1/8      scratch area (dirtied by --dirty-mbps, never read as data)
//! ```

use lmig_mem::Region;

/// Bytes per slot.
pub const SLOT: usize = 256;
/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VALUE: usize = SLOT - 8 - MAX_KEY;

const MAGIC: u64 = u64::from_le_bytes(*b"KVD1\0\0\0\0");
const HEADER: usize = 4096;
const EMPTY: u8 = 0;
const USED: u8 = 1;
const TOMBSTONE: u8 = 2;

/// Why a store operation failed (the reply is an error; the store is unchanged).
#[derive(Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Key longer than [`MAX_KEY`].
    KeyTooLong,
    /// Value longer than [`MAX_VALUE`].
    ValueTooLong,
    /// No free slot left.
    Full,
    /// INCR on a value that is not an integer.
    NotInteger,
    /// The region does not hold a kvd store (bad magic).
    NotAStore,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KeyTooLong => "key too long (kvd keeps keys up to 64 bytes)",
            Self::ValueTooLong => "value too long (kvd keeps values up to 184 bytes)",
            Self::Full => "store is full",
            Self::NotInteger => "value is not an integer or out of range",
            Self::NotAStore => "region does not hold a kvd store",
        })
    }
}

impl std::error::Error for StoreError {}

/// The store, borrowing its region.
pub struct Store<'r> {
    region: &'r Region,
    slots: u64,
    scratch: usize,
}

fn hash(key: &[u8]) -> u64 {
    // FNV-1a: stable across hosts and runs (the table lives in migrated memory).
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl<'r> Store<'r> {
    /// Where the scratch area of a store in a region of `len` bytes begins.
    fn scratch_start(len: usize) -> usize {
        (len - len / 8) / 4096 * 4096
    }

    /// How many keys a store in a region of `len` bytes can hold.
    pub fn capacity_of(len: usize) -> u64 {
        ((Self::scratch_start(len) - HEADER) / SLOT) as u64
    }

    /// Format `region` as an empty store.
    pub fn format(region: &'r Region) -> Self {
        let scratch = Self::scratch_start(region.len());
        let slots = Self::capacity_of(region.len());
        let mut header = [0u8; 32];
        header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&slots.to_le_bytes());
        header[16..24].copy_from_slice(&0u64.to_le_bytes());
        header[24..32].copy_from_slice(&(scratch as u64).to_le_bytes());
        region
            .write_at(0, &header)
            .expect("header inside the region");
        Self {
            region,
            slots,
            scratch,
        }
    }

    /// Open the store a region already holds (after a migration).
    pub fn open(region: &'r Region) -> Result<Self, StoreError> {
        let mut header = [0u8; 32];
        region
            .read_at(0, &mut header)
            .map_err(|_| StoreError::NotAStore)?;
        let word = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
        if word(0) != MAGIC {
            return Err(StoreError::NotAStore);
        }
        Ok(Self {
            region,
            slots: word(8),
            scratch: word(24) as usize,
        })
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        let mut b = [0u8; 8];
        self.region.read_at(16, &mut b).expect("header");
        u64::from_le_bytes(b)
    }

    /// No keys?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slot capacity.
    pub fn capacity(&self) -> u64 {
        self.slots
    }

    fn set_len(&self, n: u64) {
        self.region.write_at(16, &n.to_le_bytes()).expect("header");
    }

    fn slot_off(&self, i: u64) -> usize {
        HEADER + i as usize * SLOT
    }

    fn read_slot(&self, i: u64) -> [u8; SLOT] {
        let mut s = [0u8; SLOT];
        self.region
            .read_at(self.slot_off(i), &mut s)
            .expect("slot inside the region");
        s
    }

    /// Find `key`: `Ok(slot)` if present, `Err(first free slot)` if not.
    fn find(&self, key: &[u8]) -> Result<u64, Option<u64>> {
        let mut i = hash(key) % self.slots;
        let mut free = None;
        for _ in 0..self.slots {
            let s = self.read_slot(i);
            match s[0] {
                EMPTY => return Err(free.or(Some(i))),
                USED if usize::from(s[1]) == key.len() && &s[8..8 + key.len()] == key => {
                    return Ok(i);
                }
                TOMBSTONE if free.is_none() => free = Some(i),
                _ => {}
            }
            i = (i + 1) % self.slots;
        }
        Err(free)
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let i = self.find(key).ok()?;
        let s = self.read_slot(i);
        let vlen = u16::from_le_bytes([s[2], s[3]]) as usize;
        Some(s[8 + MAX_KEY..8 + MAX_KEY + vlen].to_vec())
    }

    /// Set `key` to `value`.
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if key.len() > MAX_KEY {
            return Err(StoreError::KeyTooLong);
        }
        if value.len() > MAX_VALUE {
            return Err(StoreError::ValueTooLong);
        }
        let (i, new) = match self.find(key) {
            Ok(i) => (i, false),
            Err(Some(i)) => (i, true),
            Err(None) => return Err(StoreError::Full),
        };
        let mut s = [0u8; SLOT];
        s[0] = USED;
        s[1] = key.len() as u8;
        s[2..4].copy_from_slice(&(value.len() as u16).to_le_bytes());
        s[8..8 + key.len()].copy_from_slice(key);
        s[8 + MAX_KEY..8 + MAX_KEY + value.len()].copy_from_slice(value);
        self.region
            .write_at(self.slot_off(i), &s)
            .expect("slot inside the region");
        if new {
            self.set_len(self.len() + 1);
        }
        Ok(())
    }

    /// Delete `key`; true if it existed.
    pub fn del(&self, key: &[u8]) -> bool {
        match self.find(key) {
            Ok(i) => {
                self.region
                    .write_at(self.slot_off(i), &[TOMBSTONE])
                    .expect("slot");
                self.set_len(self.len() - 1);
                true
            }
            Err(_) => false,
        }
    }

    /// Increment the integer at `key` (0 if absent) and return the new value.
    pub fn incr(&self, key: &[u8]) -> Result<i64, StoreError> {
        let n = match self.get(key) {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or(StoreError::NotInteger)?,
        };
        let n = n.checked_add(1).ok_or(StoreError::NotInteger)?;
        self.set(key, n.to_string().as_bytes())?;
        Ok(n)
    }

    /// Write 8 bytes into page `page` of the scratch area (modulo its size):
    /// what the background dirtier does.
    pub fn dirty_scratch_page(&self, page: u64, stamp: u64) {
        let pages = ((self.region.len() - self.scratch) / 4096) as u64;
        if pages == 0 {
            return;
        }
        let off = self.scratch + (page % pages) as usize * 4096;
        let _ = self.region.write_at(off, &stamp.to_le_bytes());
    }

    /// Fill the store with `count` keys `key:<n>` (values of `value_len`
    /// bytes): Redis's `DEBUG POPULATE`.
    pub fn populate(&self, count: u64, value_len: usize) -> Result<(), StoreError> {
        let value_len = value_len.min(MAX_VALUE);
        for n in 0..count {
            let key = format!("key:{n}");
            let mut value = format!("value:{n}:").into_bytes();
            value.resize(value_len, b'x');
            self.set(key.as_bytes(), &value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_core::model::RegionId;
    use lmig_mem::RegionOptions;

    #[test]
    fn set_get_del_incr() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        assert_eq!(store.get(b"a"), None);
        store.set(b"a", b"1").unwrap();
        assert_eq!(store.get(b"a"), Some(b"1".to_vec()));
        assert_eq!(store.incr(b"a").unwrap(), 2);
        assert_eq!(store.incr(b"b").unwrap(), 1);
        assert_eq!(store.len(), 2);
        assert!(store.del(b"a"));
        assert!(!store.del(b"a"));
        assert_eq!(store.len(), 1);
        store.set(b"c", b"x").unwrap();
        assert_eq!(store.incr(b"c"), Err(StoreError::NotInteger));
        assert_eq!(store.set(&[b'k'; 65], b"v"), Err(StoreError::KeyTooLong));
        let reopened = Store::open(&region).unwrap();
        assert_eq!(reopened.get(b"b"), Some(b"1".to_vec()));
        store.populate(1000, 100).unwrap();
        assert_eq!(store.get(b"key:999").unwrap().len(), 100);
    }

    /// While post-copy is paused (its source lost), requests that read or
    /// write the store get a clear error instead of blocking on a missing
    /// page; PING and INFO answer, INFO says so.
    #[test]
    fn paused_postcopy_refuses_store_requests_and_says_so() {
        use crate::kvd::server::{Counters, POSTCOPY_PAUSED, execute};
        use std::sync::atomic::Ordering;
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        store.set(b"k", b"v").unwrap();
        let counters = Counters::default();
        let run = |args: &[&[u8]]| {
            let mut out = Vec::new();
            let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
            execute(&store, &args, &mut out, &counters);
            String::from_utf8(out).unwrap()
        };
        POSTCOPY_PAUSED.store(7, Ordering::Release);
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
        POSTCOPY_PAUSED.store(0, Ordering::Release);
        assert_eq!(run(&[b"GET", b"k"]), "$1\r\nv\r\n", "the SET was refused");
    }
}
