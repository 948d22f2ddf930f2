"""``SamplingParams``: how to pick each next token, with vLLM's names and defaults."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

# torch.Generator.manual_seed takes what fits in 64 bits, signed or unsigned
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class RequestOutputKind(IntEnum):
    """What each ``RequestOutput`` of a request carries (vLLM's enum and values)."""

    CUMULATIVE = 0  # everything generated so far, every step
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # one output, when the request finishes


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """What a request's output must match (vLLM's class and fields): exactly one of a JSON
    schema (``json``, a dict or its JSON text), a regular expression, a ``choice`` of
    strings, a grammar (Lark, or GBNF as llama.cpp writes it), ``json_object`` (any JSON
    object) or a ``structural_tag``. Checked here: that exactly one is given, and its type.
    The engine compiles it at ``add_request`` (a spec that does not compile is a
    ``ValueError`` naming the field; ``structural_tag`` is not supported yet) and masks each
    step's tokens to it. As vLLM: JSON allows any whitespace between tokens unless
    ``disable_any_whitespace``; ``disable_additional_properties`` closes every object of the
    schema; ``disable_fallback`` changes nothing (there is one backend). Regexes follow
    Rust's ``regex`` syntax (``\\d`` is any Unicode digit: write ``[0-9]`` for ASCII).
    The request ends (``stop``) at the grammar's end, whatever ``min_tokens`` or
    ``ignore_eos`` say."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def _given(self) -> list[str]:
        return [name for name in _CONSTRAINTS if getattr(self, name) is not None]

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) > 1:
            raise ValueError(
                "You can only use one kind of structured outputs constraint but multiple "
                f"are specified: {', '.join(given)}"
            )
        if not given:
            raise ValueError(
                "You must use one kind of structured outputs constraint but none are "
                f"specified (one of {', '.join(_CONSTRAINTS)})"
            )
        if self.choice is not None:
            self.choice = list(self.choice)
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(
                f"structured_outputs.{name} must be {rule}, got {getattr(self, name)!r:.200}."
            )

        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise bad("json", "a JSON schema (a dict or its JSON text)")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(name, "a non-empty string")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise bad("choice", "a non-empty list of strings")
        if self.json_object is not None and self.json_object is not True:
            raise bad("json_object", "True")
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")

    @property
    def kind(self) -> str:
        """Which constraint it is: ``json``, ``regex``, ``choice``, ``grammar``,
        ``json_object`` or ``structural_tag``."""
        return self._given()[0]

    def all_constraints_none(self) -> bool:
        return not self._given()

    def all_non_structural_tag_constraints_none(self) -> bool:
        return self._given() in ([], ["structural_tag"])


@dataclass
class SamplingParams:
    """Sampling settings for one request. An invalid value raises ``ValueError`` naming the
    field. ``temperature=0`` is greedy decoding; ``top_k`` of 0 or -1 disables top-k.

    Checked here, on their own: types and ranges. Checked by the engine at ``add_request``,
    against the model: token ids inside the vocabulary (``stop_token_ids``, ``logit_bias``,
    ``allowed_token_ids``), ``logprobs`` / ``prompt_logprobs`` within ``max_logprobs``
    (``-1``: the whole vocabulary).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    extra_args: dict[str, Any] | None = None
    _stop: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        self._verify()
        self.output_kind = RequestOutputKind(self.output_kind)

    def _verify(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}.")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "at least 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]")
        if not is_real(self.repetition_penalty) or not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "greater than zero")
        if not is_real(self.temperature) or not self.temperature >= 0.0:
            raise bad("temperature", "non-negative")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "-1, 0 (disable) or at least 1")
        if not is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "at least 1")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < -1):
                raise bad(name, "-1 (the whole vocabulary), 0 or more, or None")
        if any(not isinstance(s, str) or s == "" for s in self._stop):
            raise bad("stop", "a non-empty string or a list of them")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids", "a list of non-negative token ids")
        if self.seed is not None and not (
            is_int(self.seed) and _SEED_MIN <= self.seed <= _SEED_MAX
        ):
            raise bad("seed", f"an int in [{_SEED_MIN}, {_SEED_MAX}] or None")
        if self.logit_bias is not None and not all(
            is_int(k) and k >= 0 and is_real(v) for k, v in self.logit_bias.items()
        ):
            raise bad("logit_bias", "a dict of non-negative token ids to finite floats")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids
            or not all(is_int(t) and t >= 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", "a non-empty list of non-negative token ids")
        if self.bad_words is not None and not all(
            isinstance(w, str) and w.strip() for w in self.bad_words
        ):
            raise bad("bad_words", "a list of non-blank strings")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise bad("structured_outputs", "a StructuredOutputsParams or None")
        keep = self.truncate_prompt_tokens
        if keep is not None and (not is_int(keep) or keep == 0 or keep < -1):
            raise bad("truncate_prompt_tokens", "an integer >= 1 or -1")
        if not self.detokenize and self._stop:
            raise ValueError("stop strings are only supported when detokenize is True.")
        try:
            RequestOutputKind(self.output_kind)
        except ValueError:
            raise bad("output_kind", "a RequestOutputKind") from None

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list."""
        return self._stop

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self) -> SamplingParams:
        """A deep copy: nothing is shared with this one."""
        return copy.deepcopy(self)

    def generator_seed(self, index: int) -> int | None:
        """The seed of the ``index``-th of ``n`` sequences (wrapping within 64 bits)."""
        if self.seed is None:
            return None
        return (self.seed + index - _SEED_MIN) % 2**64 + _SEED_MIN
