//! What one `schedule()` call returns: the batch, ordered so each adapter's tokens are
//! contiguous, with its segment table, slot traffic, block tables and the adapter reads to
//! start ahead of need.

use crate::adapters::{Key, ReadJob};
use crate::error::Error;
use crate::kv::RequestId;
use crate::request::AdapterId;

/// Slot index of "no adapter" (base model) in segment tables.
pub const NO_SLOT: i32 = -1;

/// One request's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The request.
    pub request_id: RequestId,
    /// Its adapter (`None`: base model).
    pub adapter: Option<AdapterId>,
    /// Device slot of its adapter, or [`NO_SLOT`].
    pub slot: i32,
    /// Host slot of its adapter's weights, or [`NO_SLOT`].
    pub host_slot: i32,
    /// Tokens already in the KV cache: the position of this step's first token.
    pub num_computed_tokens: usize,
    /// Tokens computed this step (a prefill chunk, or 1 for decode).
    pub num_new_tokens: usize,
    /// Whether this step reaches the end of the known tokens, so a token is sampled.
    pub samples: bool,
    /// The request's KV blocks, covering `num_computed_tokens + num_new_tokens` tokens.
    pub block_table: Vec<u32>,
    /// Admitted this step: the tokens it looked up in the prefix cache (0 if it reads none).
    pub num_queried_tokens: usize,
    /// Admitted this step: the tokens found there (its first `num_computed_tokens`).
    pub num_cached_tokens: usize,
}

/// A run of the flat token batch that uses one adapter slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First token of the run in the flat batch.
    pub start: usize,
    /// Tokens in the run.
    pub len: usize,
    /// Device slot, or [`NO_SLOT`].
    pub slot: i32,
    /// Host slot of the same adapter, or [`NO_SLOT`] (a backend whose device is the host
    /// runs on these: no second copy).
    pub host_slot: i32,
}

/// An adapter to copy from its host slot into a device slot before the step runs (its
/// weights are always in the host tier by then: the step never reads the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLoad {
    /// Device slot to write.
    pub slot: usize,
    /// Key of the weights to load.
    pub adapter: AdapterId,
    /// Host slot holding them.
    pub host_slot: usize,
}

/// An adapter leaving a device slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// The slot it leaves.
    pub slot: usize,
    /// The adapter evicted.
    pub adapter: AdapterId,
}

/// The scheduler's answer for one step.
#[derive(Debug, Clone, Default)]
pub struct SchedulerOutput {
    /// Scheduled requests, grouped by slot (base model first), arrival order kept per group.
    pub seqs: Vec<ScheduledSeq>,
    /// Segment table over the flat token batch, one entry per slot group.
    pub segments: Vec<Segment>,
    /// Device slot loads to perform before running the model.
    pub loads: Vec<SlotLoad>,
    /// Device evictions the loads cause.
    pub evictions: Vec<Eviction>,
    /// Adapter reads to start, in the order admission will want them.
    pub reads: Vec<ReadJob>,
    /// Validated weights that waited for a host slot, and the slot to copy them into.
    pub commits: Vec<(Key, usize)>,
    /// Validated weights waiting for a slot whose adapter was forgotten: drop them.
    pub unheld: Vec<Key>,
    /// Requests preempted this step (blocks freed; they will be recomputed).
    pub preempted: Vec<RequestId>,
    /// Requests aborted since the last step.
    pub aborted: Vec<RequestId>,
    /// Requests refused or failed (a duplicate id; an adapter that can get no slot because
    /// every slot is pinned; an adapter whose read failed), with the reason. They hold
    /// nothing.
    pub rejected: Vec<(RequestId, Error)>,
}

impl SchedulerOutput {
    /// Total tokens in the batch.
    pub fn num_batched_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_new_tokens).sum()
    }

    /// Whether nothing runs this step.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Each batched token's position and the KV cache slot its key and value go to, in batch
    /// order (`block_size` tokens per block).
    pub fn positions_and_slots(&self, block_size: usize) -> (Vec<i64>, Vec<i64>) {
        let n = self.num_batched_tokens();
        let (mut positions, mut slots) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for s in &self.seqs {
            for pos in s.num_computed_tokens..s.num_computed_tokens + s.num_new_tokens {
                let block = s.block_table[pos / block_size] as usize;
                positions.push(pos as i64);
                slots.push((block * block_size + pos % block_size) as i64);
            }
        }
        (positions, slots)
    }

    /// Sorts `seqs` by slot (stable, so arrival order holds within a slot) and builds the
    /// segment table.
    pub(crate) fn group_by_slot(&mut self) {
        self.seqs.sort_by_key(|s| s.slot);
        self.segments.clear();
        let mut start = 0;
        for seq in &self.seqs {
            match self.segments.last_mut() {
                Some(seg) if seg.slot == seq.slot => seg.len += seq.num_new_tokens,
                _ => self.segments.push(Segment {
                    start,
                    len: seq.num_new_tokens,
                    slot: seq.slot,
                    host_slot: seq.host_slot,
                }),
            }
            start += seq.num_new_tokens;
        }
    }
}
