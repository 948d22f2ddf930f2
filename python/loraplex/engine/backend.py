"""The backend: chosen once, at engine start (``EngineArgs.device``), it owns the device, the
dtype, the KV cache tensors and the choice of kernels. Every other module asks it; none asks
which device it runs on.

- ``CPUBackend``: float32 by default; weights in oneDNN's packed layout, the C++ CPU ops for
  LoRA (``lora_apply``) and decode attention where they are built (AVX2), the torch paths
  elsewhere (or with ``LORAPLEX_CPU_KERNELS=torch``). Adapter kernels read the host tier's
  slots directly: a device slot is not a second copy on the CPU.
- ``CUDABackend``: weights, the paged KV cache (sized by ``gpu_memory_utilization`` of the
  device's memory, as vLLM does) and ``max_loras`` adapter slots on the GPU; the host tier in
  pinned memory, copied into device slots on a side stream that the step's compute waits on
  (the CPU never blocks on a copy); the SGMV kernels for every LoRA projection (the torch
  path if they cannot be built); paged attention through torch's SDPA. ``dtype="auto"`` is
  the checkpoint's 16-bit dtype (float16 for a float32 checkpoint, as vLLM).

``device="auto"`` is CUDA when torch sees a GPU, else the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loraplex.engine import host_memory
from loraplex.ops import cpu_ext

if TYPE_CHECKING:
    from loraplex.engine.arg_utils import EngineArgs
    from loraplex.model.config import ModelConfig
    from loraplex.model.llama import LlamaForCausalLM

DEVICES = ("auto", "cpu", "cuda")  # EngineArgs.device
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
    # adapter kernels read their own device slots (max_loras of them), which the plan's
    # loads fill from the host tier; without, they read the host tier's slots directly
    separate_device_slots = False
    pin_host_tier = False  # the host tier in pinned memory (asynchronous copies to a GPU)

    def __init__(self, args: EngineArgs, dtype: torch.dtype | None = None):
        self.args = args
        self.dtype = dtype or args.torch_dtype()
        self.lora_dtype = (
            self.dtype if args.lora_dtype in (None, "auto") else args.lora_torch_dtype()
        )
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

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A step's logits where the sampler runs (the CPU), in float32."""
        return t.float()

    def copy_slots(self, dst, src, loads: list[tuple[int, int]]) -> None:
        """Copies host slots into device slots, ``(device_slot, host_slot)`` each, before
        the step that reads them runs."""
        for slot, host_slot in loads:
            dst.copy_slot(src, host_slot, slot)

    def before_host_write(self) -> None:
        """Called before a loader thread overwrites a host slot: copies still reading one
        must be done."""


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

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return host_memory.zeros(shape, dtype)  # (the KV cache: on huge pages)

    def lora_kernel(self, slot_dtype: torch.dtype, max_rank: int) -> str:
        if (
            self.cpp
            and slot_dtype in (torch.float32, torch.bfloat16, torch.float16)
            and 3 * max_rank <= cpu_ext.MAX_ROWS
        ):
            return LORA_CPP
        return LORA_PADDED


class CUDABackend(Backend):
    name = "cuda"
    separate_device_slots = True
    pin_host_tier = True

    def __init__(self, args: EngineArgs, checkpoint_dtype: torch.dtype):
        dtype = None
        if args.dtype == "auto":  # the checkpoint's 16 bits; float16 for float32, as vLLM
            half = (torch.bfloat16, torch.float16)
            dtype = checkpoint_dtype if checkpoint_dtype in half else torch.float16
        super().__init__(args, dtype)
        if self.lora_dtype != self.dtype:
            raise ValueError(
                f"lora_dtype={args.lora_dtype!r} differs from the model's dtype {self.dtype} on "
                "CUDA: the SGMV kernels take one dtype (use lora_dtype='auto')"
            )
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        self.copies_done = torch.cuda.Event()

    def prepare_model(self, model: LlamaForCausalLM) -> LlamaForCausalLM:
        return model.to(self.device).eval()

    def num_kv_blocks(self, cfg: ModelConfig, max_model_len: int) -> int:
        """What ``gpu_memory_utilization`` of the device leaves after the weights (already
        loaded), the adapter slots and a reserve for activations and logits."""
        args = self.args
        if args.num_gpu_blocks_override is not None:
            return args.num_gpu_blocks_override
        if args.kv_cache_memory_bytes:
            budget = args.kv_cache_memory_bytes
        else:
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = int(total * args.gpu_memory_utilization)
            budget -= torch.cuda.memory_allocated(self.device)
            budget -= self.lora_slot_bytes(cfg) + self.activation_reserve(cfg)
        per_block = self.kv_bytes_per_token(cfg) * args.block_size
        if budget < per_block:
            raise ValueError(
                f"no room for the KV cache: gpu_memory_utilization={args.gpu_memory_utilization} "
                f"of the device leaves {budget} bytes after the weights and adapter slots "
                f"(a block needs {per_block})"
            )
        needed = math.ceil(args.max_num_seqs * max_model_len / args.block_size)
        return max(1, min(needed, budget // per_block))

    def lora_slot_bytes(self, cfg: ModelConfig) -> int:
        if not self.args.enable_lora:
            return 0
        from loraplex.lora.slots import slot_numel

        size = torch.finfo(self.lora_dtype).bits // 8
        return self.args.max_loras * slot_numel(cfg, self.args.max_lora_rank) * size

    def activation_reserve(self, cfg: ModelConfig) -> int:
        """A bound on a step's transient tensors: the widest activations of a full token
        budget, and float32 logits for every sequence."""
        args = self.args
        tokens = args.max_num_batched_tokens or max(2048, args.max_num_seqs)
        width = 2 * cfg.intermediate_size + cfg.hidden_size * 4
        size = torch.finfo(self.dtype).bits // 8
        return tokens * width * size * 4 + args.max_num_seqs * cfg.vocab_size * 4 + (256 << 20)

    def lora_kernel(self, slot_dtype: torch.dtype, max_rank: int) -> str:
        return LORA_SGMV  # ops dispatches CUDA tensors to the kernels when built

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.float().cpu()

    def copy_slots(self, dst, src, loads: list[tuple[int, int]]) -> None:
        if not loads:
            return
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)  # a slot being replaced may still be read
        with torch.cuda.stream(self.copy_stream):
            for slot, host_slot in loads:
                dst.copy_slot(src, host_slot, slot, non_blocking=True)
            self.copies_done.record(self.copy_stream)
        compute.wait_stream(self.copy_stream)  # the forward waits on the GPU, not the CPU

    def before_host_write(self) -> None:
        self.copies_done.synchronize()


def select_backend(args: EngineArgs, checkpoint_dtype: torch.dtype = torch.float32) -> Backend:
    """The backend ``args.device`` names; ``auto`` is CUDA when torch sees a GPU."""
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return CPUBackend(args)
    if args.device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda', but torch sees no CUDA device")
        return CUDABackend(args, checkpoint_dtype)
    raise ValueError(f"device={args.device!r} is not supported by loraplex: one of {DEVICES}")
