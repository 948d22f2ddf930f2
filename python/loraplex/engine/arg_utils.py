"""``EngineArgs``: vLLM's engine arguments by vLLM's names and defaults (``arg_utils``).

Every argument vLLM's ``EngineArgs`` has is a field. The ones loraplex acts on are declared
below; the rest (``vllm_args.INERT`` / ``REFUSED``) are accepted because they mean nothing on
this backend, or refused at any value but vLLM's default with an error naming them and why.
An unknown name is a ``TypeError`` that suggests the nearest known one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.engine.vllm_args import INERT, REFUSED

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# values of refused arguments that ask for what loraplex does anyway
_SAME_AS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "task": ("generate",),
    "runner": ("generate",),
    "convert": ("none",),
    "load_format": ("safetensors",),
    "config_format": ("hf",),
    "tokenizer_mode": ("hf",),
    "tensor_parallel_size": (None,),
    "pipeline_parallel_size": (None,),
    "data_parallel_size": (None,),
}

# KV cache on the host: the budget vLLM's CPU backend uses by default (VLLM_CPU_KVCACHE_SPACE)
DEFAULT_KV_CACHE_BYTES = 4 << 30


@dataclass
class _Honoured:
    """The arguments loraplex acts on."""

    model: str = ""
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int | None = 0  # None: a random seed
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # None: 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool | None = None  # False: prompts are never split
    block_size: int | None = None  # None: 16
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None  # the KV cache's block count, on any device
    max_logprobs: int = 20  # -1: the whole vocabulary
    # "priority": lower ``priority`` runs first; "fair": loraplex's share across adapters
    # and tenants (a request's ``tenant=``, the server's ``user``)
    scheduling_policy: str = "fcfs"
    # loraplex, with "fair": a client's share weight, by name (an adapter's or a tenant's)
    # or an adapter's lora_int_id (0: the base model); 1 for any other
    fair_share_weights: dict[str | int, float] | None = None
    enable_prefix_caching: bool | None = None  # None: on, as vLLM V1
    device: str = "auto"  # "auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda"
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    lora_dtype: str | torch.dtype | None = "auto"  # "auto": the model's dtype
    max_skipped_steps: int = 32  # loraplex: passes over a waiting adapter before it drains
    lora_loader_threads: int = 2  # loraplex: threads reading adapters off the step thread
    # loraplex: folders an adapter beneath one is read beneath (links out refused); the
    # server's --lora-root
    lora_root: list[str] | None = None
    lora_read_timeout: float = 60.0  # loraplex: seconds one adapter's whole read may take
    lora_cache_dir: str | None = None  # loraplex: object-store adapters' cache (~/.cache)
    lora_cache_max_bytes: int = 16 << 30  # loraplex: that cache's bound
    # structured outputs: vLLM's config (a dict or its JSON text) and its older flags
    structured_outputs_config: dict | str | None = None
    guided_decoding_backend: str | None = "auto"
    guided_decoding_disable_fallback: bool | None = None
    guided_decoding_disable_any_whitespace: bool | None = None
    guided_decoding_disable_additional_properties: bool | None = None


_EXTRA = [
    (name, Any, dataclasses.field(default=default))
    for table in (INERT, REFUSED)
    for name, (default, _) in table.items()
]


def _engine_args_base() -> type:
    return dataclasses.make_dataclass("_AllArgs", _EXTRA, bases=(_Honoured,))


@dataclass(init=False)
class EngineArgs(_engine_args_base()):  # type: ignore[misc]
    """Arguments for ``LLMEngine`` / ``LLM``, vLLM's names and defaults.

    Honoured: model, served_model_name, tokenizer, dtype, seed (None: random), max_model_len,
    max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, block_size,
    kv_cache_memory_bytes, num_gpu_blocks_override, max_logprobs, scheduling_policy,
    enable_prefix_caching (None: on, as vLLM V1), device
    ("auto"/"cpu"), enable_lora, max_loras, max_lora_rank, max_cpu_loras, lora_dtype
    ("auto" or the model dtype); loraplex's own: max_skipped_steps, lora_loader_threads.

    Accepted with any value, meaning nothing on this backend: ``vllm_args.INERT`` (for
    example gpu_memory_utilization, enforce_eager, swap_space, trust_remote_code,
    disable_log_stats), each with its reason.

    Refused unless at vLLM's default: ``vllm_args.REFUSED`` (for example
    tensor_parallel_size=2, quantization, kv_cache_dtype, speculative decoding), each error
    naming the argument and why.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for name in kwargs:
            if name not in known:
                near = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise TypeError(f"EngineArgs got an unknown argument {name!r}{hint}")
        super().__init__(*args, **kwargs)
        self.__post_init__()  # the generated base __init__ does not know of it

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a model folder or hub repo id")
        if self.max_num_seqs is None:
            self.max_num_seqs = 256
        if self.block_size is None:
            self.block_size = 16
        if isinstance(self.lora_root, str):
            self.lora_root = [self.lora_root]
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = True

    def torch_dtype(self) -> torch.dtype:
        """``auto`` is float32: the CPU path computes in float32 unless told otherwise."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype == "auto":
            return torch.float32
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        return _DTYPES[self.dtype]

    def lora_torch_dtype(self) -> torch.dtype:
        """The adapter slots' dtype: ``auto`` is the model's. A float32 model may keep its
        adapters in bfloat16 or float16 (half the bytes a decode step reads; the products
        stay float32); a 16-bit model keeps them in its own dtype."""
        dtype = self.torch_dtype()
        lora = self.lora_dtype
        if lora in (None, "auto"):
            return dtype
        lora = lora if isinstance(lora, torch.dtype) else _DTYPES.get(lora)
        if lora == dtype or (dtype == torch.float32 and lora in (torch.bfloat16, torch.float16)):
            return lora
        raise ValueError(
            f"lora_dtype={self.lora_dtype!r} is not supported with dtype {dtype}: use 'auto' "
            "(the model's), or with a float32 model 'bfloat16' or 'float16'"
        )

    def structured_outputs_defaults(self) -> dict[str, bool]:
        """The engine-wide structured-output options (``disable_any_whitespace``,
        ``disable_additional_properties``, each OR'd with a request's own), from
        ``structured_outputs_config`` and the ``guided_decoding_*`` flags; a ``ValueError``
        naming a backend other than llguidance or a key loraplex does not honour."""
        cfg: Any = self.structured_outputs_config or {}
        if isinstance(cfg, str):
            try:
                cfg = json.loads(cfg)
            except ValueError as e:
                raise ValueError(f"structured_outputs_config is not JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"structured_outputs_config must be a dict, got {cfg!r:.100}")
        known = {
            "backend",
            "disable_fallback",
            "disable_any_whitespace",
            "disable_additional_properties",
        }
        for key, value in cfg.items():
            if key not in known and value not in (None, "", False):
                raise ValueError(
                    f"structured_outputs_config.{key} is not supported by loraplex (it reads "
                    f"{', '.join(sorted(known))})"
                )
        backend = cfg.get("backend") or self.guided_decoding_backend or "auto"
        if backend not in ("auto", "guidance", "llguidance"):
            raise ValueError(
                f"structured outputs backend {backend!r} is not supported by loraplex: its "
                "grammar backend is llguidance ('guidance' or 'auto')"
            )
        return {
            name: bool(cfg.get(name) or getattr(self, f"guided_decoding_{name}"))
            for name in ("disable_any_whitespace", "disable_additional_properties")
        }

    def verify(self) -> None:
        """Raises ``ValueError`` naming the first argument that cannot be served."""
        self.structured_outputs_defaults()
        for name, (default, why) in REFUSED.items():
            value = getattr(self, name)
            if value in _SAME_AS_DEFAULT.get(name, ()):
                continue
            if value != default and not (value is None and default in ("auto", "")):
                raise ValueError(f"{name}={value!r} is not supported by loraplex: {why}")
        positive = ("max_num_seqs", "block_size", "max_loras", "max_lora_rank")
        for name in (*positive, "lora_loader_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lora_read_timeout, (int, float)) and self.lora_read_timeout > 0):
            raise ValueError(
                f"lora_read_timeout must be a positive number, got {self.lora_read_timeout!r}"
            )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 or >= 0, got {self.max_logprobs!r}")
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
            raise ValueError(f"seed must be an int within 64 bits or None, got {seed!r}")
        for client, weight in (self.fair_share_weights or {}).items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                raise ValueError(
                    f"fair_share_weights[{client!r}] must be a positive number, got {weight!r}"
                )
        if self.scheduling_policy not in ("fcfs", "priority", "fair"):
            raise ValueError(
                "scheduling_policy must be 'fcfs', 'priority' or 'fair', got "
                f"{self.scheduling_policy!r}"
            )
        from loraplex.engine.backend import DEVICES

        if self.device not in DEVICES:
            raise ValueError(
                f"device={self.device!r} is not supported by loraplex: one of {DEVICES}"
            )
        util = self.gpu_memory_utilization
        if not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        self.lora_torch_dtype()

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Adds ``--<name>`` for every honoured argument (vLLM's flag spellings)."""
        for f in dataclasses.fields(_Honoured):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "lora_root":
                continue  # the server's --lora-root (repeatable) sets it
            if f.name == "model":
                parser.add_argument(flag, type=str, default=None, help="model folder or hub id")
            elif str(f.type).startswith("dict"):
                parser.add_argument(flag, type=json.loads, default=f.default, help="JSON")
            elif f.type in ("bool", "bool | None"):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            else:
                kind = int if "int" in str(f.type) and "str" not in str(f.type) else str
                kind = float if str(f.type) == "float" else kind
                parser.add_argument(flag, type=_nullable(kind), default=f.default)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The ``EngineArgs`` named by parsed CLI arguments (unknown attributes ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _nullable(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text in ("", "None") else kind(text)

    parse.__name__ = kind.__name__
    return parse


@dataclass(init=False)
class AsyncEngineArgs(EngineArgs):
    """vLLM's ``AsyncEngineArgs``: the same arguments, for ``AsyncLLM``."""
