"""The model's shape, read from a Hugging Face ``config.json`` (transformers 4 and 5 forms)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    dtype: torch.dtype
    raw: dict[str, Any]
    # the engine's side, as vLLM's ModelConfig has it (set when an engine is made from args)
    max_model_len: int = 0
    model: str = ""  # the model as the engine was given it (a folder or a hub id)

    # vLLM's accessors (the parallel config is accepted and means nothing here: one device)

    @property
    def hf_config(self) -> SimpleNamespace:
        """``config.json``'s fields as attributes (a namespace, not a transformers
        ``PretrainedConfig``)."""
        return SimpleNamespace(**self.raw)

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_hidden_size(self) -> int:
        return self.hidden_size

    def get_head_size(self) -> int:
        return self.head_dim

    def get_num_layers(self, parallel_config: Any = None) -> int:
        return self.num_hidden_layers

    def get_num_attention_heads(self, parallel_config: Any = None) -> int:
        return self.num_attention_heads

    def get_num_kv_heads(self, parallel_config: Any = None) -> int:
        return self.num_key_value_heads

    def get_total_num_kv_heads(self) -> int:
        return self.num_key_value_heads

    def get_sliding_window(self) -> int | None:
        return self.sliding_window

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> ModelConfig:
        archs = c.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or c.get('model_type')!r}: loraplex "
                f"serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: loraplex implements 'silu'")
        heads = c["num_attention_heads"]
        hidden = c["hidden_size"]
        # transformers 5 writes rope_parameters; hub checkpoints keep rope_theta/rope_scaling
        rope = dict(c.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
        scaling = c.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(c.get("attention_bias", False))
        window = c.get("sliding_window")
        if qwen2 and not c.get("use_sliding_window", False):
            window = None
        dtype_name = c.get("dtype") or c.get("torch_dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(c.get("mlp_bias", False)),
            sliding_window=window,
            dtype=getattr(torch, str(dtype_name).replace("torch.", ""), torch.float32),
            raw=c,
        )
