//! What producers send the scheduler, and the thread-safe handle they send it through.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kv::RequestId;
use crate::queue::RequestQueue;
use crate::waiting::AdapterKey;

/// A request to admit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRequest {
    /// Unique among unfinished requests.
    pub id: RequestId,
    /// Prompt length in tokens (`1..=max_model_len`).
    pub num_prompt_tokens: usize,
    /// Adapter, or `None` for the base model.
    pub adapter: AdapterKey,
    /// Lower runs first (vLLM's convention); ties go by arrival.
    pub priority: i32,
    /// The prompt's token ids, for the prefix cache: given, the request's full blocks are
    /// cached as they are computed; `None`, it takes no part.
    pub prompt: Option<Vec<u32>>,
    /// Whether admission may start from cached blocks (with `prompt`; vLLM reads no cache
    /// for a request that wants every prompt token's logprobs).
    pub read_cache: bool,
    /// vLLM's `cache_salt`: only requests with the same salt share cached blocks (a tenant's
    /// prefixes are never found by another's).
    pub cache_salt: Option<String>,
    /// Under fair share, the tenant whose share it counts against (the OpenAI `user`);
    /// `None`: its adapter's (see `fair`).
    pub tenant: Option<String>,
}

/// One submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Admit a request.
    Add(NewRequest),
    /// Abort a request, waiting or running.
    Abort(RequestId),
}

/// A cloneable, `Send + Sync` handle that submits to one scheduler from any thread.
#[derive(Clone)]
pub struct Submitter {
    queue: Arc<RequestQueue<Command>>,
    max_model_len: usize,
}

impl Submitter {
    pub(crate) fn new(queue: Arc<RequestQueue<Command>>, max_model_len: usize) -> Self {
        Self {
            queue,
            max_model_len,
        }
    }

    /// Validates and enqueues a request.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for an empty prompt or one longer than `max_model_len`;
    /// [`Error::QueueFull`] when the queue is full (nothing is enqueued).
    pub fn add(&self, request: NewRequest) -> Result<()> {
        let n = request.num_prompt_tokens;
        if let Some(prompt) = request.prompt.as_ref().filter(|p| p.len() != n) {
            return Err(Error::InvalidRequest {
                id: request.id,
                reason: format!("{} prompt token ids for {n} prompt tokens", prompt.len()),
            });
        }
        if n == 0 || n > self.max_model_len {
            let reason = if n == 0 {
                "the prompt is empty".to_string()
            } else {
                format!(
                    "the prompt ({n} tokens) is longer than max_model_len ({})",
                    self.max_model_len
                )
            };
            return Err(Error::InvalidRequest {
                id: request.id,
                reason,
            });
        }
        self.push(Command::Add(request))
    }

    /// Enqueues an abort; unknown or finished ids are ignored when drained.
    ///
    /// # Errors
    /// [`Error::QueueFull`] when the queue is full.
    pub fn abort(&self, id: RequestId) -> Result<()> {
        self.push(Command::Abort(id))
    }

    fn push(&self, command: Command) -> Result<()> {
        self.queue.push(command).map_err(|full| full.error)
    }

    /// Submissions not yet drained.
    pub fn num_pending(&self) -> usize {
        self.queue.len()
    }
}
