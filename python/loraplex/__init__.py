"""loraplex: serve one base LLM with many LoRA adapters in the same batch.

The core (request validation, adapter identity, caches, the submission queue and the
scheduler) is Rust, in ``loraplex._core``; this package re-exports it by name.
"""

from loraplex._core import (
    AdapterConflictError,
    AdapterRegistry,
    DuplicateRequestError,
    InvalidConfigError,
    InvalidLoRARequestError,
    InvalidRequestError,
    LoraplexError,
    LoRARequest,
    NoFreeSlotError,
    QueueFullError,
    Scheduler,
    SchedulerOutput,
    UnknownAdapterError,
)

__all__ = [
    "AdapterConflictError",
    "AdapterRegistry",
    "DuplicateRequestError",
    "InvalidConfigError",
    "InvalidLoRARequestError",
    "InvalidRequestError",
    "LoRARequest",
    "LoraplexError",
    "NoFreeSlotError",
    "QueueFullError",
    "Scheduler",
    "SchedulerOutput",
    "UnknownAdapterError",
]
__version__ = "0.1.0"
