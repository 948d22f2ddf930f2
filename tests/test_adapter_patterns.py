"""Adapter configs are untrusted input: PEFT's module patterns (``rank_pattern``,
``alpha_pattern``, a regex ``target_modules``) are matched by a linear-time engine (Rust's
``regex`` crate in the core), never by Python's backtracking ``re``. Where both engines read a
pattern they agree (Python's ``re`` is the reference); a pattern that backtracks
exponentially under ``re`` loads at once; what the engine cannot read is refused naming the
adapter and the pattern."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex._core import ModulePatterns
from tiny_adapters import build_adapter, edit_config
from tiny_models import build_model

MODULE_KEYS = [
    f"model.layers.{layer}.{block}.{module}"
    for layer in (0, 1, 11)
    for block, module in [
        ("self_attn", "q_proj"),
        ("self_attn", "o_proj"),
        ("mlp", "down_proj"),
        ("mlp", "up_proj"),
    ]
]
atoms = st.sampled_from(
    ["q_proj", "o_proj", "down_proj", r"\w+_proj", r"layers\.1\.", r"\d+", ".*", "mlp", "x"]
)
patterns = st.lists(atoms, min_size=1, max_size=3).map("".join)
alternations = st.lists(patterns, min_size=1, max_size=3).map("|".join)


@given(pats=st.lists(alternations, min_size=1, max_size=4), key=st.sampled_from(MODULE_KEYS))
def test_first_match_equals_peft_rule_under_python_re(pats, key):
    want = next((i for i, p in enumerate(pats) if re.match(rf"(.*\.)?({p})$", key)), None)
    assert ModulePatterns(pats).first_match(key) == want


def test_what_the_linear_engine_cannot_read_is_refused_by_index():
    with pytest.raises(ValueError, match=r"pattern 1 \("):
        ModulePatterns(["q_proj", "(?<=mlp\\.)down_proj"])
    with pytest.raises(ValueError, match="pattern 0"):
        ModulePatterns(["(q_proj"])
    with pytest.raises(ValueError, match="pattern 0"):
        ModulePatterns(["a{1000}{1000}{1000}"])  # past the compiled-size bound


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("pat-base"), "llama")


def test_a_backtracking_rank_pattern_loads_at_once(base, tmp_path):
    """``(.|.)*Z`` against a module key backtracks ~2**30 times under ``re`` (minutes); the
    load runs in a child with a wait that such a match could not finish inside."""
    folder = build_adapter(base, tmp_path / "evil", r=8, alpha=16, seed=1)
    edit_config(folder, rank_pattern={"(.|.)*Z": 4}, alpha_pattern={"(a|a)*b": 2})
    script = textwrap.dedent(
        f"""
        from loraplex import LLM, LoRARequest, SamplingParams
        llm = LLM(model={str(base)!r}, enable_lora=True, max_lora_rank=8)
        assert llm.llm_engine.add_lora(LoRARequest("evil", 1, {str(folder)!r}))
        out = llm.generate("hi", SamplingParams(max_tokens=3, temperature=0),
                           lora_request=LoRARequest("evil", 1, {str(folder)!r}), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3, out
        print("served")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "served" in done.stdout, done.stderr[-2000:]


def test_a_look_around_pattern_is_refused_naming_adapter_and_pattern(base, tmp_path):
    from loraplex import LLM, LoRARequest
    from loraplex.errors import InvalidAdapterError

    folder = build_adapter(base, tmp_path / "look", r=8, alpha=16, seed=2)
    edit_config(folder, alpha_pattern={"(?=q)q_proj": 4})
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8)
    with pytest.raises(InvalidAdapterError, match=r"adapter 'look'.*alpha_pattern key '\(\?=q\)"):
        llm.llm_engine.add_lora(LoRARequest("look", 1, str(folder)))
