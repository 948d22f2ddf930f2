"""SGMV / BGMV: each implementation against the float64 reference, on shapes drawn by
hypothesis (input and output 16..4096, ranks 1..64, up to 16 segments, empty ones and slot -1
among them)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.ops import cpu, cpu_ext, reference

# per dtype: (rtol, atol) against the float64 oracle, for inputs of unit scale
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 1e-2)}


@st.composite
def problems(draw):
    fan_in = draw(st.integers(16, 4096))
    fan_out = draw(st.integers(16, 4096))
    rank = draw(st.integers(1, 64))
    num_slots = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=16))
    slots = draw(
        st.lists(st.integers(-1, num_slots - 1), min_size=len(lengths), max_size=len(lengths))
    )
    dtype = draw(st.sampled_from(list(TOL)))
    seed = draw(st.integers(0, 2**16))
    return fan_in, fan_out, rank, num_slots, lengths, slots, dtype, seed


def back_to_back(lengths, slots):
    """``(start, length, slot)`` segments laid end to end, and the rows they cover."""
    segments, start = [], 0
    for n, s in zip(lengths, slots):
        segments.append((start, n, s))
        start += n
    return segments, start


def make(problem):
    fan_in, fan_out, rank, num_slots, lengths, slots, dtype, seed = problem
    g = torch.Generator().manual_seed(seed)
    segments, total = back_to_back(lengths, slots)
    x = torch.randn(total, fan_in, generator=g).to(dtype)
    a = (torch.randn(num_slots, rank, fan_in, generator=g) / fan_in**0.5).to(dtype)
    b = (torch.randn(num_slots, fan_out, rank, generator=g) / rank**0.5).to(dtype)
    return x, a, b, segments, total


def check(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


@settings(max_examples=60)
@given(problems())
def test_sgmv_cpu_matches_reference(problem):
    x, a, b, segments, total = make(problem)
    dtype, rank = x.dtype, a.shape[1]
    y_ref = torch.full((total, rank), 7.0, dtype=dtype)
    y = torch.full((total, rank), 7.0, dtype=dtype)
    reference.sgmv_shrink(x, a, segments, y_ref)
    cpu.sgmv_shrink(x, a, segments, y)
    check(y, y_ref, dtype)
    offset = 3
    base = torch.randn(total, offset + b.shape[1] + 2).to(dtype)
    out_ref, out = base.clone(), base.clone()
    reference.sgmv_expand(y_ref, b, segments, out_ref, offset)
    cpu.sgmv_expand(y_ref, b, segments, out, offset)
    check(out, out_ref, dtype)
    # columns outside [offset, offset + O) and rows of slot -1 segments are untouched
    assert torch.equal(out[:, :offset], base[:, :offset])
    for start, n, slot in segments:
        if slot < 0:
            assert torch.equal(out[start : start + n], base[start : start + n])


@settings(max_examples=60)
@given(problems())
def test_bgmv_cpu_matches_reference(problem):
    x, a, b, segments, total = make(problem)
    dtype, rank = x.dtype, a.shape[1]
    slots = torch.tensor([s for start, n, s in segments for _ in range(n)], dtype=torch.long)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(1))
    x, slots = x[perm], slots[perm]  # interleaved adapters: the decode case
    y_ref, y = torch.empty(total, rank, dtype=dtype), torch.empty(total, rank, dtype=dtype)
    reference.bgmv_shrink(x, a, slots, y_ref)
    cpu.bgmv_shrink(x, a, slots, y)
    check(y, y_ref, dtype)
    base = torch.randn(total, b.shape[1]).to(dtype)
    out_ref, out = base.clone(), base.clone()
    reference.bgmv_expand(y_ref, b, slots, out_ref)
    cpu.bgmv_expand(y_ref, b, slots, out)
    check(out, out_ref, dtype)


def test_reference_is_independent_of_the_loop():
    """The oracle itself against a dense computation: one-hot slot selection, no loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    slots = torch.tensor([2, 2, -1, 0, 1, 1])
    y = torch.empty(6, 2, dtype=torch.float64)
    reference.bgmv_shrink(x, a, slots, y)
    dense = torch.einsum("ti,sri->tsr", x, a)  # every token through every slot
    want = torch.stack(
        [
            dense[t, s] if s >= 0 else torch.zeros(2, dtype=torch.float64)
            for t, s in enumerate(slots.tolist())
        ]
    )
    torch.testing.assert_close(y, want)


@settings(max_examples=60)
@given(problems())
def test_padded_grid_path_matches_reference(problem):
    """The CPU decode path: segments on a padded grid, one batched GEMM per stage."""
    x, a, b, segments, total = make(problem)
    dtype, rank = x.dtype, a.shape[1]
    layout = cpu.padded_layout(segments, max_waste=float("inf"))
    used = [s for _, n, s in segments if s >= 0 and n > 0]
    if layout is None:  # no adapter rows, or a slot in several segments: the loop's case
        assert not used or len(set(used)) < len(used)
        return
    y_ref = torch.empty(total, rank, dtype=dtype)
    reference.sgmv_shrink(x, a, segments, y_ref)
    y_grid = cpu.shrink_padded(x, a, layout)
    check(y_grid[layout.valid], y_ref[layout.rows], dtype)
    base = torch.randn(total, b.shape[1] + 2).to(dtype)
    out_ref, out = base.clone(), base.clone()
    reference.sgmv_expand(y_ref, b, segments, out_ref, 1)
    grid_y = torch.zeros_like(y_grid)
    grid_y[layout.valid] = y_ref[layout.rows]
    cpu.expand_padded(grid_y, b, layout, out, 1)
    check(out, out_ref, dtype)


def test_dense_grid_is_a_view_and_matches_reference():
    """Back-to-back equal segments on consecutive slots (e.g. one adapter for everything):
    no gather, the expand accumulates into ``out`` in place."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 32, generator=g)
    a = torch.randn(4, 8, 32, generator=g)
    b = torch.randn(4, 24, 8, generator=g)
    segments = [(0, 3, -1), (3, 4, 1), (7, 4, 2)]
    layout = cpu.padded_layout(segments)
    assert layout is not None and layout.dense_start == 3
    y_ref = torch.empty(11, 8)
    reference.sgmv_shrink(x, a, segments, y_ref)
    y = cpu.shrink_padded(x, a, layout)
    check(y.reshape(-1, 8), y_ref[3:], torch.float32)
    base = torch.randn(11, 24, generator=g)
    out_ref, out = base.clone(), base.clone()
    reference.sgmv_expand(y_ref, b, segments, out_ref)
    cpu.expand_padded(y, b, layout, out)
    check(out, out_ref, torch.float32)
    assert cpu.padded_layout([(0, 4, 1), (4, 3, 2)]).dense_start is None  # unequal lengths
    assert cpu.padded_layout([(0, 4, 1), (4, 4, 3)], max_waste=9).dense_start is None  # slot gap


needs_avx2 = pytest.mark.skipif(not cpu_ext.supported_cpu(), reason="CPU without AVX2")


@pytest.fixture(scope="module")
def cpp_ops():
    """The C++ ops, built and loaded (on an AVX2 CPU they must be)."""
    assert cpu_ext.available()


@needs_avx2
def test_cpp_ops_are_built_here():
    assert cpu_ext.available()


@st.composite
def merged_problems(draw):
    """A merged projection: k modules (1..3) of their own widths sharing one input."""
    fan_in = draw(st.integers(16, 4096))
    outs = draw(st.lists(st.integers(16, 2048), min_size=1, max_size=3))
    rank = draw(st.integers(1, 64))
    num_slots = draw(st.integers(1, 4))
    # lengths from 128 take the BLAS path, shorter ones the AVX2 work items (blocks of 4)
    lengths = draw(st.lists(st.integers(0, 140), min_size=1, max_size=16))
    slots = draw(
        st.lists(st.integers(-1, num_slots - 1), min_size=len(lengths), max_size=len(lengths))
    )
    # the engine calls it in inference mode, which its worker threads must share
    inference = draw(st.booleans())
    # the weights' dtype (lora_dtype): 16-bit weights widen to float32 as the kernels load them
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    # B^T block diagonal [S, kR, O], or packed [S, R, O] (the modules side by side in R rows)
    packed = draw(st.booleans())
    return fan_in, outs, rank, num_slots, lengths, slots, inference, dtype, seed, packed


@needs_avx2
@pytest.mark.parametrize("wide", [False, True], ids=["avx2", "avx512"])
@settings(max_examples=60)
@given(merged_problems())
def test_cpp_lora_apply_matches_reference(cpp_ops, wide, problem):
    """Both kernel widths: AVX2, and AVX-512 where the CPU has it (the default there)."""
    if cpu_ext.set_wide(wide) != wide:
        pytest.skip("CPU without AVX-512: only the AVX2 kernels run here")
    try:
        _check_lora_apply(problem)
    finally:
        cpu_ext.set_wide(True)  # the default: AVX-512 where the CPU has it


def _check_lora_apply(problem):
    fan_in, outs, rank, num_slots, lengths, slots, inference, dtype, seed, packed = problem
    g = torch.Generator().manual_seed(seed)
    segments, total = back_to_back(lengths, slots)
    k = len(outs)
    splits = [sum(outs[:i]) for i in range(k + 1)]
    # x with a row stride wider than its rows, as a view of a bigger buffer
    x = torch.randn(total, fan_in + 3, generator=g)[:, :fan_in]
    a = torch.randn(num_slots, k * rank, fan_in, generator=g) / fan_in**0.5
    # off the diagonal blocks: NaN, which would poison any output that read it
    bt = torch.full((num_slots, k * rank, splits[-1]), float("nan"))
    for i in range(k):
        rows, cols = slice(i * rank, (i + 1) * rank), slice(splits[i], splits[i + 1])
        bt[:, rows, cols] = torch.randn(num_slots, rank, outs[i], generator=g) / rank**0.5
    # the reference reads the weights as the kernel holds them: rounded to dtype, exactly
    a, bt = a.to(dtype).float(), bt.to(dtype).float()
    base = torch.randn(total, splits[-1], generator=g)
    want = base.clone()
    for i in range(k):
        rows, cols = slice(i * rank, (i + 1) * rank), slice(splits[i], splits[i + 1])
        y = torch.empty(total, rank)
        reference.sgmv_shrink(x, a[:, rows], segments, y)
        reference.sgmv_expand(y, bt[:, rows, cols].transpose(1, 2), segments, want, splits[i])
    if packed:  # the same blocks side by side in rows 0..R: nothing off them to read
        bt = torch.cat(
            [bt[:, i * rank : (i + 1) * rank, splits[i] : splits[i + 1]] for i in range(k)], 2
        )
    with torch.inference_mode(inference):
        got = base.clone()
        table = cpu_ext.segment_table(segments)
        cpu_ext.lora_apply(x, a.to(dtype), bt.to(dtype), table, got, splits)
    check(got, want, torch.float32)
    for start, n, slot in segments:
        if slot < 0:
            assert torch.equal(got[start : start + n], base[start : start + n])


@needs_avx2
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(4, 8, dtype=torch.float64)), "float32"),
        (dict(segments=[(2, 3, 0)]), r"segment 0 \(2, 3\) runs outside the 4 rows"),
        (dict(segments=[(0, 4, 2)]), "segment 0 names slot 2 of 2"),
        (dict(splits=[0, 5, 7]), "splits must run 0..6"),
        (dict(a=torch.zeros(2, 4, 9)), "shapes disagree"),
        (dict(bt=torch.zeros(2, 3, 6)), r"shapes disagree.*packed \[S, R, O\]"),
        (dict(a=torch.zeros(2, 4, 8, dtype=torch.bfloat16)), "a and bt must share one dtype"),
        (
            dict(a=torch.zeros(2, 4, 8, dtype=torch.int16), bt=torch.zeros(2, 4, 6).short()),
            "float32, bfloat16 or float16",
        ),
    ],
)
def test_cpp_lora_apply_names_bad_inputs(cpp_ops, change, message):
    args = dict(
        x=torch.zeros(4, 8),
        a=torch.zeros(2, 4, 8),
        bt=torch.zeros(2, 4, 6),
        segments=[(0, 4, 1)],
        out=torch.zeros(4, 6),
        splits=[0, 2, 6],
    )
    args.update(change)
    args["segments"] = cpu_ext.segment_table(args["segments"])
    with pytest.raises(RuntimeError, match=message):
        cpu_ext.lora_apply(**args)


def test_cpp_op_falls_back_to_torch_with_one_warning(monkeypatch):
    """No compiler (the build raises): one warning naming the cause, the torch path serves."""

    def no_compiler(*args, **kwargs):
        raise FileNotFoundError("c++: not found")

    monkeypatch.setattr(cpu_ext, "build", no_compiler)
    monkeypatch.setattr(cpu_ext, "supported_cpu", lambda: True)
    monkeypatch.setattr(cpu_ext, "_state", {})
    cause = r"C\+\+ CPU LoRA kernels unavailable \(FileNotFoundError: c\+\+: not found\)"
    with pytest.warns(RuntimeWarning, match=cause):
        assert cpu_ext.available() is False
    assert cpu_ext.available() is False  # remembered: no second build, no second warning
    monkeypatch.setattr(cpu_ext, "_state", {"ok": True})
    monkeypatch.setenv("LORAPLEX_CPU_KERNELS", "torch")
    assert cpu_ext.available() is False


@st.composite
def decode_attention_problems(draw):
    num_kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 80))  # tails past the 8- and 16-lane loops included
    lengths = draw(st.lists(st.integers(1, 70), min_size=1, max_size=6))
    window = draw(st.none() | st.integers(1, 80))
    return num_kv, group, head_dim, lengths, window, draw(st.integers(0, 2**16))


@needs_avx2
@settings(max_examples=60)
@given(decode_attention_problems())
def test_cpp_decode_attention_matches_reference(cpp_ops, problem):
    """Against float64 softmax attention over each sequence's keys, which sit at scattered
    cache slots; grouped-query heads, sliding windows, query rows in any order."""
    num_kv, group, head_dim, lengths, window, seed = problem
    g = torch.Generator().manual_seed(seed)
    heads, batch, longest = num_kv * group, len(lengths), max(lengths)
    num_slots = sum(lengths) + 5
    k_cache = torch.randn(num_slots, num_kv, head_dim, generator=g)
    v_cache = torch.randn(num_slots, num_kv, head_dim, generator=g)
    slots = torch.zeros(batch, longest, dtype=torch.long)
    where = torch.randperm(num_slots, generator=g)
    used = 0
    for b, n in enumerate(lengths):
        slots[b, :n] = where[used : used + n]
        used += n
    key_end = torch.tensor(lengths)
    key_start = (key_end - window).clamp(min=0) if window else torch.zeros_like(key_end)
    q = torch.randn(batch + 2, heads, head_dim, generator=g)  # two rows not decoded
    rows = torch.randperm(batch + 2, generator=g)[:batch]
    out = torch.full_like(q, 7.0)
    cpu_ext.paged_decode_attention(q, k_cache, v_cache, slots, rows, key_start, key_end, out)
    for b in range(batch):
        keys = slots[b, key_start[b] : key_end[b]]
        for h in range(heads):
            k = k_cache[keys, h // group].double()
            v = v_cache[keys, h // group].double()
            p = torch.softmax(k @ q[rows[b], h].double() / head_dim**0.5, dim=0)
            torch.testing.assert_close(out[rows[b], h].double(), p @ v, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(batch + 2, dtype=torch.bool)
    untouched[rows] = False
    assert (out[untouched] == 7.0).all()


@needs_avx2
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(key_end=torch.tensor([3, 0])), "keys 0..0 of sequence 1 outside 0..3 or empty"),
        (dict(key_end=torch.tensor([4, 3])), "keys 0..4 of sequence 0 outside 0..3"),
        (dict(slots=torch.tensor([[0, 1, 99], [2, 3, 4]])), "cache slot 99 of 8"),
        (dict(rows=torch.tensor([0, 5])), "row 5 of 2"),
        (dict(k_cache=torch.zeros(8, 3, 4)), "3 KV heads"),
    ],
)
def test_cpp_decode_attention_names_bad_inputs(cpp_ops, change, message):
    args = dict(
        q=torch.zeros(2, 2, 4),
        k_cache=torch.zeros(8, 1, 4),
        v_cache=torch.zeros(8, 1, 4),
        slots=torch.tensor([[0, 1, 2], [3, 4, 5]]),
        rows=torch.tensor([0, 1]),
        key_start=torch.tensor([0, 0]),
        key_end=torch.tensor([3, 3]),
        out=torch.zeros(2, 2, 4),
    )
    args.update(change)
    if "k_cache" in change:
        args["v_cache"] = torch.zeros(8, 3, 4)
    with pytest.raises(RuntimeError, match=message):
        cpu_ext.paged_decode_attention(**args)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_packed_linear_matches_plain_and_drops_the_plain_weight(rows):
    from loraplex.model.llama import Linear

    g = torch.Generator().manual_seed(rows)
    layer = Linear(37, 53)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(53, 37, generator=g))
        layer.bias.copy_(torch.randn(53, generator=g))
    x = torch.randn(rows, 37, generator=g)
    want = x.double() @ layer.weight.double().T + layer.bias.double()
    with torch.inference_mode():
        layer.pack()
        got = layer(x)
    assert layer.weight.numel() == 0  # not kept twice
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
