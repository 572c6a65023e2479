//! Lists, sets, hashes and sorted sets over the store's slots, so that
//! Redis clients' data types live in the migrated region too.
//!
//! A collection is a head slot under its key (kind [`Kind::List`],
//! [`Kind::Set`], [`Kind::Hash`] or [`Kind::Zset`]) plus one item slot per
//! element ([`Kind::Item`], a class of slots no client key can name). An
//! item's key is `tag, name length, name, suffix`, so items of different
//! collections never meet:
//!
//! * a list's head holds `head` and `tail` (i64): its elements sit at
//!   indices `head..tail`, item `b'L'` + index (big-endian);
//! * a set, hash or sorted set's head holds its member count `n`; member
//!   `m` is item `b'M'` + `m` (its index, then its payload: nothing, the
//!   hash field's value, the score), and index `i < n` is item `b'I'` + `i`
//!   (the member), so a member is found by name and the set is walked, and
//!   popped, by index.
//!
//! A collection's name is at most [`MAX_NAME`] bytes (what the item keys
//! leave of [`MAX_KEY`]); `ZPOPMIN` walks the set (kvd keeps no order).

use crate::kvd::store::{Kind, MAX_KEY, Store, StoreError};

/// A member and its payload.
pub type Member = (Vec<u8>, Vec<u8>);

/// Longest collection name.
pub const MAX_NAME: usize = MAX_KEY - 2 - 8;

fn item_key(tag: u8, name: &[u8], suffix: &[u8]) -> Result<Vec<u8>, StoreError> {
    if name.len() > MAX_NAME || 2 + name.len() + suffix.len() > MAX_KEY {
        return Err(StoreError::KeyTooLong);
    }
    let mut k = Vec::with_capacity(2 + name.len() + suffix.len());
    k.push(tag);
    k.push(name.len() as u8);
    k.extend_from_slice(name);
    k.extend_from_slice(suffix);
    Ok(k)
}

fn word(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

/// Which end of a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The head (`LPUSH`, `LPOP`).
    Left,
    /// The tail (`RPUSH`, `RPOP`).
    Right,
}

impl Store<'_> {
    /// The head of collection `name` of `kind`: its value, or `None` if
    /// there is none (`WrongType` if the key holds something else).
    fn head(&self, name: &[u8], kind: Kind) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_kind(name, false) {
            None => Ok(None),
            Some((k, v)) if k == kind => Ok(Some(v)),
            Some(_) => Err(StoreError::WrongType),
        }
    }

    fn item(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get_kind(key, true).map(|(_, v)| v)
    }

    /// Delete collection `key` of `kind` with every item (a string: its slot).
    pub(crate) fn del_kind(&self, key: &[u8], kind: Kind) {
        match kind {
            Kind::List => {
                if let Ok(Some(h)) = self.head(key, Kind::List) {
                    let (head, tail) = (word(&h, 0) as i64, word(&h, 8) as i64);
                    for i in head..tail {
                        if let Ok(k) = item_key(b'L', key, &i.to_be_bytes()) {
                            self.remove(&k, true);
                        }
                    }
                }
            }
            Kind::Set | Kind::Hash | Kind::Zset => {
                let n = self
                    .head(key, kind)
                    .ok()
                    .flatten()
                    .map_or(0, |h| word(&h, 0));
                for i in 0..n {
                    let Ok(ik) = item_key(b'I', key, &i.to_be_bytes()) else {
                        continue;
                    };
                    if let Some(member) = self.item(&ik) {
                        if let Ok(mk) = item_key(b'M', key, &member) {
                            self.remove(&mk, true);
                        }
                    }
                    self.remove(&ik, true);
                }
            }
            Kind::String | Kind::Item => {}
        }
        self.remove(key, false);
    }

    /// `LPUSH` / `RPUSH`: the list's length after.
    pub fn push(&self, name: &[u8], end: End, values: &[Vec<u8>]) -> Result<u64, StoreError> {
        let h = self.head(name, Kind::List)?;
        let (mut head, mut tail) = h.map_or((0, 0), |h| (word(&h, 0) as i64, word(&h, 8) as i64));
        for v in values {
            let at = match end {
                End::Left => head - 1,
                End::Right => tail,
            };
            self.put(&item_key(b'L', name, &at.to_be_bytes())?, Kind::Item, v)?;
            match end {
                End::Left => head = at,
                End::Right => tail = at + 1,
            }
            self.put_list_head(name, head, tail)?;
        }
        Ok((tail - head) as u64)
    }

    fn put_list_head(&self, name: &[u8], head: i64, tail: i64) -> Result<(), StoreError> {
        if head == tail {
            self.remove(name, false);
            return Ok(());
        }
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&head.to_le_bytes());
        v[8..].copy_from_slice(&tail.to_le_bytes());
        self.put(name, Kind::List, &v).map(|_| ())
    }

    /// `LPOP` / `RPOP` of up to `count` elements.
    pub fn pop(&self, name: &[u8], end: End, count: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let Some(h) = self.head(name, Kind::List)? else {
            return Ok(Vec::new());
        };
        let (mut head, mut tail) = (word(&h, 0) as i64, word(&h, 8) as i64);
        let mut out = Vec::new();
        while head < tail && out.len() < count {
            let at = match end {
                End::Left => head,
                End::Right => tail - 1,
            };
            let k = item_key(b'L', name, &at.to_be_bytes())?;
            out.push(self.item(&k).unwrap_or_default());
            self.remove(&k, true);
            match end {
                End::Left => head += 1,
                End::Right => tail -= 1,
            }
        }
        self.put_list_head(name, head, tail)?;
        Ok(out)
    }

    /// `LLEN`.
    pub fn list_len(&self, name: &[u8]) -> Result<u64, StoreError> {
        let h = self.head(name, Kind::List)?;
        Ok(h.map_or(0, |h| (word(&h, 8) as i64 - word(&h, 0) as i64) as u64))
    }

    /// `LRANGE name start stop` (inclusive, negative from the end).
    pub fn range(&self, name: &[u8], start: i64, stop: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let Some(h) = self.head(name, Kind::List)? else {
            return Ok(Vec::new());
        };
        let (head, tail) = (word(&h, 0) as i64, word(&h, 8) as i64);
        let len = tail - head;
        let norm = |i: i64| if i < 0 { len + i } else { i };
        let (from, to) = (norm(start).max(0), norm(stop).min(len - 1));
        let mut out = Vec::new();
        for i in from..=to {
            let k = item_key(b'L', name, &(head + i).to_be_bytes())?;
            out.push(self.item(&k).unwrap_or_default());
        }
        Ok(out)
    }

    /// Add `member` with `payload` to the set, hash or sorted set `name`
    /// (replacing its payload if present); true if it is new.
    pub fn add_member(
        &self,
        name: &[u8],
        kind: Kind,
        member: &[u8],
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        let n = self.head(name, kind)?.map_or(0, |h| word(&h, 0));
        let mk = item_key(b'M', name, member)?;
        let (index, new) = match self.item(&mk) {
            Some(v) => (word(&v, 0), false),
            None => (n, true),
        };
        let mut v = index.to_le_bytes().to_vec();
        v.extend_from_slice(payload);
        self.put(&mk, Kind::Item, &v)?;
        if new {
            self.put(
                &item_key(b'I', name, &index.to_be_bytes())?,
                Kind::Item,
                member,
            )?;
            self.put(name, kind, &(n + 1).to_le_bytes())?;
        }
        Ok(new)
    }

    /// The payload of `member` of `name`, if it is there.
    pub fn member(
        &self,
        name: &[u8],
        kind: Kind,
        member: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if self.head(name, kind)?.is_none() {
            return Ok(None);
        }
        Ok(self
            .item(&item_key(b'M', name, member)?)
            .map(|v| v[8.min(v.len())..].to_vec()))
    }

    /// Members of `name` with their payloads, by index.
    pub fn members(&self, name: &[u8], kind: Kind) -> Result<Vec<Member>, StoreError> {
        let n = self.head(name, kind)?.map_or(0, |h| word(&h, 0));
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let m = self
                .item(&item_key(b'I', name, &i.to_be_bytes())?)
                .unwrap_or_default();
            let p = self.member(name, kind, &m)?.unwrap_or_default();
            out.push((m, p));
        }
        Ok(out)
    }

    /// Remove `member` from `name`; true if it was there. The last member
    /// takes its index, so indices stay `0..n`.
    pub fn remove_member(
        &self,
        name: &[u8],
        kind: Kind,
        member: &[u8],
    ) -> Result<bool, StoreError> {
        let Some(h) = self.head(name, kind)? else {
            return Ok(false);
        };
        let n = word(&h, 0);
        let mk = item_key(b'M', name, member)?;
        let Some(v) = self.item(&mk) else {
            return Ok(false);
        };
        let index = word(&v, 0);
        let last_ik = item_key(b'I', name, &(n - 1).to_be_bytes())?;
        if index != n - 1 {
            let last = self.item(&last_ik).unwrap_or_default();
            let last_mk = item_key(b'M', name, &last)?;
            if let Some(mut lv) = self.item(&last_mk) {
                lv[..8].copy_from_slice(&index.to_le_bytes());
                self.put(&last_mk, Kind::Item, &lv)?;
            }
            self.put(
                &item_key(b'I', name, &index.to_be_bytes())?,
                Kind::Item,
                &last,
            )?;
        }
        self.remove(&last_ik, true);
        self.remove(&mk, true);
        if n == 1 {
            self.remove(name, false);
        } else {
            self.put(name, kind, &(n - 1).to_le_bytes())?;
        }
        Ok(true)
    }

    /// Members of `name`.
    pub fn card(&self, name: &[u8], kind: Kind) -> Result<u64, StoreError> {
        Ok(self.head(name, kind)?.map_or(0, |h| word(&h, 0)))
    }

    /// `SPOP`: up to `count` members, the last by index first (any member
    /// is a valid "random" one).
    pub fn pop_members(&self, name: &[u8], count: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        while out.len() < count {
            let n = self.card(name, Kind::Set)?;
            if n == 0 {
                break;
            }
            let m = self
                .item(&item_key(b'I', name, &(n - 1).to_be_bytes())?)
                .unwrap_or_default();
            self.remove_member(name, Kind::Set, &m)?;
            out.push(m);
        }
        Ok(out)
    }

    /// `ZPOPMIN`: up to `count` members with the lowest scores (ties by
    /// member), with their scores.
    pub fn pop_min(&self, name: &[u8], count: usize) -> Result<Vec<(Vec<u8>, f64)>, StoreError> {
        let mut all: Vec<(Vec<u8>, f64)> = self
            .members(name, Kind::Zset)?
            .into_iter()
            .map(|(m, p)| {
                (
                    m,
                    f64::from_le_bytes(
                        p.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]),
                    ),
                )
            })
            .collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(count);
        for (m, _) in &all {
            self.remove_member(name, Kind::Zset, m)?;
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_core::model::RegionId;
    use lmig_mem::RegionOptions;

    fn v(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn lists_push_pop_and_range_from_both_ends() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        assert_eq!(store.push(b"l", End::Left, &[v("b"), v("a")]).unwrap(), 2);
        assert_eq!(store.push(b"l", End::Right, &[v("c")]).unwrap(), 3);
        assert_eq!(store.range(b"l", 0, -1).unwrap(), [v("a"), v("b"), v("c")]);
        assert_eq!(store.range(b"l", 1, 1).unwrap(), [v("b")]);
        assert_eq!(store.range(b"l", 5, 9).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(store.len(), 1, "a list is one key");
        assert_eq!(store.pop(b"l", End::Right, 1).unwrap(), [v("c")]);
        assert_eq!(store.pop(b"l", End::Left, 5).unwrap(), [v("a"), v("b")]);
        assert_eq!((store.len(), store.used()), (0, 0), "an empty list is gone");
        store.set(b"s", b"x").unwrap();
        assert_eq!(
            store.push(b"s", End::Left, &[v("a")]),
            Err(StoreError::WrongType)
        );
        store.push(b"l2", End::Left, &[v("a")]).unwrap();
        assert_eq!(store.get(b"l2"), Err(StoreError::WrongType));
        assert!(store.del(b"l2"));
        assert_eq!(store.used(), 1, "DEL takes the list's items too");
    }

    #[test]
    fn sets_hashes_and_sorted_sets_keep_members_by_name_and_index() {
        let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
        let store = Store::format(&region);
        for m in ["a", "b", "c"] {
            assert!(
                store
                    .add_member(b"s", Kind::Set, m.as_bytes(), b"")
                    .unwrap()
            );
        }
        assert!(!store.add_member(b"s", Kind::Set, b"b", b"").unwrap());
        assert!(store.remove_member(b"s", Kind::Set, b"a").unwrap());
        let mut left: Vec<_> = store
            .members(b"s", Kind::Set)
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .collect();
        left.sort();
        assert_eq!(left, [v("b"), v("c")]);
        assert_eq!(store.pop_members(b"s", 5).unwrap().len(), 2);
        assert_eq!((store.len(), store.used()), (0, 0));

        assert!(store.add_member(b"h", Kind::Hash, b"f", b"1").unwrap());
        assert!(!store.add_member(b"h", Kind::Hash, b"f", b"2").unwrap());
        assert_eq!(store.member(b"h", Kind::Hash, b"f").unwrap(), Some(v("2")));
        assert_eq!(store.card(b"s", Kind::Hash), Ok(0));
        assert_eq!(store.card(b"h", Kind::Set), Err(StoreError::WrongType));

        for (m, s) in [("x", 3.0f64), ("y", -1.5), ("z", 2.0)] {
            store
                .add_member(b"z", Kind::Zset, m.as_bytes(), &s.to_le_bytes())
                .unwrap();
        }
        assert_eq!(
            store.pop_min(b"z", 2).unwrap(),
            [(v("y"), -1.5), (v("z"), 2.0)]
        );
        assert_eq!(store.card(b"z", Kind::Zset), Ok(1));
        assert!(store.del(b"z") && store.del(b"h"));
        assert_eq!((store.len(), store.used()), (0, 0));
        assert_eq!(
            store.add_member(&[b'n'; MAX_NAME + 1], Kind::Set, b"m", b""),
            Err(StoreError::KeyTooLong)
        );
    }
}
