"""``StructuredOutputsParams`` at vLLM's import path with vLLM's validation (exactly one
kind of constraint, each field's type). The engine's use of it: test_structured_outputs.py."""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from loraplex.sampling_params import StructuredOutputsParams


@pytest.mark.parametrize(
    "kw, kind",
    [
        (dict(json={"type": "object"}), "json"),
        (dict(json='{"type": "string"}'), "json"),
        (dict(regex="[a-z]+"), "regex"),
        (dict(choice=["yes", "no"]), "choice"),
        (dict(grammar='start: "a"'), "grammar"),
        (dict(json_object=True), "json_object"),
    ],
)
def test_one_kind_is_accepted_and_named(kw, kind):
    assert StructuredOutputsParams(**kw).kind == kind


def test_more_than_one_kind_or_none_is_refused():
    with pytest.raises(ValueError, match="only use one kind.*regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="must use one kind"):
        StructuredOutputsParams()


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(json=3), "json"),
        (dict(regex=""), "regex"),
        (dict(choice=[]), "choice"),
        (dict(choice=["a", 1]), "choice"),
        (dict(json_object=False), "json_object"),
        (dict(regex="a", disable_any_whitespace="yes"), "disable_any_whitespace"),
    ],
)
def test_a_bad_value_names_its_field(kw, field):
    with pytest.raises(ValueError, match=f"structured_outputs.{field} must be"):
        StructuredOutputsParams(**kw)


def test_sampling_params_takes_only_the_class():
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"regex": "a"})
