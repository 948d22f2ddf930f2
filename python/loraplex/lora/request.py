"""vLLM's import path for ``LoRARequest``: ``from loraplex.lora.request import LoRARequest``."""

from loraplex._core import LoRARequest

__all__ = ["LoRARequest"]
