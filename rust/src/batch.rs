//! What one `schedule()` call returns: the batch, ordered so each adapter's tokens are
//! contiguous, with its segment table, slot traffic and block tables.

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
    /// Tokens already in the KV cache: the position of this step's first token.
    pub num_computed_tokens: usize,
    /// Tokens computed this step (a prefill chunk, or 1 for decode).
    pub num_new_tokens: usize,
    /// Whether this step reaches the end of the known tokens, so a token is sampled.
    pub samples: bool,
    /// The request's KV blocks, covering `num_computed_tokens + num_new_tokens` tokens.
    pub block_table: Vec<u32>,
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
}

/// An adapter to copy into a device slot before the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLoad {
    /// Device slot to write.
    pub slot: usize,
    /// Adapter to load.
    pub adapter: AdapterId,
    /// Host-tier slot holding (or to hold) its weights; `None` if the host tier has no room.
    pub host_slot: Option<usize>,
    /// `true`: the weights are already in `host_slot` (copy); `false`: read them from disk.
    pub from_host: bool,
}

/// An adapter leaving a slot (device or host).
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
    /// Host-tier evictions the loads cause.
    pub host_evictions: Vec<Eviction>,
    /// Requests preempted this step (blocks freed; they will be recomputed).
    pub preempted: Vec<RequestId>,
    /// Requests aborted since the last step.
    pub aborted: Vec<RequestId>,
    /// Requests refused (a duplicate id; an adapter that can get no slot because every slot
    /// is pinned), with the reason. They hold nothing.
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
                }),
            }
            start += seq.num_new_tokens;
        }
    }
}
