//! One error type for the whole core: every failure a caller can reach is a variant here.
//!
//! The Python bindings map each variant to an exception class in one `match`
//! (`python.rs`), so adding a variant without deciding its Python class fails to compile.

use thiserror::Error;

/// Everything that can go wrong in the core, each case naming its culprit.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A `LoRARequest` with `lora_int_id < 1` (vLLM reserves 0 for "no adapter").
    #[error("id must be > 0, got {0}")]
    InvalidLoraId(i64),

    /// An id outside what an `i64` holds (from Python, whose ints are unbounded).
    #[error("id must be {bound}, got {id}")]
    LoraIdOutOfRange {
        /// `"> 0"` for ids below 1, `"<= 9223372036854775807"` for ids above `i64::MAX`.
        bound: &'static str,
        /// The id as given, in decimal.
        id: String,
    },

    /// A `LoRARequest` whose path (and deprecated local path) is empty.
    #[error("lora_path cannot be empty (adapter '{0}')")]
    EmptyLoraPath(String),

    /// A `LoRARequest` with an empty name.
    #[error("lora_name cannot be empty (adapter id {0})")]
    EmptyLoraName(i64),

    /// Registering an adapter that clashes with one already registered: the same id under
    /// another name, the same name under another id, or the same (name, id) with another path.
    #[error("adapter conflict: {new} clashes with registered {existing}: {reason}")]
    AdapterConflict {
        /// The adapter being registered, as `'name' (id N, path P)`.
        new: String,
        /// The adapter already registered, in the same form.
        existing: String,
        /// Which field clashes.
        reason: String,
    },

    /// A lookup or removal of an adapter the registry or cache does not hold.
    #[error("unknown adapter id {0}")]
    UnknownAdapter(i64),

    /// Removing an adapter that waiting or running requests still use.
    #[error("adapter {adapter} is in use by {num_requests} unfinished request(s)")]
    AdapterInUse {
        /// The adapter.
        adapter: i64,
        /// How many requests wait for it or run with it.
        num_requests: usize,
    },

    /// Every device slot is pinned or in use by the current batch.
    #[error("no free adapter slot: all {capacity} slots are pinned or in use (adapter {adapter})")]
    NoFreeSlot {
        /// Capacity of the cache (`max_loras` or `max_cpu_loras`).
        capacity: usize,
        /// The adapter that wanted a slot.
        adapter: i64,
    },

    /// An adapter whose weights are not (yet) in the host tier, where an operation needs them.
    #[error("adapter {0} is not loaded")]
    AdapterNotLoaded(i64),

    /// A request whose adapter failed to load, or was removed before the request ran.
    #[error("{0}")]
    AdapterFailed(String),

    /// The bounded submission queue is full; the item was not enqueued.
    #[error(
        "request queue is full ({capacity} pending submissions); retry after the engine steps"
    )]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },

    /// A request id that is already waiting or running.
    #[error("request id {0} is already in the scheduler")]
    DuplicateRequest(u64),

    /// A request that cannot be scheduled as given (empty prompt, too long, ...).
    #[error("request {id}: {reason}")]
    InvalidRequest {
        /// The request's id.
        id: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A scheduler or cache configuration that cannot work.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
}

/// Result alias used throughout the core.
pub type Result<T> = std::result::Result<T, Error>;
