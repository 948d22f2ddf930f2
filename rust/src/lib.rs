//! loraplex core: adapter identity, adapter caches, the submission queue and the scheduler
//! of a multi-LoRA LLM serving engine. Pure Rust; the Python bindings live in `python.rs`
//! behind the `python` feature.

pub mod adapter_file;
pub mod adapters;
pub mod batch;
pub mod config;
pub mod confined;
pub mod error;
pub mod fair;
pub mod kv;
pub mod lifecycle;
pub mod lru;
pub mod pattern;
pub mod queue;
pub mod registry;
pub mod request;
pub mod scheduler;
pub mod submit;
pub mod waiting;

/// Hash maps keyed by small integers the core assigns: FxHash, not SipHash (a quarter of
/// `schedule()`'s time went to SipHash in the criterion bench).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, rustc_hash::FxBuildHasher>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, rustc_hash::FxBuildHasher>;

#[cfg(feature = "python")]
mod python;

pub use adapter_file::{AdapterFile, SlotDtype, WeightCopy};
pub use adapters::{Adapters, Key, Placement, ReadJob, Residency};
pub use batch::{Eviction, ScheduledSeq, SchedulerOutput, Segment, SlotLoad, NO_SLOT};
pub use config::SchedulerConfig;
pub use error::{Error, Result};
pub use kv::{BlockManager, RequestId};
pub use lifecycle::Staging;
pub use lru::{Acquired, LruCache};
pub use pattern::ModulePatterns;
pub use queue::RequestQueue;
pub use registry::AdapterRegistry;
pub use request::{AdapterId, LoRARequest};
pub use scheduler::Scheduler;
pub use submit::{Command, NewRequest, Submitter};
