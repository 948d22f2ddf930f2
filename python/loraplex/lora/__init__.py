"""LoRA adapters: requests (``loraplex.lora.request``, vLLM's import path)."""
