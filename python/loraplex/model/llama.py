"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat token batch with a paged KV
cache. q/k/v and gate/up are merged into single projections at load time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.model.attention import AttentionMetadata, paged_attention
from loraplex.model.config import ModelConfig
from loraplex.model.rope import RotaryEmbedding

if TYPE_CHECKING:
    from loraplex.lora.slots import LoRAContext


# checkpoint projection -> (the merged projection that carries it, its index in the merge);
# the loader merges weights by it, and LoRA slots stack adapter weights by it
PROJECTIONS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


class Linear(nn.Linear):
    """``nn.Linear`` whose weight can move into oneDNN's packed layout (:meth:`pack`). On this
    project's 2-core AVX2 machine, float32: 1.1-2.5x MKL's GEMM for the 1-32-row batches of
    decode (the 49k-row lm_head 1.8-4x), 8-12% slower at prefill sizes; over a whole serving
    run the same as keeping the plain weight for prefill, so the plain weight is dropped
    rather than kept twice."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
        # no longer read (a tied weight lives on in its other owner)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.rope = rope

    def forward(self, x, meta: AttentionMetadata, kv_cache, lora: LoRAContext | None):
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.apply(self.layer, "qkv_proj", x, qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope(meta.positions, q, k)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta).reshape(-1, self.q_size)
        out = self.o_proj(attn)
        if lora is not None:
            lora.apply(self.layer, "o_proj", attn, out)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoRAContext | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.apply(self.layer, "gate_up_proj", x, gate_up)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        h = F.silu(gate) * up
        out = self.down_proj(h)
        if lora is not None:
            lora.apply(self.layer, "down_proj", h, out)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x, meta, kv_cache, lora):
        x = x + self.self_attn(self.input_layernorm(x), meta, kv_cache, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        # built on the meta device by the loader; the tables are made for real afterwards
        self.rope_args = (cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        rope = RotaryEmbedding(*self.rope_args)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rope, i) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self, input_ids, meta: AttentionMetadata, kv_caches, lora: LoRAContext | None = None
    ):
        """input_ids: [T] -> final hidden states [T, hidden_size]. ``lora`` routes each
        token's rows through its adapter slot (None: base model only)."""
        x = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, meta, kv, lora)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
