"""Adapter weights on the device: preallocated stacked tensors, one row per slot, padded to
``max_lora_rank``. Loading an adapter into a slot is a copy, never a reallocation."""

from __future__ import annotations

import torch

from loraplex import ops
from loraplex.lora.adapter import MODULES, LoRAAdapter, module_shape
from loraplex.model.config import ModelConfig
from loraplex.ops import cpu, cpu_ext

# the merged projections of model/llama.py, and the modules each one carries, in order
GROUPS: dict[str, list[str]] = {}
for _module, (_group, _) in MODULES.items():
    GROUPS.setdefault(_group, []).append(_module)


class LoRASlots:
    """Per layer and merged projection, the k modules it carries stacked: A
    ``[num_slots, k * R, in]`` (one shrink serves q, k and v) and B transposed, block
    diagonal, ``bt`` ``[num_slots, k * R, out_total]`` (module i's B^T in rows ``i*R..``,
    columns ``offset_i..``), so one expand writes all k outputs of the merged projection.
    ``bt.transpose(1, 2)`` is the ops contract's B ``[num_slots, out_total, k * R]``."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype):
        self.max_rank = max_rank
        # the C++ CPU op (float32, k * R within its per-token buffer), decided (and built)
        # once, at engine start
        self.cpp_ok = (
            dtype == torch.float32 and 3 * max_rank <= cpu_ext.MAX_ROWS and cpu_ext.available()
        )
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.bt: dict[tuple[int, str], torch.Tensor] = {}
        self.offsets: dict[str, list[int]] = {}
        self.splits: dict[str, list[int]] = {}  # offsets + [out_total]
        for group, modules in GROUPS.items():
            outs = [module_shape(cfg, m)[1] for m in modules]
            self.offsets[group] = [sum(outs[:i]) for i in range(len(outs))]
            self.splits[group] = [*self.offsets[group], sum(outs)]
            fan_in, k = module_shape(cfg, modules[0])[0], len(modules)
            for layer in range(cfg.num_hidden_layers):
                self.a[(layer, group)] = torch.zeros(num_slots, k * max_rank, fan_in, dtype=dtype)
                self.bt[(layer, group)] = torch.zeros(
                    num_slots, k * max_rank, sum(outs), dtype=dtype
                )

    def clear(self, slot: int) -> None:
        for t in (*self.a.values(), *self.bt.values()):
            t[slot].zero_()

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copies ``adapter`` into ``slot``; modules it does not target are zero."""
        self.clear(slot)
        r_max = self.max_rank
        for (layer, module), (a, b) in adapter.weights.items():
            group, index = MODULES[module]
            r, col = a.shape[0], index * r_max
            row = self.offsets[group][index]
            self.a[(layer, group)][slot, col : col + r].copy_(a)
            self.bt[(layer, group)][slot, col : col + r, row : row + b.shape[0]].copy_(b.T)


class LoRAContext:
    """One step's routing: the flat batch's segments and their slots. ``apply`` adds the LoRA
    delta of one merged projection, in place: ``out += expand(shrink(x, A[slot]), B[slot])``."""

    def __init__(self, slots: LoRASlots, segments: list[tuple[int, int, int]], on_cpu=True):
        self.slots = slots
        self.segments = [s for s in segments if s[2] >= 0]
        # the C++ op (float32, AVX2) when it is built; else the torch path, where short
        # segments (decode) take one batched GEMM per stage over a padded grid
        self.table = None
        self.layout = None
        if on_cpu and self.segments and slots.cpp_ok:
            self.table = cpu_ext.segment_table(self.segments)
        elif on_cpu:
            self.layout = cpu.padded_layout(self.segments)

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self.segments:
            return
        a, bt = self.slots.a[(layer, group)], self.slots.bt[(layer, group)]
        if self.table is not None:
            cpu_ext.lora_apply(x, a, bt, self.table, out, self.slots.splits[group])
            return
        b = bt.transpose(1, 2)
        if self.layout is not None:
            cpu.expand_padded(cpu.shrink_padded(x, a, self.layout), b, self.layout, out)
            return
        y = x.new_empty(x.shape[0], a.shape[1])
        ops.sgmv_shrink(x, a, self.segments, y)
        ops.sgmv_expand(y, b, self.segments, out)
