"""loraplex: serve one base LLM with many LoRA adapters in the same batch.

The core (request validation, adapter identity, caches, the submission queue and the
scheduler) is Rust, in ``loraplex._core``; the engine (``LLM``, ``LLMEngine``) is torch.
Both are re-exported here by name; the torch side is imported on first use, so the core
alone loads without torch.
"""

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that sleep when they run out of work rather than spin: on a CPU the engine
# shares with its server, its clients and the kernel, a spinning thread takes the core that
# would run them (measured in benches/README.md: +5% offline, served over offline 0.875 ->
# 0.912). libgomp reads it once, when torch loads: it applies when loraplex is imported
# before torch, and a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from loraplex._core import (  # noqa: E402
    AdapterConflictError,
    AdapterInUseError,
    AdapterNotLoadedError,
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
    StepPlan,
    UnknownAdapterError,
)

_LAZY = {
    "LLM": "loraplex.entrypoints.llm",
    "LLMEngine": "loraplex.engine.llm_engine",
    "EngineArgs": "loraplex.engine.arg_utils",
    "AsyncEngineArgs": "loraplex.engine.arg_utils",
    "AsyncLLM": "loraplex.engine.async_llm",
    "SamplingParams": "loraplex.sampling_params",
    "RequestOutputKind": "loraplex.sampling_params",
    "RequestOutput": "loraplex.outputs",
    "CompletionOutput": "loraplex.outputs",
    "TextPrompt": "loraplex.inputs",
    "TokensPrompt": "loraplex.inputs",
    "InvalidAdapterError": "loraplex.errors",
}

if TYPE_CHECKING:
    from loraplex.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from loraplex.engine.async_llm import AsyncLLM
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.entrypoints.llm import LLM
    from loraplex.errors import InvalidAdapterError
    from loraplex.inputs import TextPrompt, TokensPrompt
    from loraplex.outputs import CompletionOutput, RequestOutput
    from loraplex.sampling_params import RequestOutputKind, SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")


__all__ = [
    "LLM",
    "AsyncEngineArgs",
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "InvalidAdapterError",
    "RequestOutputKind",
    "TextPrompt",
    "TokensPrompt",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "AdapterConflictError",
    "AdapterInUseError",
    "AdapterNotLoadedError",
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
    "StepPlan",
    "UnknownAdapterError",
]
__version__ = "0.1.0"
