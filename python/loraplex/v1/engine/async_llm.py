"""vLLM's ``vllm.v1.engine.async_llm`` import path: ``from loraplex.v1.engine.async_llm
import AsyncLLM``."""

from loraplex.engine.async_llm import AsyncLLM, EngineDeadError

__all__ = ["AsyncLLM", "EngineDeadError"]
