//! Paged KV block accounting: a free list and one block table per request. No tensors:
//! Python owns the KV data and indexes it with the tables computed here.

use crate::FastMap;

/// A request's id inside the core.
pub type RequestId = u64;

/// Owns the KV block ids `0..num_blocks`, each block holding `block_size` tokens.
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    /// Free block ids; `pop` hands out the lowest first.
    free: Vec<u32>,
    tables: FastMap<RequestId, Vec<u32>>,
}

impl BlockManager {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            tables: FastMap::default(),
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

    /// Blocks not owned by any request.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
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
        self.num_missing(id, num_tokens) <= self.free.len()
    }

    /// Grows `id`'s table to hold `num_tokens` tokens; `false` (and no change) if the free
    /// list is too short.
    pub fn allocate(&mut self, id: RequestId, num_tokens: usize) -> bool {
        let missing = self.num_missing(id, num_tokens);
        if missing > self.free.len() {
            return false;
        }
        let table = self.tables.entry(id).or_default();
        let start = self.free.len() - missing;
        table.extend(self.free.drain(start..).rev());
        true
    }

    /// Returns all of `id`'s blocks to the free list.
    pub fn free(&mut self, id: RequestId) {
        if let Some(table) = self.tables.remove(&id) {
            self.free.extend(table.into_iter().rev());
        }
    }

    /// `id`'s block table (empty if it holds none).
    pub fn block_table(&self, id: RequestId) -> &[u32] {
        self.tables.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Every (request, block) ownership pair, for invariant checks.
    pub fn owned_blocks(&self) -> impl Iterator<Item = (RequestId, u32)> + '_ {
        self.tables
            .iter()
            .flat_map(|(id, t)| t.iter().map(move |b| (*id, *b)))
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
}
