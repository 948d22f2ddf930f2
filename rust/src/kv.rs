//! Paged KV block accounting with a prefix cache: a free list, one block table per request,
//! and full blocks kept by what they hold. No tensors: Python owns the KV data and indexes it
//! with the tables computed here.
//!
//! A full block whose KV has been computed is *cached* under a hash chained over every token
//! before and in it and the adapter's weights version ([`BlockKey`]: the core's adapter key,
//! new at each in-place reload and each registration, or the base model): the same tokens
//! under another adapter, another weights version of the same adapter, or the base, never
//! find it. A request admitted later whose prompt starts with those tokens shares the block
//! (ref-counted) instead of computing it again. A block nobody holds any more stays cached,
//! in an LRU, until a fresh block is wanted and no uncached one is free: then the least
//! recently used goes. A hit is checked against the block's own record (its tokens, its
//! parent's hash and its version), so a hash collision can never serve another prefix's KV.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use crate::FastMap;

/// A request's id inside the core.
pub type RequestId = u64;

/// What a block's KV was computed with: the adapter key (weights version) or 0 (base).
pub type BlockKey = i64;

/// The hash of a block's whole prefix (chained), with the block's own record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cached {
    hash: u64,
    parent: u64,
    version: BlockKey,
    tokens: Box<[u32]>,
}

/// Owns the KV block ids `0..num_blocks`, each block holding `block_size` tokens.
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    /// Uncached free block ids; `pop` hands out the lowest first.
    free: Vec<u32>,
    tables: FastMap<RequestId, Vec<u32>>,
    /// Tables holding each block.
    refs: Vec<u32>,
    /// What each cached block holds.
    cached: Vec<Option<Cached>>,
    /// Cached blocks by hash.
    index: FastMap<u64, u32>,
    /// Cached blocks nobody holds, by when they were let go (oldest first).
    lru: BTreeMap<u64, u32>,
    /// Each block's place in `lru` (meaningful while it is there).
    lru_tick: Vec<u64>,
    tick: u64,
    /// Keyed per process: a client cannot aim for collisions it cannot compute.
    hasher: std::collections::hash_map::RandomState,
}

impl BlockManager {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            tables: FastMap::default(),
            refs: vec![0; num_blocks],
            cached: vec![None; num_blocks],
            index: FastMap::default(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; num_blocks],
            tick: 0,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks a request may be given: the free ones and the cached ones nobody holds.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Cached blocks (held or not).
    pub fn num_cached_blocks(&self) -> usize {
        self.index.len()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    fn num_missing(&self, id: RequestId, num_tokens: usize) -> usize {
        let held = self.tables.get(&id).map_or(0, Vec::len);
        self.blocks_for(num_tokens).saturating_sub(held)
    }

    /// Whether `id`'s table can grow to hold `num_tokens` tokens.
    pub fn can_allocate(&self, id: RequestId, num_tokens: usize) -> bool {
        self.num_missing(id, num_tokens) <= self.num_free_blocks()
    }

    /// Grows `id`'s table to hold `num_tokens` tokens; `false` (and no change) if too few
    /// blocks are free.
    pub fn allocate(&mut self, id: RequestId, num_tokens: usize) -> bool {
        let missing = self.num_missing(id, num_tokens);
        if missing > self.num_free_blocks() {
            return false;
        }
        let mut fresh = Vec::with_capacity(missing);
        for _ in 0..missing {
            fresh.push(self.take_fresh());
        }
        self.tables.entry(id).or_default().extend(fresh);
        true
    }

    /// A block for new KV: an uncached free one, else the least recently used cached one
    /// (forgotten).
    fn take_fresh(&mut self) -> u32 {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first().expect("counted as free");
                self.forget(b);
                b
            }
        };
        self.refs[block as usize] = 1;
        block
    }

    /// Drops `block`'s cache record (it must not be in `lru`).
    fn forget(&mut self, block: u32) {
        if let Some(c) = self.cached[block as usize].take() {
            if self.index.get(&c.hash) == Some(&block) {
                self.index.remove(&c.hash);
            }
        }
    }

    /// Gives `id` (holding no blocks) the cached `blocks` (a prefix, from
    /// [`BlockManager::lookup`]) and fresh ones up to `num_tokens`; `false` (and no change) if
    /// too few blocks are free.
    pub fn allocate_with_prefix(
        &mut self,
        id: RequestId,
        blocks: &[u32],
        num_tokens: usize,
    ) -> bool {
        debug_assert!(self.tables.get(&id).is_none_or(Vec::is_empty));
        let reclaimed = blocks
            .iter()
            .filter(|b| self.refs[**b as usize] == 0)
            .count();
        let missing = self.blocks_for(num_tokens).saturating_sub(blocks.len());
        if missing + reclaimed > self.num_free_blocks() {
            return false;
        }
        for &b in blocks {
            if self.refs[b as usize] == 0 {
                self.lru.remove(&self.lru_tick[b as usize]);
            }
            self.refs[b as usize] += 1;
        }
        let mut table = blocks.to_vec();
        for _ in 0..missing {
            table.push(self.take_fresh());
        }
        self.tables.insert(id, table);
        true
    }

    /// Returns all of `id`'s blocks: each one nobody else holds goes to the free list, or,
    /// if cached, to the LRU (the table's last blocks first out: a prefix's tail is the
    /// least likely to be shared).
    pub fn free(&mut self, id: RequestId) {
        let Some(table) = self.tables.remove(&id) else {
            return;
        };
        for block in table.into_iter().rev() {
            let r = &mut self.refs[block as usize];
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.cached[block as usize].is_some() {
                self.tick += 1;
                self.lru_tick[block as usize] = self.tick;
                self.lru.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// `id`'s block table (empty if it holds none).
    pub fn block_table(&self, id: RequestId) -> &[u32] {
        self.tables.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Every (request, block) holding pair, for invariant checks.
    pub fn owned_blocks(&self) -> impl Iterator<Item = (RequestId, u32)> + '_ {
        self.tables
            .iter()
            .flat_map(|(id, t)| t.iter().map(move |b| (*id, *b)))
    }

    /// How many tables hold `block`.
    pub fn refs(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// The hash of a block holding `tokens` after the prefix hashed `parent` (0 for the
    /// first block), computed with weights `version`.
    pub fn block_hash(&self, parent: u64, version: BlockKey, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, version, tokens))
    }

    /// What a salted request's first block chains after (never 0, the unsalted start).
    pub fn salt_hash(&self, salt: &str) -> u64 {
        self.hasher.hash_one(("cache_salt", salt)).max(1)
    }

    /// The cached blocks that hold the prefix whose block hashes are `hashes` (chained, as
    /// [`BlockManager::block_hash`] makes them, after `start`: 0, or a salt's hash) and
    /// tokens `tokens`, as far as they reach.
    pub fn lookup(
        &self,
        version: BlockKey,
        start: u64,
        hashes: &[u64],
        tokens: &[u32],
    ) -> Vec<u32> {
        let bs = self.block_size;
        let mut found = Vec::new();
        let mut parent = start;
        for (i, h) in hashes.iter().enumerate() {
            let Some(&block) = self.index.get(h) else {
                break;
            };
            let c = self.cached[block as usize]
                .as_ref()
                .expect("indexed blocks are cached");
            let own = &tokens[i * bs..(i + 1) * bs];
            if c.parent != parent || c.version != version || &*c.tokens != own {
                break; // a collision: not this prefix
            }
            found.push(block);
            parent = *h;
        }
        found
    }

    /// Records `id`'s block `index` (full, its KV computed) as holding `tokens` under
    /// `hash`, chained after `parent`. A block whose content is cached already (computed
    /// twice, by requests admitted together) stays uncached.
    pub fn cache_block(
        &mut self,
        id: RequestId,
        index: usize,
        hash: u64,
        parent: u64,
        version: BlockKey,
        tokens: &[u32],
    ) {
        let Some(&block) = self.tables.get(&id).and_then(|t| t.get(index)) else {
            return;
        };
        if self.cached[block as usize].is_some() || self.index.contains_key(&hash) {
            return;
        }
        self.cached[block as usize] = Some(Cached {
            hash,
            parent,
            version,
            tokens: tokens.into(),
        });
        self.index.insert(hash, block);
    }

    /// Forgets every cached block computed with `version` (an adapter removed or reloaded):
    /// none is found again; the ones nobody holds are free at once.
    pub fn forget_version(&mut self, version: BlockKey) -> usize {
        self.forget_where(|c| c.version == version)
    }

    /// Forgets every cached block (vLLM's `reset_prefix_cache`); blocks in use stay with
    /// their requests.
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.forget_where(|_| true)
    }

    fn forget_where(&mut self, matches: impl Fn(&Cached) -> bool) -> usize {
        let mut n = 0;
        for block in 0..self.num_blocks as u32 {
            if !self.cached[block as usize].as_ref().is_some_and(&matches) {
                continue;
            }
            if self.refs[block as usize] == 0 {
                self.lru.remove(&self.lru_tick[block as usize]);
                self.free.push(block);
            }
            self.forget(block);
            n += 1;
        }
        if n > 0 {
            self.free.sort_unstable_by(|a, b| b.cmp(a)); // lowest handed out first, as before
        }
        n
    }
}

/// A request's token ids and block hashes, for the prefix cache.
pub(crate) struct SeqCache {
    /// Every known token: the prompt, then each one sampled.
    pub(crate) tokens: Vec<u32>,
    /// Whether admission may start from cached blocks.
    pub(crate) read: bool,
    /// The chained hashes of its first full blocks (they depend only on the tokens and the
    /// weights version, so they outlive a preemption).
    pub(crate) hashes: Vec<u64>,
    /// Blocks of its current table the cache knows (found there, or recorded).
    pub(crate) recorded: usize,
    /// What its first block chains after: 0, or its `cache_salt`'s hash.
    pub(crate) salt: u64,
}

impl SeqCache {
    /// Hashes its first `blocks` full blocks (those not hashed yet).
    pub(crate) fn hash_upto(&mut self, kv: &BlockManager, version: BlockKey, blocks: usize) {
        let bs = kv.block_size();
        while self.hashes.len() < blocks {
            let i = self.hashes.len();
            let parent = if i == 0 {
                self.salt
            } else {
                self.hashes[i - 1]
            };
            let h = kv.block_hash(parent, version, &self.tokens[i * bs..(i + 1) * bs]);
            self.hashes.push(h);
        }
    }
}

/// The weights version a request's KV is computed with: its adapter key, or 0 (the base).
pub(crate) fn version_of(adapter: crate::waiting::AdapterKey) -> BlockKey {
    adapter.unwrap_or(0)
}

/// The cached blocks a waiting request may start from (at most all but its last token: one
/// is always computed, for its logits), and how many tokens it looked up.
pub(crate) fn prefix_hit(kv: &BlockManager, seq: &mut crate::scheduler::Seq) -> (Vec<u32>, usize) {
    let version = version_of(seq.adapter);
    let Some(c) = seq.cache.as_mut().filter(|c| c.read) else {
        return (Vec::new(), 0);
    };
    let blocks = (seq.num_tokens - 1) / kv.block_size();
    c.hash_upto(kv, version, blocks);
    let hit = kv.lookup(version, c.salt, &c.hashes[..blocks], &c.tokens);
    (hit, seq.num_tokens)
}

/// Enters request `id`'s full blocks computed so far into the prefix cache (their tokens are
/// all known), unless its weights were replaced or removed: no later request could find them.
pub(crate) fn cache_computed(
    kv: &mut BlockManager,
    adapters: &crate::adapters::Adapters,
    id: RequestId,
    seq: &mut crate::scheduler::Seq,
) {
    let bs = kv.block_size();
    let version = version_of(seq.adapter);
    let current = seq
        .adapter
        .is_none_or(|k| adapters.is_live(k) && !adapters.is_retired(k));
    let Some(c) = seq.cache.as_mut().filter(|_| current) else {
        return;
    };
    let full = seq.num_computed / bs;
    c.hash_upto(kv, version, full);
    while c.recorded < full {
        let i = c.recorded;
        let parent = if i == 0 { c.salt } else { c.hashes[i - 1] };
        let tokens = &c.tokens[i * bs..(i + 1) * bs];
        kv.cache_block(id, i, c.hashes[i], parent, version, tokens);
        c.recorded += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_grow_free() {
        let mut kv = BlockManager::new(4, 16);
        assert!(kv.allocate(1, 17));
        assert_eq!(kv.block_table(1), &[0, 1]);
        assert!(kv.allocate(1, 32));
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(!kv.can_allocate(2, 33));
        assert!(!kv.allocate(2, 33));
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(kv.allocate(2, 32));
        kv.free(1);
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(kv.allocate(3, 1));
        assert_eq!(kv.block_table(3), &[0]);
    }

    fn chain(kv: &BlockManager, version: BlockKey, tokens: &[u32]) -> Vec<u64> {
        let mut parent = 0;
        tokens
            .chunks_exact(kv.block_size())
            .map(|t| {
                parent = kv.block_hash(parent, version, t);
                parent
            })
            .collect()
    }

    #[test]
    fn cached_blocks_are_shared_by_version_and_evicted_last_used_first() {
        let mut kv = BlockManager::new(4, 2);
        let prompt = [1, 2, 3, 4];
        let hashes = chain(&kv, 7, &prompt);
        assert!(kv.allocate(1, 4));
        for i in 0..2 {
            let parent = if i == 0 { 0 } else { hashes[i - 1] };
            kv.cache_block(1, i, hashes[i], parent, 7, &prompt[i * 2..i * 2 + 2]);
        }
        assert_eq!(kv.lookup(7, 0, &hashes, &prompt), kv.block_table(1));
        assert!(kv.lookup(8, 0, &chain(&kv, 8, &prompt), &prompt).is_empty()); // another version
        assert!(kv.lookup(0, 0, &chain(&kv, 0, &prompt), &prompt).is_empty()); // the base
        let shared = kv.lookup(7, 0, &hashes[..1], &prompt);
        assert!(kv.allocate_with_prefix(2, &shared, 3));
        assert_eq!(kv.refs(kv.block_table(1)[0]), 2);
        assert_eq!(kv.num_free_blocks(), 1);
        kv.free(1);
        kv.free(2);
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.num_cached_blocks(), 2);
        // fresh blocks come from the uncached ones first, then the LRU's tail block
        assert!(kv.allocate(3, 6));
        assert_eq!(kv.num_cached_blocks(), 1);
        assert_eq!(kv.lookup(7, 0, &hashes, &prompt).len(), 1);
        kv.free(3);
        assert_eq!(kv.forget_version(7), 1);
        assert_eq!(kv.num_cached_blocks(), 0);
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn a_hash_collision_is_not_a_hit() {
        let mut kv = BlockManager::new(2, 2);
        let hashes = chain(&kv, 0, &[1, 2]);
        assert!(kv.allocate(1, 2));
        kv.cache_block(1, 0, hashes[0], 0, 0, &[1, 2]);
        // the same hash claimed for other tokens (a collision) finds nothing
        assert!(kv.lookup(0, 0, &hashes, &[9, 9]).is_empty());
        assert_eq!(kv.lookup(0, 0, &hashes, &[1, 2]).len(), 1);
    }
}
