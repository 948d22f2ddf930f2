"""Adapter slots reused by adapters of other targets and ranks: a slot holds exactly its last
adapter (zeros elsewhere), and a step's LoRA delta equals the float64 sum over each token's
adapter modules, including the merged projections a slot's adapter leaves out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex import LoRARequest
from loraplex.engine.backend import LORA_CPP, LORA_PADDED, LORA_SGMV
from loraplex.lora.adapter import LoRAAdapter, module_shape
from loraplex.lora.slots import GROUPS, LoRAContext, LoRASlots, slot_numel
from loraplex.ops import cpu_ext
from tiny_models import SLOT_CFG as CFG

MAX_RANK = 8
NUM_SLOTS = 3
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(seed: int, targets: list[str], rank: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(CFG.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = module_shape(CFG, module)
            a = torch.randn(rank, fan_in, generator=g)
            b = torch.randn(fan_out, rank, generator=g)
            weights[(layer, module)] = (a, b)
    return LoRAAdapter.from_weights(LoRARequest(f"s{seed}", seed + 1, "/nowhere"), weights)


def expected_slot(adapter: LoRAAdapter | None, layer: int, group: str, packed: bool = False):
    """A and B^T of one merged projection as the slot layout defines them, built from the
    module shapes alone: module i's A in rows i*R.., its B^T in those rows and its columns
    (``packed``: in rows 0..R of its columns)."""
    modules = GROUPS[group]
    fan_in = module_shape(CFG, modules[0])[0]
    outs = [module_shape(CFG, m)[1] for m in modules]
    a = torch.zeros(len(modules) * MAX_RANK, fan_in)
    bt = torch.zeros(len(modules) * MAX_RANK, sum(outs))
    for i, module in enumerate(modules):
        if adapter is None or (layer, module) not in adapter.weights:
            continue
        wa, wb = adapter.weights[(layer, module)]
        r = wa.shape[0]
        a[i * MAX_RANK : i * MAX_RANK + r] = wa
        col = sum(outs[:i])
        bt[i * MAX_RANK : i * MAX_RANK + r, col : col + outs[i]] = wb.T
    if packed:  # each module's block moved up to rows 0..R: the same columns, no overlap
        bt = sum(bt[i * MAX_RANK : (i + 1) * MAX_RANK] for i in range(len(modules)))
    return a, bt


adapters = st.builds(
    make_adapter,
    st.integers(0, 10_000),
    st.lists(st.sampled_from(MODULES), min_size=1, max_size=7, unique=True),
    st.integers(1, MAX_RANK),
)


@pytest.mark.parametrize(
    "packed",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not cpu_ext.available(), reason="packed slots are the C++ op's: not built here"
            ),
        ),
    ],
    ids=["block_diagonal", "packed"],
)
@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, NUM_SLOTS - 1), st.one_of(st.none(), adapters)),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.tuples(st.integers(0, 3), st.integers(-1, NUM_SLOTS - 1)), max_size=5),
)
def test_reused_slots_hold_exactly_their_adapter(packed, loads, segment_plan):
    kernel_of_slots = LORA_CPP if packed else LORA_SGMV
    slots = LoRASlots(CFG, NUM_SLOTS, MAX_RANK, torch.float32, kernel_of_slots)
    held: list[LoRAAdapter | None] = [None] * NUM_SLOTS
    for slot, adapter in loads:  # None: the slot is cleared (its adapter evicted)
        if adapter is None:
            slots.clear(slot)
        else:
            slots.load(slot, adapter)
        held[slot] = adapter
    for slot in range(NUM_SLOTS):
        for layer in range(CFG.num_hidden_layers):
            for group in GROUPS:
                a, bt = expected_slot(held[slot], layer, group, packed)
                assert torch.equal(slots.a[(layer, group)][slot], a), (slot, layer, group)
                assert torch.equal(slots.bt[(layer, group)][slot], bt), (slot, layer, group)

    # a step over segments of these slots (slot -1: base-model rows), each group applied
    segments, start = [], 0
    for length, slot in segment_plan:
        segments.append((start, length, slot))
        start += length
    kernels = (
        (LORA_CPP, LORA_PADDED, LORA_SGMV) if cpu_ext.available() else (LORA_PADDED, LORA_SGMV)
    )
    if packed:  # read by the C++ op only: the torch kernels take the block diagonal
        for kernel in (LORA_PADDED, LORA_SGMV):
            with pytest.raises(ValueError, match="packed"):
                LoRAContext(slots, segments, kernel)
        kernels = (LORA_CPP,)
    for kernel in kernels:
        ctx = LoRAContext(slots, segments, kernel)
        for layer in range(CFG.num_hidden_layers):
            for group, modules in GROUPS.items():
                fan_in = module_shape(CFG, modules[0])[0]
                outs = [module_shape(CFG, m)[1] for m in modules]
                xg = torch.randn(start, fan_in, dtype=torch.float64)
                want = torch.zeros(start, sum(outs), dtype=torch.float64)
                for s0, n, slot in segments:
                    adapter = held[slot] if slot >= 0 else None
                    for i, module in enumerate(modules):
                        if adapter is None or (layer, module) not in adapter.weights:
                            continue
                        wa, wb = (w.double() for w in adapter.weights[(layer, module)])
                        col = sum(outs[:i])
                        want[s0 : s0 + n, col : col + outs[i]] += xg[s0 : s0 + n] @ wa.T @ wb.T
                got = torch.zeros(start, sum(outs))
                ctx.apply(layer, group, xg.float(), got)
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def test_a_slot_out_of_range_is_refused_before_anything_is_written():
    slots = LoRASlots(CFG, NUM_SLOTS, MAX_RANK, torch.float32)
    adapter = make_adapter(1, ["q_proj"], 4)
    for slot in (NUM_SLOTS, -1):
        with pytest.raises(IndexError, match="out of range"):
            slots.load(slot, adapter)
    assert all(t.abs().sum() == 0 for t in [*slots.a.values(), *slots.bt.values()])


@pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc/self/smaps_rollup"
)
def test_host_slots_hold_their_memory_from_the_start():
    """The host tier (where the CPU backend's kernels read) is committed when it is made, as
    a device's slots are: no load pays a page fault while the model runs. 2,048 slots make
    every stacked tensor at least 2 MiB (the size above which slots map their own memory)."""
    num_slots = 2048
    before = _rss_kib()
    slots = LoRASlots(CFG, num_slots, MAX_RANK, torch.float32)
    grown = _rss_kib() - before
    assert grown >= slot_numel(CFG, MAX_RANK) * num_slots * 4 // 1024 * 15 // 16
    assert all(torch.count_nonzero(t) == 0 for t in [*slots.a.values(), *slots.bt.values()])


def _rss_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no Rss line")
