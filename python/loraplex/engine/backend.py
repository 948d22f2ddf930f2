"""The backend: chosen once, at engine start (``EngineArgs.device``), it owns the device, the
dtype, the KV cache tensors and the choice of kernels. Every other module asks it; none asks
which device it runs on.

- ``CPUBackend``: float32 by default; weights in oneDNN's packed layout, the C++ CPU ops for
  LoRA (``lora_apply``) and decode attention where they are built (AVX2), the torch paths
  elsewhere (or with ``LORAPLEX_CPU_KERNELS=torch``). Adapter kernels read the host tier's
  slots directly: a device slot is not a second copy on the CPU.
- CUDA is not built yet: ``device="cuda"`` is refused naming it, and ``auto`` is the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loraplex.ops import cpu_ext

if TYPE_CHECKING:
    from loraplex.engine.arg_utils import EngineArgs
    from loraplex.model.config import ModelConfig
    from loraplex.model.llama import LlamaForCausalLM

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
# decode attention over the paged cache: (q, k_cache, v_cache, slots, rows, key_start,
# key_end, out), as ``cpu_ext.paged_decode_attention``
DecodeAttention = Callable[..., None]

# LoRA kernels a backend may choose for a step's segments (lora/slots.py runs them)
LORA_CPP = "cpp"  # the C++ op over the merged projection (float32 activations)
LORA_PADDED = "padded"  # torch on the CPU: short segments as one padded batched GEMM
LORA_SGMV = "sgmv"  # ops.sgmv_* per segment (the CUDA kernels where built)


class Backend:
    name = "base"

    def __init__(self, args: EngineArgs):
        self.args = args
        self.dtype = args.torch_dtype()
        self.lora_dtype = args.lora_torch_dtype()
        self.device = torch.device("cpu")

    # -- the model --

    def prepare_model(self, model: LlamaForCausalLM) -> LlamaForCausalLM:
        """The loaded model, moved and laid out for this backend's kernels."""
        return model.eval()

    # -- the KV cache --

    def kv_bytes_per_token(self, cfg: ModelConfig) -> int:
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
        return per_token * (torch.finfo(self.dtype).bits // 8)

    def num_kv_blocks(self, cfg: ModelConfig, max_model_len: int) -> int:
        args = self.args
        if args.num_gpu_blocks_override is not None:
            return args.num_gpu_blocks_override
        from loraplex.engine.arg_utils import DEFAULT_KV_CACHE_BYTES

        budget = args.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
        needed = args.max_num_seqs * max_model_len
        tokens = min(needed, budget // self.kv_bytes_per_token(cfg))
        return max(1, math.ceil(tokens / args.block_size))

    def kv_caches(self, cfg: ModelConfig, num_blocks: int, block_size: int) -> KVCaches:
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: padded keys are masked, but NaN garbage would still poison them
        return [
            (self.zeros(shape, self.dtype), self.zeros(shape, self.dtype))
            for _ in range(cfg.num_hidden_layers)
        ]

    # -- tensors and kernels --

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def tensor(self, data, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def decode_attention(self) -> DecodeAttention | None:
        """A kernel for decode-only attention groups, or None (the torch path)."""
        return None

    def lora_kernel(self, slot_dtype: torch.dtype, max_rank: int) -> str:
        """The LoRA kernel for adapter slots of ``slot_dtype`` (``LORA_*``)."""
        return LORA_SGMV


class CPUBackend(Backend):
    name = "cpu"

    def __init__(self, args: EngineArgs):
        super().__init__(args)
        # the C++ ops serve float32 activations; decided (and built) once, here
        self.cpp = self.dtype == torch.float32 and cpu_ext.available()

    def prepare_model(self, model: LlamaForCausalLM) -> LlamaForCausalLM:
        from loraplex.model.llama import Linear

        if (
            self.dtype == torch.float32
            and cpu_ext.enabled()
            and torch.backends.mkldnn.is_available()
        ):
            for module in model.modules():
                if isinstance(module, Linear):
                    module.pack()
        return model.eval()

    def decode_attention(self) -> DecodeAttention | None:
        return cpu_ext.paged_decode_attention if self.cpp else None

    def lora_kernel(self, slot_dtype: torch.dtype, max_rank: int) -> str:
        if (
            self.cpp
            and slot_dtype in (torch.float32, torch.bfloat16, torch.float16)
            and 3 * max_rank <= cpu_ext.MAX_ROWS
        ):
            return LORA_CPP
        return LORA_PADDED


def select_backend(args: EngineArgs) -> Backend:
    """The backend ``args.device`` names (``auto``: the CPU until the CUDA backend lands)."""
    if args.device in ("auto", "cpu"):
        return CPUBackend(args)
    raise ValueError(
        f"device={args.device!r} is not supported by loraplex yet: the engine runs on the CPU "
        "(device='auto' or 'cpu')"
    )
