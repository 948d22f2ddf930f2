"""The loader's native read and fill (``AdapterFile``): a slot filled from a file holds what
torch computes from the same file (the weights widened to float32, B times the scaling in
float32, rounded to the slots' dtype), whatever the file's dtype and the slots'; the largest
magnitude measured in the read equals torch's, NaN and inf included; a copy that does not fit
is refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from loraplex import LoRARequest
from loraplex._core import AdapterFile
from loraplex.engine.backend import LORA_CPP, LORA_SGMV
from loraplex.errors import InvalidAdapterError
from loraplex.lora.adapter import load_adapter, module_shape
from loraplex.lora.slots import LoRASlots
from tiny_models import SLOT_CFG as CFG

MAX_RANK = 8
FILE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SLOT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK = {"o_proj": "self_attn", "q_proj": "self_attn", "v_proj": "self_attn"}


def write_adapter(folder, weights, r, alpha, use_rslora=False):
    """A PEFT folder: ``weights`` {(layer, module): (A, B)} as saved, in their own dtype."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": sorted({m for _, m in weights}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for (layer, module), (a, b) in weights.items():
        block = BLOCK.get(module, "mlp")
        prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return LoRARequest(folder.name, 1, str(folder))


@settings(max_examples=30, deadline=None)
@given(
    file_dtype=st.sampled_from(FILE_DTYPES),
    slot_dtype=st.sampled_from(SLOT_DTYPES),
    r=st.integers(1, MAX_RANK),
    alpha=st.floats(0.1, 64),
    use_rslora=st.booleans(),
    magnitude=st.sampled_from([1e-3, 0.3, 10.0]),
    seed=st.integers(0, 2**16),
    packed=st.booleans(),
)
def test_a_filled_slot_holds_what_torch_computes_from_the_file(
    tmp_path_factory, file_dtype, slot_dtype, r, alpha, use_rslora, magnitude, seed, packed
):
    """Into block-diagonal B^T slots, and packed ones (the C++ op's: module i's B^T in rows
    0..R of its columns)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer, module in [(0, "q_proj"), (0, "v_proj"), (1, "o_proj"), (1, "down_proj")]:
        fan_in, fan_out = module_shape(CFG, module)
        a = (torch.randn(r, fan_in, generator=g, dtype=torch.float64) * magnitude).to(file_dtype)
        b = (torch.randn(fan_out, r, generator=g, dtype=torch.float64) * magnitude).to(file_dtype)
        weights[(layer, module)] = (a, b)
    folder = tmp_path_factory.mktemp("file") / "adapter"
    request = write_adapter(folder, weights, r, alpha, use_rslora)
    adapter = load_adapter(request, CFG, MAX_RANK, set())
    slots = LoRASlots(CFG, 2, MAX_RANK, slot_dtype, LORA_CPP if packed else LORA_SGMV)
    slots.load(1, adapter)

    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    for (layer, module), (a, b) in weights.items():
        group, index = {
            "q_proj": ("qkv_proj", 0),
            "v_proj": ("qkv_proj", 2),
            "o_proj": ("o_proj", 0),
            "down_proj": ("down_proj", 0),
        }[module]
        col = index * MAX_RANK
        row = slots.offsets[group][index]
        got_a = slots.a[(layer, group)][1, col : col + r]
        bt_col = 0 if packed else col
        got_bt = slots.bt[(layer, group)][1, bt_col : bt_col + r, row : row + b.shape[0]]
        assert torch.equal(got_a, a.float().to(slot_dtype)), (layer, module)
        assert torch.equal(got_bt, (b.float() * scale).to(slot_dtype).T), (layer, module)
        # the slot's other module rows stay zero; slot 0 is untouched
        assert slots.a[(layer, group)][0].abs().sum() == 0
        m = adapter.modules[(layer, module)]
        assert m.a_max == a.float().abs().max().item()
        assert m.b_max == (b.float() * scale).abs().max().item()


specials = st.sampled_from([0.0, -0.0, 1.0, -2.5, 65504.0, 1e30, -1e-30, math.inf, -math.inf])


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(FILE_DTYPES),
    values=st.lists(
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), specials, st.just(math.nan)),
        min_size=1,
        max_size=40,
    ),
)
def test_the_largest_magnitude_is_torchs(dtype, values):
    t = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(1, -1)
    (name, file_dtype, shape, got) = AdapterFile.from_bytes(save({"w": t})).tensors()[0]
    want = t.float().abs().max().item()
    assert (name, shape) == ("w", [1, len(values)])
    assert math.isnan(got) if math.isnan(want) else got == want, (got, want)


def test_integer_weights_have_no_magnitude_and_fail_the_adapter(tmp_path):
    t = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    assert AdapterFile.from_bytes(save({"w": t})).tensors() == [("w", "I64", [2, 3], None)]
    fan_in, fan_out = module_shape(CFG, "q_proj")
    weights = {(0, "q_proj"): (torch.zeros(4, fan_in, dtype=torch.int32), torch.zeros(fan_out, 4))}
    request = write_adapter(tmp_path / "ints", weights, 4, 8)
    with pytest.raises(InvalidAdapterError, match="must be floating point, got I32 / F32"):
        load_adapter(request, CFG, MAX_RANK, set())


def test_a_copy_that_does_not_fit_is_refused_and_writes_nothing():
    file = AdapterFile.from_bytes(save({"w": torch.ones(2, 3)}))
    dst = torch.zeros(6)
    region = [(dst.data_ptr(), 6 * 4)]
    file.fill(region, "float32", [(0, 0, 0, 3, False, 2.0)])
    assert torch.equal(dst, torch.full((6,), 2.0))
    dst.zero_()
    for bad in [
        (0, 0, 1, 3, False, 1.0),  # one element past the end
        (0, 0, 0, 2, False, 1.0),  # rows overlap (stride below the row length)
        (0, 0, 0, 3, True, 1.0),  # transposed: 3 rows of 2 at stride 3 end past 6
        (0, 1, 0, 3, False, 1.0),  # no destination 1
        (1, 0, 0, 3, False, 1.0),  # no tensor 1
    ]:
        with pytest.raises(ValueError):
            file.fill(region, "float32", [(0, 0, 0, 3, False, 1.0), bad])
        assert dst.abs().sum() == 0, bad
    with pytest.raises(ValueError, match="unsupported slot dtype"):
        file.fill(region, "int8", [])
    overlapping = [(dst.data_ptr(), 24), (dst.data_ptr() + 4, 20)]
    for dsts in (overlapping, [(0, 24)]):
        with pytest.raises(ValueError, match="non-null and disjoint"):
            file.fill(dsts, "float32", [(0, 0, 0, 3, False, 1.0)])
    assert dst.abs().sum() == 0


def test_unreadable_and_corrupt_files_raise_what_they_are(tmp_path):
    with pytest.raises(FileNotFoundError):
        AdapterFile.read(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a safetensors file"):
        AdapterFile.read(tmp_path / "bad.safetensors")
    whole = save({"w": torch.ones(4)})
    with pytest.raises(ValueError, match="not a safetensors file"):
        AdapterFile.from_bytes(whole[:-1])  # truncated: its data does not match the header


def test_adapters_sharing_a_header_are_each_checked_and_scaled_by_their_own_config(tmp_path):
    """The validated layout is reused for files with the same header; the config's scaling
    and each file's magnitudes are still the adapter's own."""
    fan_in, fan_out = module_shape(CFG, "q_proj")
    a, b = torch.full((4, fan_in), 0.5), torch.full((fan_out, 4), 0.25)
    first = load_adapter(
        write_adapter(tmp_path / "x", {(0, "q_proj"): (a, b)}, 4, 8), CFG, MAX_RANK, set()
    )
    second = load_adapter(
        write_adapter(tmp_path / "y", {(0, "q_proj"): (a, b)}, 4, 32), CFG, MAX_RANK, set()
    )
    assert first.file.header() == second.file.header()
    assert (first.modules[(0, "q_proj")].scale, second.modules[(0, "q_proj")].scale) == (2, 8)
    assert second.modules[(0, "q_proj")].b_max == 0.25 * 8
    bad = b.clone()
    bad[3, 1] = math.nan
    request = write_adapter(tmp_path / "z", {(0, "q_proj"): (a, bad)}, 4, 8)
    with pytest.raises(InvalidAdapterError, match="q_proj has non-finite values"):
        load_adapter(request, CFG, MAX_RANK, set())
    with pytest.raises(InvalidAdapterError, match="above max_lora_rank=2"):
        load_adapter(write_adapter(tmp_path / "w", {(0, "q_proj"): (a, b)}, 4, 8), CFG, 2, set())


MAGNITUDES = [0.5, 3e38, math.inf, -math.inf, math.nan]
CHECKED = [(0, "q_proj"), (0, "v_proj"), (1, "o_proj")]  # (layer, module), in check order


@settings(max_examples=60, deadline=None)
@given(
    cells=st.lists(
        st.tuples(
            st.sampled_from(MAGNITUDES),
            st.sampled_from(MAGNITUDES),
            st.sampled_from([1.0, 8.0, 1e9, 4e39]),  # 4e39 / r: beyond float32
        ),
        min_size=len(CHECKED),
        max_size=len(CHECKED),
    ),
    seed=st.integers(0, 2**16),
)
def test_an_adapter_is_accepted_exactly_when_torch_finds_every_weight_finite(
    tmp_path_factory, cells, seed
):
    """Each module's own lora_alpha (``alpha_pattern``) and one extreme value in its A and
    its B: the adapter loads exactly when torch finds every A and B finite and every B times
    its scaling (float32) finite; else the error names the first module that is not (by
    layer, then module; its values before its scaling)."""
    r, g = 4, torch.Generator().manual_seed(seed)
    weights, patterns, expected = {}, {}, None
    for (layer, module), (a_val, b_val, alpha) in zip(CHECKED, cells):
        fan_in, fan_out = module_shape(CFG, module)
        a, b = torch.full((r, fan_in), 0.01), torch.full((fan_out, r), 0.01)
        a.view(-1)[torch.randint(a.numel(), (1,), generator=g)] = a_val
        b.view(-1)[torch.randint(b.numel(), (1,), generator=g)] = b_val
        weights[(layer, module)] = (a, b)
        name = f"model.layers.{layer}.{BLOCK[module]}.{module}"
        patterns[name.replace(".", r"\.")] = alpha
        scaled = b * torch.tensor(alpha / r, dtype=torch.float32)
        if expected is not None:
            continue
        if not (a.isfinite().all() and b.isfinite().all()):
            expected = f"{name} has non-finite values"
        elif not scaled.isfinite().all():
            expected = f"{name}: scaling lora_alpha / r = {alpha} / {r} makes lora_B non-finite"
    folder = tmp_path_factory.mktemp("adapter")
    request = write_adapter(folder, weights, r, 1.0)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["alpha_pattern"] = patterns
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if expected is None:
        adapter = load_adapter(request, CFG, MAX_RANK, set())
        assert sorted(adapter.modules) == CHECKED
    else:
        with pytest.raises(InvalidAdapterError) as e:
            load_adapter(request, CFG, MAX_RANK, set())
        assert expected in str(e.value)
