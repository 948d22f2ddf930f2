//! A fixed-capacity LRU of keys over numbered slots, used twice: device slots (`max_loras`)
//! and the host tier (`max_cpu_loras`).
//!
//! Slots are stable: a key keeps its slot until evicted or removed, so the caller can keep
//! weights in preallocated stacked tensors indexed by slot. Pinned keys are never evicted, and
//! `acquire` takes a predicate naming keys the current batch uses, which are never evicted
//! either. A full cache is a `None`, not a panic.

use std::collections::BTreeMap;
use std::hash::Hash;

use crate::FastMap;

/// What `acquire` did to give a key its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired<K> {
    /// The slot now holding the key.
    pub slot: usize,
    /// `true` if the key was already resident (nothing to load).
    pub hit: bool,
    /// The key evicted to make room, if any (its slot is `slot`).
    pub evicted: Option<K>,
}

struct Entry {
    slot: usize,
    last_used: u64,
    pinned: bool,
}

/// LRU over `capacity` slots. Operations are O(log n) in the number of resident keys, plus
/// the number of protected keys skipped while looking for a victim.
pub struct LruCache<K> {
    capacity: usize,
    entries: FastMap<K, Entry>,
    /// last_used -> key, for unpinned keys only: the eviction order.
    order: BTreeMap<u64, K>,
    /// Free slots, highest first so `pop` hands out the lowest.
    free: Vec<usize>,
    clock: u64,
}

impl<K: Hash + Eq + Clone> LruCache<K> {
    /// An empty cache with slots `0..capacity`.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: FastMap::with_capacity_and_hasher(capacity, Default::default()),
            order: BTreeMap::new(),
            free: (0..capacity).rev().collect(),
            clock: 0,
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of resident keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is resident.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The slot of `key`, without marking it used.
    pub fn get(&self, key: &K) -> Option<usize> {
        self.entries.get(key).map(|e| e.slot)
    }

    /// Whether `key` is resident and pinned.
    pub fn is_pinned(&self, key: &K) -> bool {
        self.entries.get(key).is_some_and(|e| e.pinned)
    }

    /// Number of pinned keys.
    pub fn num_pinned(&self) -> usize {
        self.entries.len() - self.order.len()
    }

    /// Marks `key` most recently used; returns its slot.
    pub fn touch(&mut self, key: &K) -> Option<usize> {
        self.clock += 1;
        let entry = self.entries.get_mut(key)?;
        if !entry.pinned {
            self.order.remove(&entry.last_used);
            self.order.insert(self.clock, key.clone());
        }
        entry.last_used = self.clock;
        Some(entry.slot)
    }

    /// Gives `key` a slot: its own if resident (a hit), else a free one, else the least
    /// recently used unpinned key's for which `is_protected` is false. `None` when every
    /// resident key is pinned or protected (or the capacity is 0).
    pub fn acquire(&mut self, key: &K, is_protected: impl Fn(&K) -> bool) -> Option<Acquired<K>> {
        self.acquire_ranked(key, |k| (!is_protected(k)).then_some(usize::MAX))
    }

    /// [`acquire`](Self::acquire) with a choice of victim: `rank` is `None` for a key that
    /// must stay, else how readily it goes: the highest rank is evicted, the least recently
    /// used among equals (`usize::MAX`, the highest, ends the search at the first such key).
    pub fn acquire_ranked(
        &mut self,
        key: &K,
        rank: impl Fn(&K) -> Option<usize>,
    ) -> Option<Acquired<K>> {
        if let Some(slot) = self.touch(key) {
            return Some(Acquired {
                slot,
                hit: true,
                evicted: None,
            });
        }
        let (slot, evicted) = match self.free.pop() {
            Some(slot) => (slot, None),
            None => {
                let mut best: Option<(usize, &K)> = None;
                for k in self.order.values() {
                    match rank(k) {
                        Some(usize::MAX) => {
                            best = Some((usize::MAX, k));
                            break;
                        }
                        Some(r) if best.is_none_or(|(b, _)| r > b) => best = Some((r, k)),
                        _ => {}
                    }
                }
                let victim = best?.1.clone();
                (self.detach(&victim)?, Some(victim))
            }
        };
        self.clock += 1;
        let entry = Entry {
            slot,
            last_used: self.clock,
            pinned: false,
        };
        self.entries.insert(key.clone(), entry);
        self.order.insert(self.clock, key.clone());
        Some(Acquired {
            slot,
            hit: false,
            evicted,
        })
    }

    /// Pins or unpins a resident key; returns `false` if `key` is not resident.
    pub fn set_pinned(&mut self, key: &K, pinned: bool) -> bool {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        if entry.pinned != pinned {
            entry.pinned = pinned;
            if pinned {
                self.order.remove(&entry.last_used);
            } else {
                self.order.insert(entry.last_used, key.clone());
            }
        }
        true
    }

    /// Drops `key` (pinned or not) and frees its slot; returns the slot.
    pub fn remove(&mut self, key: &K) -> Option<usize> {
        let slot = self.detach(key)?;
        self.free.push(slot);
        Some(slot)
    }

    /// Drops `key` without freeing its slot (the caller reuses it).
    fn detach(&mut self, key: &K) -> Option<usize> {
        let entry = self.entries.remove(key)?;
        if !entry.pinned {
            self.order.remove(&entry.last_used);
        }
        Some(entry.slot)
    }

    /// Pinned keys.
    pub fn pinned_keys(&self) -> Vec<K> {
        self.entries
            .iter()
            .filter(|(_, e)| e.pinned)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Resident keys with their slots, least recently used first.
    pub fn entries_by_recency(&self) -> Vec<(K, usize)> {
        let mut all: Vec<_> = self
            .entries
            .iter()
            .map(|(k, e)| (e.last_used, k, e.slot))
            .collect();
        all.sort_unstable_by_key(|(t, _, _)| *t);
        all.into_iter().map(|(_, k, s)| (k.clone(), s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_unpinned_unprotected() {
        let mut c = LruCache::new(3);
        for k in [1, 2, 3] {
            assert_eq!(c.acquire(&k, |_| false).unwrap().evicted, None);
        }
        c.touch(&1);
        c.set_pinned(&2, true);
        // 2 is pinned, 3 is protected: 1 goes even though it was touched.
        let got = c.acquire(&4, |k| *k == 3).unwrap();
        assert_eq!(
            got,
            Acquired {
                slot: 0,
                hit: false,
                evicted: Some(1)
            }
        );
        assert!(c.acquire(&5, |k| *k == 3 || *k == 4).is_none());
        assert!(c.acquire(&4, |_| true).unwrap().hit);
        assert_eq!(c.remove(&2), Some(1));
        assert_eq!(c.acquire(&6, |_| true).unwrap().slot, 1);
    }

    #[test]
    fn ranked_evicts_the_highest_rank_then_the_least_recent() {
        let mut c = LruCache::new(4);
        for k in [1, 2, 3, 4] {
            c.acquire(&k, |_| false);
        }
        // 1 must stay; 2 and 4 rank 7, 3 ranks 5: the older of 2 and 4 goes
        let rank = |k: &i32| match k {
            1 => None,
            3 => Some(5),
            _ => Some(7),
        };
        assert_eq!(c.acquire_ranked(&5, rank).unwrap().evicted, Some(2));
        // an unranked-high key (usize::MAX) goes before any ranked one, even if more recent
        let rank = |k: &i32| if *k == 5 { Some(usize::MAX) } else { Some(9) };
        assert_eq!(c.acquire_ranked(&6, rank).unwrap().evicted, Some(5));
        assert!(c.acquire_ranked(&7, |_| None).is_none());
    }

    #[test]
    fn zero_capacity_never_panics() {
        let mut c: LruCache<i64> = LruCache::new(0);
        assert!(c.acquire(&1, |_| false).is_none());
        assert!(!c.set_pinned(&1, true));
    }
}
