//! kvd's key-value store, kept entirely inside one lmig region so that it
//! moves with the region's pages: an open-addressing hash table of fixed-size
//! slots plus a scratch area a background writer dirties at a chosen rate.
//!
//! ```text
//! page 0        header: magic, slot count, slots used, scratch offset, keys
//! pages 1..     slots of 256 bytes: state, key length, value length (2), kind,
//!               3 spare, key (64), value (184)
//! last 1/8      scratch area (dirtied by --dirty-mbps, never read as data)
//! ```
//!
//! Slot pages whose slots were all never used hold nothing kvd needs: the
//! store declares them free ([`Region::declare_free`], when formatted and
//! after `populate`), so a migration never sends them, and declares a page
//! in use again ([`Region::declare_used`]) before a new key first lands in
//! it. Pages with a tombstone stay in use: a lookup's probe runs past it.
//!
//! A slot's kind says what it holds: a string, the head of a list, set, hash
//! or sorted set (the keys clients see), or an item of one of those
//! ([`Kind::Item`], found only by the collection's code, never by a client's
//! key: `collections.rs`).

use lmig_mem::Region;

/// Bytes per slot.
pub const SLOT: usize = 256;
/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VALUE: usize = SLOT - 8 - MAX_KEY;

const MAGIC: u64 = u64::from_le_bytes(*b"KVD2\0\0\0\0");
const HEADER: usize = 4096;
const EMPTY: u8 = 0;
const USED: u8 = 1;
const TOMBSTONE: u8 = 2;
/// Header offsets: slots in use, keys clients see.
const USED_AT: usize = 16;
const KEYS_AT: usize = 32;

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
    /// The key holds another kind of value (Redis's `WRONGTYPE`).
    WrongType,
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A string value.
    String = 0,
    /// The head of a list.
    List = 1,
    /// The head of a set.
    Set = 2,
    /// The head of a hash.
    Hash = 3,
    /// The head of a sorted set.
    Zset = 4,
    /// An element of a collection (its key says whose).
    Item = 0x80,
}

impl Kind {
    fn from_u8(b: u8) -> Self {
        match b {
            1 => Self::List,
            2 => Self::Set,
            3 => Self::Hash,
            4 => Self::Zset,
            0x80 => Self::Item,
            _ => Self::String,
        }
    }

    /// Kinds a client's key can name.
    fn visible(self) -> bool {
        self != Self::Item
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KeyTooLong => "key too long (kvd keeps keys up to 64 bytes)",
            Self::ValueTooLong => "value too long (kvd keeps values up to 184 bytes)",
            Self::Full => "store is full",
            Self::NotInteger => "value is not an integer or out of range",
            Self::NotAStore => "region does not hold a kvd store",
            Self::WrongType => "WRONGTYPE Operation against a key holding the wrong kind of value",
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
        let mut header = [0u8; 40];
        header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&slots.to_le_bytes());
        header[24..32].copy_from_slice(&(scratch as u64).to_le_bytes());
        region
            .write_at(0, &header)
            .expect("header inside the region");
        // Every slot page is unused: free until a key lands in it.
        if scratch > HEADER {
            let _ = region.declare_free(HEADER, scratch - HEADER);
        }
        Self {
            region,
            slots,
            scratch,
        }
    }

    /// Declare free every slot page whose slots were all never used (a
    /// page with a tombstone stays in use); returns the pages declared.
    pub fn declare_unused(&self) -> lmig_mem::Result<u64> {
        let mut page = [0u8; 4096];
        let (mut run_start, mut declared) = (None, 0u64);
        let mut end_run = |start: Option<usize>, at: usize| -> lmig_mem::Result<()> {
            if let Some(from) = start {
                self.region.declare_free(from, at - from)?;
                declared += ((at - from) / 4096) as u64;
            }
            Ok(())
        };
        let mut at = HEADER;
        while at + 4096 <= self.scratch {
            self.region.read_at(at, &mut page)?;
            let unused = page.chunks_exact(SLOT).all(|s| s[0] == EMPTY);
            match (unused, run_start) {
                (true, None) => run_start = Some(at),
                (false, Some(_)) => end_run(run_start.take(), at)?,
                _ => {}
            }
            at += 4096;
        }
        end_run(run_start, at)?;
        Ok(declared)
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

    fn header_word(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        self.region.read_at(at, &mut b).expect("header");
        u64::from_le_bytes(b)
    }

    fn set_header_word(&self, at: usize, v: u64) {
        self.region.write_at(at, &v.to_le_bytes()).expect("header");
    }

    /// Number of keys (strings and collections; a collection's elements
    /// take slots of their own but count once).
    pub fn len(&self) -> u64 {
        self.header_word(KEYS_AT)
    }

    /// Slots in use.
    pub fn used(&self) -> u64 {
        self.header_word(USED_AT)
    }

    /// No keys?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slot capacity.
    pub fn capacity(&self) -> u64 {
        self.slots
    }

    /// Byte offset of the slot where the search for `key` begins (its home
    /// slot): what a request on `key` reads first (kvd's post-copy parking).
    pub fn home_offset(&self, key: &[u8]) -> usize {
        self.slot_off(hash(key) % self.slots)
    }

    /// Byte offset just past the last slot.
    pub fn slots_end(&self) -> usize {
        self.slot_off(self.slots)
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

    /// Find `key` among the slots whose kind is visible (`items` false) or
    /// an item (`items` true): `Ok((slot, kind))` if present, `Err(first
    /// free slot)` if not.
    fn find(&self, key: &[u8], items: bool) -> Result<(u64, Kind), Option<u64>> {
        let mut i = hash(key) % self.slots;
        let mut free = None;
        for _ in 0..self.slots {
            let s = self.read_slot(i);
            match s[0] {
                EMPTY => return Err(free.or(Some(i))),
                USED if usize::from(s[1]) == key.len() && &s[8..8 + key.len()] == key => {
                    let kind = Kind::from_u8(s[4]);
                    if kind.visible() != items {
                        return Ok((i, kind));
                    }
                }
                TOMBSTONE if free.is_none() => free = Some(i),
                _ => {}
            }
            i = (i + 1) % self.slots;
        }
        Err(free)
    }

    /// What `key` holds, if anything.
    pub fn kind_of(&self, key: &[u8]) -> Option<Kind> {
        self.find(key, false).ok().map(|(_, k)| k)
    }

    fn value_of(&self, slot: u64) -> Vec<u8> {
        let s = self.read_slot(slot);
        let vlen = u16::from_le_bytes([s[2], s[3]]) as usize;
        s[8 + MAX_KEY..8 + MAX_KEY + vlen].to_vec()
    }

    /// The value of `key` and its kind.
    pub(crate) fn get_kind(&self, key: &[u8], items: bool) -> Option<(Kind, Vec<u8>)> {
        let (i, kind) = self.find(key, items).ok()?;
        Some((kind, self.value_of(i)))
    }

    /// The string at `key` (`WrongType` if it holds a collection).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_kind(key, false) {
            None => Ok(None),
            Some((Kind::String, v)) => Ok(Some(v)),
            Some(_) => Err(StoreError::WrongType),
        }
    }

    /// Write `key` = `value` of `kind` (replacing whatever key held, of
    /// any kind of its class); true if the key is new.
    pub(crate) fn put(&self, key: &[u8], kind: Kind, value: &[u8]) -> Result<bool, StoreError> {
        if key.len() > MAX_KEY {
            return Err(StoreError::KeyTooLong);
        }
        if value.len() > MAX_VALUE {
            return Err(StoreError::ValueTooLong);
        }
        let (i, new) = match self.find(key, kind == Kind::Item) {
            Ok((i, _)) => (i, false),
            Err(Some(i)) => (i, true),
            Err(None) => return Err(StoreError::Full),
        };
        if new {
            // The slot's page may be declared free (never used): in use from now.
            let page = self.slot_off(i) / 4096 * 4096;
            let _ = self.region.declare_used(page, 4096);
        }
        let mut s = [0u8; SLOT];
        s[0] = USED;
        s[1] = key.len() as u8;
        s[2..4].copy_from_slice(&(value.len() as u16).to_le_bytes());
        s[4] = kind as u8;
        s[8..8 + key.len()].copy_from_slice(key);
        s[8 + MAX_KEY..8 + MAX_KEY + value.len()].copy_from_slice(value);
        // A write that changes nothing is not made: the page stays clean, so
        // a migration has nothing to send again for it (redis-benchmark's
        // SET rewrites the same value over and over: every such write would
        // dirty a random page of the table, the bulk of what a pre-copy
        // round and the freeze then resend).
        if new || self.read_slot(i) != s {
            self.region
                .write_at(self.slot_off(i), &s)
                .expect("slot inside the region");
        }
        if new {
            self.set_header_word(USED_AT, self.used() + 1);
            if kind.visible() {
                self.set_header_word(KEYS_AT, self.len() + 1);
            }
        }
        Ok(new)
    }

    /// Remove `key` from its class; what it held, if it existed.
    pub(crate) fn remove(&self, key: &[u8], items: bool) -> Option<Kind> {
        let (i, kind) = self.find(key, items).ok()?;
        self.region
            .write_at(self.slot_off(i), &[TOMBSTONE])
            .expect("slot");
        self.set_header_word(USED_AT, self.used() - 1);
        if kind.visible() {
            self.set_header_word(KEYS_AT, self.len() - 1);
        }
        Some(kind)
    }

    /// Set `key` to the string `value` (whatever it held before, as
    /// Redis's `SET`).
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if let Some(kind) = self.kind_of(key).filter(|k| *k != Kind::String) {
            self.del_kind(key, kind);
        }
        self.put(key, Kind::String, value).map(|_| ())
    }

    /// Delete `key` (a string or a whole collection); true if it existed.
    pub fn del(&self, key: &[u8]) -> bool {
        match self.kind_of(key) {
            Some(kind) => {
                self.del_kind(key, kind);
                true
            }
            None => false,
        }
    }

    /// Increment the integer at `key` (0 if absent) and return the new value.
    pub fn incr(&self, key: &[u8]) -> Result<i64, StoreError> {
        let n = match self.get(key)? {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or(StoreError::NotInteger)?,
        };
        let n = n.checked_add(1).ok_or(StoreError::NotInteger)?;
        self.put(key, Kind::String, n.to_string().as_bytes())?;
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
        // What the keys left unused goes back to being free.
        let _ = self.declare_unused();
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
        assert_eq!(store.get(b"a"), Ok(None));
        store.set(b"a", b"1").unwrap();
        assert_eq!(store.get(b"a"), Ok(Some(b"1".to_vec())));
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
        assert_eq!(reopened.get(b"b"), Ok(Some(b"1".to_vec())));
        store.populate(1000, 100).unwrap();
        assert_eq!(store.get(b"key:999").unwrap().unwrap().len(), 100);
    }

    /// Pages written between two collections of a real dirty tracker.
    fn dirtied(tracker: &mut lmig_mem::AutoTracker, set: &lmig_mem::RegionSet) -> u64 {
        use lmig_core::DirtyTracker;
        let mut dirty = lmig_core::model::RegionPages::empty(set.layout());
        tracker.collect(&mut dirty).unwrap();
        dirty.count()
    }

    #[test]
    fn a_write_that_changes_nothing_leaves_the_page_clean() {
        use lmig_core::DirtyTracker;
        if !lmig_core::testing::privileged(
            "a_write_that_changes_nothing_leaves_the_page_clean",
            "userfaultfd write-protect or soft-dirty tracking",
        ) {
            return;
        }
        let region = RegionOptions::new(RegionId(1), 4 << 20)
            .populate(true)
            .map()
            .unwrap();
        let set = lmig_mem::RegionSet::new([region]).unwrap();
        let store = Store::format(set.get(RegionId(1)).unwrap());
        let keys: Vec<String> = (0..200).map(|n| format!("key:{n:012}")).collect();
        for k in &keys {
            store.set(k.as_bytes(), b"xxx").unwrap();
        }
        let (mut tracker, _) = lmig_mem::best_tracker(&set).unwrap();
        tracker.start().unwrap();
        dirtied(&mut tracker, &set);
        // redis-benchmark's SET: the same value again, many times.
        for _ in 0..3 {
            for k in &keys {
                store.set(k.as_bytes(), b"xxx").unwrap();
            }
        }
        assert_eq!(
            dirtied(&mut tracker, &set),
            0,
            "unchanged values dirtied pages"
        );
        // A changed value, a shorter one, a new key and an INCR are written.
        store.set(keys[0].as_bytes(), b"xxy").unwrap();
        assert_eq!(dirtied(&mut tracker, &set), 1);
        store.set(keys[1].as_bytes(), b"xx").unwrap();
        assert!(dirtied(&mut tracker, &set) >= 1);
        store.set(b"another", b"xxx").unwrap();
        assert!(dirtied(&mut tracker, &set) >= 1);
        store.set(b"n", b"1").unwrap();
        dirtied(&mut tracker, &set);
        assert_eq!(store.incr(b"n").unwrap(), 2);
        assert!(dirtied(&mut tracker, &set) >= 1);
        tracker.stop().unwrap();
        assert_eq!(store.get(keys[0].as_bytes()), Ok(Some(b"xxy".to_vec())));
        assert_eq!(store.get(keys[1].as_bytes()), Ok(Some(b"xx".to_vec())));
        assert_eq!(store.get(keys[2].as_bytes()), Ok(Some(b"xxx".to_vec())));
        assert_eq!(store.len(), 202);
    }

    #[test]
    fn unused_slot_pages_are_declared_free_and_keys_land_safely() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        let slot_pages = (store.scratch - HEADER) as u64 / 4096;
        let free = |r: &Region| {
            let mut s = lmig_core::model::PageSet::new(r.pages());
            r.free_pages(&mut s).unwrap();
            s
        };
        assert_eq!(
            free(&region).count(),
            slot_pages,
            "a fresh store is all free"
        );
        store.populate(50, 100).unwrap();
        let after = free(&region);
        // Each key's page is in use, and only pages without keys are free.
        for n in 0..50 {
            let key = format!("key:{n}");
            let (i, _) = store.find(key.as_bytes(), false).unwrap();
            assert!(!after.contains((store.slot_off(i) / 4096) as u64), "{key}");
        }
        assert!(after.count() >= slot_pages - 50 && after.count() < slot_pages);
        assert_eq!(store.declare_unused().unwrap(), after.count());
        // A page with a tombstone stays in use: the probe runs past it.
        let (i, _) = store.find(b"key:7", false).unwrap();
        let page = (store.slot_off(i) / 4096) as u64;
        assert!(store.del(b"key:7"));
        store.declare_unused().unwrap();
        assert!(!free(&region).contains(page));
        assert_eq!(store.get(b"key:8").unwrap().unwrap().len(), 100);
    }
}
