//! Scheduler limits, with vLLM's names and the checks that make them workable together.

use crate::error::{Error, Result};

/// Limits for [`crate::scheduler::Scheduler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most requests in one batch (vLLM `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Most tokens in one batch; longer prompts are prefilled in chunks.
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + output) a request may reach.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// Device adapter slots: most distinct adapters in one batch.
    pub max_loras: usize,
    /// Host-tier adapter slots (`>= max_loras`).
    pub max_cpu_loras: usize,
    /// Steps the oldest waiting request may be passed over for want of an adapter slot before
    /// the scheduler stops admitting other adapters' requests until it gets one.
    pub max_skipped_steps: u64,
    /// Bound of the submission queue.
    pub queue_capacity: usize,
    /// Most adapter reads in flight at once (handed to the engine's loader pool).
    pub max_loading: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: 2048,
            block_size: 16,
            num_blocks: 1024,
            max_loras: 1,
            max_cpu_loras: 1,
            max_skipped_steps: 32,
            queue_capacity: 1 << 16,
            max_loading: 4,
        }
    }
}

impl SchedulerConfig {
    /// Checks that the limits can serve every request they admit.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the offending field and value.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_loras", self.max_loras),
            ("queue_capacity", self.queue_capacity),
            ("max_loading", self.max_loading),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::InvalidConfig(format!("{name} must be >= 1, got 0")));
        }
        if self.max_cpu_loras < self.max_loras {
            return Err(Error::InvalidConfig(format!(
                "max_cpu_loras ({}) must be >= max_loras ({})",
                self.max_cpu_loras, self.max_loras
            )));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(Error::InvalidConfig(format!(
                "max_num_batched_tokens ({}) must be >= max_num_seqs ({})",
                self.max_num_batched_tokens, self.max_num_seqs
            )));
        }
        if self.num_blocks.saturating_mul(self.block_size) < self.max_model_len {
            return Err(Error::InvalidConfig(format!(
                "the KV cache ({} blocks x {} tokens) cannot hold one sequence of max_model_len {}",
                self.num_blocks, self.block_size, self.max_model_len
            )));
        }
        Ok(())
    }
}
