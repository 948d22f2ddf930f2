"""Adapter weights on the device: preallocated stacked tensors, one row per slot, padded to
``max_lora_rank``. Loading an adapter into a slot is a copy, never a reallocation."""

from __future__ import annotations

import torch

from loraplex import ops
from loraplex.lora.adapter import MODULES, LoRAAdapter, module_shape
from loraplex.model.config import ModelConfig
from loraplex.ops import cpu

# the merged projections of model/llama.py, and the modules each one carries, in order
GROUPS: dict[str, list[str]] = {}
for _module, (_group, _) in MODULES.items():
    GROUPS.setdefault(_group, []).append(_module)


class LoRASlots:
    """Per layer and merged projection: A ``[num_slots, k * R, in]`` (the k modules' A stacked,
    so one shrink serves q, k and v) and, per module, B ``[num_slots, out, R]``."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype):
        self.max_rank = max_rank
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], list[tuple[torch.Tensor, int]]] = {}
        for layer in range(cfg.num_hidden_layers):
            for group, modules in GROUPS.items():
                fan_in = module_shape(cfg, modules[0])[0]
                self.a[(layer, group)] = torch.zeros(
                    num_slots, len(modules) * max_rank, fan_in, dtype=dtype
                )
                offset, bs = 0, []
                for m in modules:
                    fan_out = module_shape(cfg, m)[1]
                    bs.append((torch.zeros(num_slots, fan_out, max_rank, dtype=dtype), offset))
                    offset += fan_out
                self.b[(layer, group)] = bs

    def clear(self, slot: int) -> None:
        for a in self.a.values():
            a[slot].zero_()
        for bs in self.b.values():
            for b, _ in bs:
                b[slot].zero_()

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copies ``adapter`` into ``slot``; modules it does not target are zero."""
        self.clear(slot)
        r_max = self.max_rank
        for (layer, module), (a, b) in adapter.weights.items():
            group, index = MODULES[module]
            r = a.shape[0]
            self.a[(layer, group)][slot, index * r_max : index * r_max + r].copy_(a)
            self.b[(layer, group)][index][0][slot, :, :r].copy_(b)


class LoRAContext:
    """One step's routing: the flat batch's segments and their slots. ``apply`` adds the LoRA
    delta of one merged projection, in place: ``out += expand(shrink(x, A[slot]), B[slot])``."""

    def __init__(self, slots: LoRASlots, segments: list[tuple[int, int, int]], on_cpu=True):
        self.slots = slots
        self.segments = [s for s in segments if s[2] >= 0]
        # short segments (decode): one batched GEMM per stage over a padded grid
        self.layout = cpu.padded_layout(self.segments) if on_cpu else None

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self.segments:
            return
        a = self.slots.a[(layer, group)]
        r = self.slots.max_rank
        bs = self.slots.b[(layer, group)]
        if self.layout is not None:
            y = cpu.shrink_padded(x, a, self.layout)
            for i, (b, offset) in enumerate(bs):
                cpu.expand_padded(y[:, :, i * r : (i + 1) * r], b, self.layout, out, offset)
            return
        y = x.new_empty(x.shape[0], a.shape[1])
        ops.sgmv_shrink(x, a, self.segments, y)
        for i, (b, offset) in enumerate(bs):
            ops.sgmv_expand(y[:, i * r : (i + 1) * r], b, self.segments, out, offset)
