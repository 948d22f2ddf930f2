"""vLLM's ``vllm.v1.engine.llm_engine`` import path: ``from loraplex.v1.engine.llm_engine
import LLMEngine``."""

from loraplex.engine.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
