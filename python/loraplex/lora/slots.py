"""Adapter weights on the device: preallocated stacked tensors, one row per slot, padded to
``max_lora_rank``. Loading an adapter into a slot is a copy, never a reallocation."""

from __future__ import annotations

import torch

from loraplex import ops
from loraplex.engine import host_memory
from loraplex.engine.backend import LORA_CPP, LORA_PADDED, LORA_SGMV
from loraplex.lora.adapter import MODULES, Layout, LoRAAdapter, module_shape
from loraplex.model.config import ModelConfig
from loraplex.ops import cpu, cpu_ext

# the merged projections of model/llama.py, and the modules each one carries, in order
GROUPS: dict[str, list[str]] = {}
for _module, (_group, _) in MODULES.items():
    GROUPS.setdefault(_group, []).append(_module)


def slot_numel(cfg: ModelConfig, max_rank: int, packed: bool = False) -> int:
    """Elements one slot holds (A and B^T of every merged projection of every layer; B^T
    ``packed`` or block diagonal, see ``LoRASlots``)."""
    total = 0
    for modules in GROUPS.values():
        fan_in, k = module_shape(cfg, modules[0])[0], len(modules)
        out = sum(module_shape(cfg, m)[1] for m in modules)
        total += k * max_rank * fan_in + (1 if packed else k) * max_rank * out
    return total * cfg.num_hidden_layers


class LoRASlots:
    """Per layer and merged projection, the k modules it carries stacked: A
    ``[num_slots, k * R, in]`` (one shrink serves q, k and v) and B transposed, block
    diagonal, ``bt`` ``[num_slots, k * R, out_total]`` (module i's B^T in rows ``i*R..``,
    columns ``offset_i..``), so one expand writes all k outputs of the merged projection.
    ``bt.transpose(1, 2)`` is the ops contract's B ``[num_slots, out_total, k * R]``.

    For the C++ op (``LORA_CPP``) B^T is ``packed``: ``bt`` ``[num_slots, R, out_total]``,
    module i's B^T in rows ``0..R``, the same columns: the modules side by side, none of
    the block diagonal's zeros (a third of a q/k/v slot, half of a gate/up one), which cost
    memory and, read from memory, the bandwidth of the lines the prefetcher pulls in with
    each row."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        kernel: str = LORA_SGMV,
        device: torch.device | None = None,
        pin_memory: bool = False,
    ):
        """``dtype``: the weights' (``lora_dtype``); ``kernel``: the backend's choice of
        LoRA kernel for these slots (``backend.LORA_*``); ``device``: where they live (the
        host by default, pinned with ``pin_memory``)."""
        self.max_rank = max_rank
        self.dtype = dtype
        self.kernel = kernel
        self.packed = kernel == LORA_CPP
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.bt: dict[tuple[int, str], torch.Tensor] = {}
        self.offsets: dict[str, list[int]] = {}
        self.splits: dict[str, list[int]] = {}  # offsets + [out_total]
        for group, modules in GROUPS.items():
            outs = [module_shape(cfg, m)[1] for m in modules]
            self.offsets[group] = [sum(outs[:i]) for i in range(len(outs))]
            self.splits[group] = [*self.offsets[group], sum(outs)]
            fan_in, k = module_shape(cfg, modules[0])[0], len(modules)
            bt_rows = (1 if self.packed else k) * max_rank
            for layer in range(cfg.num_hidden_layers):
                for store, rows, width in (
                    (self.a, k * max_rank, fan_in),
                    (self.bt, bt_rows, sum(outs)),
                ):
                    shape = (num_slots, rows, width)
                    if (device is None or device.type == "cpu") and not pin_memory:
                        # committed now, as a device's slots are: a first load into a
                        # slot then takes no page faults while the model runs
                        store[(layer, group)] = host_memory.zeros(shape, dtype, populate=True)
                    else:
                        store[(layer, group)] = torch.zeros(
                            shape, dtype=dtype, device=device, pin_memory=pin_memory
                        )
        # per slot, the blocks written (``(layer, module) -> rank``): everything else in the
        # slot is zero, so a load clears only what the last occupant wrote and the new one
        # does not overwrite, and a step skips the merged projections a slot leaves empty
        self.written: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]
        self.groups: list[frozenset[str]] = [frozenset()] * num_slots
        self._plans: dict[Layout, tuple] = {}  # by layout: what a load writes (``_plan``)
        # the stacked tensors in one order (a then bt of each merged projection), for fills:
        # their addresses and the bytes of one slot (the tensors are never reallocated)
        self.device = next(iter(self.a.values())).device
        self.regions: dict[tuple[int, str], int] = {}
        self._addresses: list[tuple[int, int]] = []
        for key, a in self.a.items():
            self.regions[key] = len(self._addresses)
            for t in (a, self.bt[key]):
                self._addresses.append((t.data_ptr(), t.stride(0) * t.element_size()))

    def _zero(self, slot: int, layer: int, module: str, lo: int, hi: int) -> None:
        """Zeroes rows ``lo..hi`` of ``module``'s block in ``slot`` (layer ``layer``)."""
        group, index = MODULES[module]
        col, row = index * self.max_rank, self.offsets[group][index]
        end = self.splits[group][index + 1]
        self.a[(layer, group)][slot, col + lo : col + hi].zero_()
        bt_col = 0 if self.packed else col  # (packed: every module's B^T in rows 0..R)
        self.bt[(layer, group)][slot, bt_col + lo : bt_col + hi, row:end].zero_()

    def clear(self, slot: int) -> None:
        for (layer, module), r in self.written[slot].items():
            self._zero(slot, layer, module, 0, r)
        self.written[slot] = {}
        self.groups[slot] = frozenset()

    def copy_slot(self, src: LoRASlots, src_slot: int, slot: int, non_blocking=False) -> None:
        """Makes ``slot`` a copy of ``src``'s ``src_slot`` (a host slot into a device slot):
        every block, zeros included, so nothing of the previous occupant stays."""
        if src.packed != self.packed:
            raise ValueError("copy_slot: the slots' B^T layouts differ (packed / block diagonal)")
        for key, a in self.a.items():
            a[slot].copy_(src.a[key][src_slot], non_blocking=non_blocking)
            self.bt[key][slot].copy_(src.bt[key][src_slot], non_blocking=non_blocking)
        self.written[slot] = dict(src.written[src_slot])
        self.groups[slot] = src.groups[src_slot]

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copies ``adapter`` into ``slot`` from its file (one call, without the GIL: the
        scaling folded into B, each weight rounded to the slots' dtype); modules it does not
        target are zero. Host slots only (a device's are filled by ``copy_slot``)."""
        if not 0 <= slot < len(self.written):
            raise IndexError(f"slot {slot} out of range (0..{len(self.written) - 1})")
        new, groups, copies = self._plan(adapter.layout)
        for key, r_old in self.written[slot].items():
            if new.get(key, 0) < r_old:
                self._zero(slot, *key, new.get(key, 0), r_old)
        self.written[slot] = new  # (never changed in place: slots of one layout share it)
        self.groups[slot] = groups
        adapter.file.fill(self._slot_regions(slot), _DTYPE_NAMES[self.dtype], copies)

    def _plan(self, layout: Layout):
        """What a load of an adapter of ``layout`` writes (blocks and ranks, merged
        projections) and the fill's copies: the same for every adapter of one recipe, so
        planned once per layout (a load's Python work was most of its GIL time)."""
        plan = self._plans.get(layout)
        if plan is not None:
            return plan
        r_max, copies = self.max_rank, []
        for m in layout.modules:
            layer, module = m.key
            group, index = MODULES[module]
            col, row = index * r_max, self.offsets[group][index]
            dst = self.regions[(layer, group)]
            fan_in, width = self.a[(layer, group)].shape[2], self.bt[(layer, group)].shape[2]
            copies.append((m.a, dst, col * fan_in, fan_in, False, 1.0))
            bt_col = 0 if self.packed else col
            copies.append((m.b, dst + 1, bt_col * width + row, width, True, m.scale))
        written = {m.key: m.rank for m in layout.modules}
        groups = frozenset(MODULES[module][0] for _, module in written)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[layout] = plan = (written, groups, copies)
        return plan

    def _slot_regions(self, slot: int) -> list[tuple[int, int]]:
        """(address, bytes) of ``slot`` in every stacked tensor, in ``regions``' order."""
        if self.device.type != "cpu":
            raise RuntimeError(f"slots on {self.device} are filled by copy_slot, not load")
        return [(address + slot * size, size) for address, size in self._addresses]


_MAX_PLANS = 64  # as the layouts the loader keeps
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class LoRAContext:
    """One step's routing: the flat batch's segments and their slots. ``apply`` adds the LoRA
    delta of one merged projection, in place: ``out += expand(shrink(x, A[slot]), B[slot])``.
    A merged projection runs only the segments whose slot's adapter targets it (an adapter
    on q/k/v/o reads no MLP weights: zeros cost as much memory traffic as weights)."""

    def __init__(
        self, slots: LoRASlots, segments: list[tuple[int, int, int]], kernel: str | None = None
    ):
        """``kernel``: the slots' (the backend's choice) unless given."""
        self.slots = slots
        kernel = kernel or slots.kernel
        if slots.packed and kernel != LORA_CPP:
            raise ValueError(f"slots with packed B^T are read by the C++ op only, not {kernel}")
        self.segments = [s for s in segments if s[2] >= 0]
        self.routes: dict[str, _Route] = {}
        built: dict[tuple, _Route] = {}  # groups with the same segments share one route
        for group in GROUPS:
            segs = tuple(s for s in self.segments if group in slots.groups[s[2]])
            if segs not in built:
                built[segs] = _Route(list(segs), kernel)
            self.routes[group] = built[segs]

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        route = self.routes[group]
        if not route.segments:
            return
        a, bt = self.slots.a[(layer, group)], self.slots.bt[(layer, group)]
        if route.table is not None:
            cpu_ext.lora_apply(x, a, bt, route.table, out, self.slots.splits[group])
            return
        if a.dtype != x.dtype:  # weights kept narrower than the activations (lora_dtype)
            a, bt = a.to(x.dtype), bt.to(x.dtype)
        b = bt.transpose(1, 2)
        if route.layout is not None:
            cpu.expand_padded(cpu.shrink_padded(x, a, route.layout), b, route.layout, out)
            return
        y = x.new_empty(x.shape[0], a.shape[1])
        ops.sgmv_shrink(x, a, route.segments, y)
        ops.sgmv_expand(y, b, route.segments, out)


class _Route:
    """The segments one merged projection runs, and the kernel's form of them: the C++ op's
    table (``LORA_CPP``); a padded grid where short segments (decode) take one batched GEMM
    per stage (``LORA_PADDED``, when the segments suit it); else the per-segment SGMV."""

    def __init__(self, segments: list[tuple[int, int, int]], kernel: str):
        self.segments = segments
        self.table = None
        self.layout = None
        if segments and kernel == LORA_CPP:
            self.table = cpu_ext.segment_table(segments)
        elif segments and kernel == LORA_PADDED:
            self.layout = cpu.padded_layout(segments)
