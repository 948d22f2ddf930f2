"""The backend seam: one object, chosen at engine start, owns the device, the dtype, the KV
tensors and the kernels; no other module asks which device it runs on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import loraplex
from loraplex import LLM, EngineArgs, LoRARequest, SamplingParams
from loraplex.engine.backend import LORA_CPP, LORA_PADDED, CPUBackend, select_backend
from loraplex.ops import cpu_ext
from tiny_adapters import PeftReference, build_adapter
from tiny_models import build_model

PROMPTS = ["a", "the quick brown fox", "SELECT name FROM users", "def add(a, b):"]

PACKAGE = Path(loraplex.__file__).parent
# what asks for a device, or picks a kernel by it
DEVICE_QUESTIONS = re.compile(
    r"torch\.cuda|\.is_cuda|cpu_ext\.available|get_cpu_capability|device=\"cpu\"|\"cuda\""
)
# the backend, and the ops it chooses between (each knows its own device)
ALLOWED = {"engine/backend.py", "ops/__init__.py", "ops/cpu_ext.py", "ops/cuda.py"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("backend-base"), "llama")


def test_no_module_outside_the_backend_asks_which_device():
    asking = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED or rel.startswith("ops/cuda_build"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if DEVICE_QUESTIONS.search(line.split("#")[0]):
                asking.append(f"{rel}:{number}: {line.strip()}")
    assert asking == []


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_the_engine_runs_on_the_backend_it_chose(base, device):
    llm = LLM(model=str(base), device=device, enable_lora=True, max_lora_rank=8)
    engine = llm.llm_engine
    backend = engine.backend
    assert isinstance(backend, CPUBackend) and backend.name == "cpu"
    assert backend.dtype == torch.float32  # auto on the CPU
    tensors = [*engine.model.parameters(), *(t for kv in engine.runner.kv_caches for t in kv)]
    assert {t.device for t in tensors} == {backend.device}
    k_cache = engine.runner.kv_caches[0][0]
    assert k_cache.shape[0] == engine.num_kv_blocks * engine.args.block_size
    assert engine.lora.host.kernel == (LORA_CPP if cpu_ext.available() else LORA_PADDED)
    out = llm.generate(["the quick"], loraplex.SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_an_unknown_device_is_refused_naming_it(base):
    with pytest.raises(ValueError, match="device='tpu'"):
        LLM(model=str(base), device="tpu")
    args = EngineArgs(model=str(base))
    args.device = "tpu"  # past verify: the selection refuses it too
    with pytest.raises(ValueError, match="device='tpu'"):
        select_backend(args)


def test_16_bit_adapters_keep_the_cpp_kernel_on_a_float32_model(base):
    if not cpu_ext.available():
        pytest.skip("the C++ CPU ops are not built on this CPU (no AVX2)")
    for lora_dtype in ("auto", "bfloat16", "float16"):
        args = EngineArgs(model=str(base), lora_dtype=lora_dtype)
        backend = select_backend(args)
        assert backend.lora_kernel(backend.lora_dtype, 16) == LORA_CPP
    backend = select_backend(EngineArgs(model=str(base), dtype="bfloat16"))
    assert backend.lora_kernel(backend.lora_dtype, 16) == LORA_PADDED  # bf16 activations


def test_device_slots_of_their_own_serve_what_peft_does(base, tmp_path, monkeypatch, kernels):
    """The GPU's shape on the CPU: kernels read max_loras device slots of their own, which
    the plan's loads fill from the host tier (evicting and reloading as adapters outnumber
    the slots); every greedy token is PEFT's for its adapter."""
    monkeypatch.setattr(CPUBackend, "separate_device_slots", True)
    adapters = {
        f"d{i}": build_adapter(base, tmp_path / f"d{i}", r=4 + 2 * i, alpha=8, seed=40 + i)
        for i in range(4)
    }
    adapters["q"] = build_adapter(base, tmp_path / "q", r=8, alpha=16, targets=["q_proj"], seed=9)
    reqs = {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(adapters.items())}
    llm = LLM(model=str(base), enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=16)
    assert llm.llm_engine.lora.device_slots is not None
    assert llm.llm_engine.lora.device_slots.a[(0, "qkv_proj")].shape[0] == 2
    names = ["d0", None, "d1", "d2", "q", "d3", "d0", "q", None, "d1"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(
        [PROMPTS[i % len(PROMPTS)] for i in range(len(names))],
        params,
        lora_request=[reqs[n] if n else None for n in names],
        use_tqdm=False,
    )
    assert PeftReference(base, adapters).mismatches(outs, names) == []
