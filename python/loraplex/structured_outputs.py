"""Structured outputs: a request's ``StructuredOutputsParams`` compiled to a grammar, one
matcher per sequence, and each step's token masks for the constrained rows only.

The backend is llguidance (``benches/README.md``, 2026-12-07: the backends measured side by
side on this machine's CPUs), reached only through ``GrammarBackend``: ``compile`` (at
``add_request``, off the step thread, cached with a bound per distinct spec), ``Matcher``
(advance, stop, error) and ``fill_masks`` (one call for all constrained rows of a step; the
backend releases the GIL, so the engine runs it beside the forward). Resource limits on a
grammar (its size, the lexer's work per step) are llguidance's defaults: a hostile grammar
fails its compile or its request, never the step.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from loraplex.sampling_params import StructuredOutputsParams
from loraplex.tokenizer import Tokenizer

CACHE_SIZE = 512  # compiled grammars kept (each a template matcher: its parse, kilobytes)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, inner: Any):
        self._m = inner

    def accept(self, token: int) -> bool:
        """Advances by ``token``; False when the grammar does not allow it (a dead end)."""
        return bool(self._m.consume_token(token))

    @property
    def is_stopped(self) -> bool:
        """The grammar ended: no token can follow."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class Grammar:
    """A compiled grammar: a template whose copies are the sequences' matchers."""

    def __init__(self, template: Any):
        self._template = template

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


def _no_additional_properties(schema: Any) -> Any:
    """``additionalProperties: false`` on every object schema that does not set it (vLLM's
    ``disable_additional_properties``)."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class GrammarBackend:
    """llguidance over one tokenizer and one logits width."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        cache_size: int = CACHE_SIZE,
        disable_any_whitespace: bool = False,
        disable_additional_properties: bool = False,
    ):
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        # the engine's defaults (structured_outputs_config), OR'd with each request's
        self.disable_any_whitespace = disable_any_whitespace
        self.disable_additional_properties = disable_additional_properties
        self._llg: Any = None
        self._tok: Any = None
        self._executor: Any = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache and the tokenizer view
        self.compiles = 0  # distinct grammars compiled (cache misses)

    def _tokenizer_view(self) -> Any:
        """llguidance's view of the tokenizer, built at the first structured request."""
        if self._tok is None:
            import llguidance

            eos = self.tokenizer.eos_token_id
            self._tok = llguidance.LLTokenizer(
                self.tokenizer._tok.to_str(), n_vocab=self.vocab_size, eos_token=eos
            )
            self._executor = llguidance.LLExecutor()
            self._llg = llguidance
        return self._tok

    def compile(self, where: str, p: StructuredOutputsParams) -> Grammar:
        """The grammar of ``p``; a ``ValueError`` naming ``where`` (the field it came from)
        when it does not compile. Cached by the spec and its options."""
        kind = p.kind
        spec = getattr(p, kind)
        tight = p.disable_any_whitespace or self.disable_any_whitespace
        closed = p.disable_additional_properties or self.disable_additional_properties
        key = json.dumps([kind, spec, tight, closed, p.whitespace_pattern], sort_keys=True)
        with self._lock:
            tok = self._tokenizer_view()
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        text = self._grammar_text(where, p, kind, spec, tight, closed)
        M = self._llg.LLMatcher
        error = M.validate_grammar(text, tok)
        if error:
            raise ValueError(f"{where} does not compile: {_short(error)}")
        template = M(tok, text, log_level=0)
        if template.is_error():
            raise ValueError(f"{where} does not compile: {_short(template.get_error())}")
        # llguidance builds its lexer lazily: the first mask, here, off the step thread
        mask = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        self._fill([template.deep_copy()], mask)
        grammar = Grammar(template)
        with self._lock:
            self.compiles += 1
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _grammar_text(
        self,
        where: str,
        p: StructuredOutputsParams,
        kind: str,
        spec: Any,
        tight: bool,
        closed: bool,
    ) -> str:
        M = self._llg.LLMatcher
        options: dict[str, Any] = {"whitespace_flexible": not tight}
        if p.whitespace_pattern is not None:
            options["whitespace_pattern"] = p.whitespace_pattern
        try:
            if kind in ("json", "json_object"):
                schema = {"type": "object"} if kind == "json_object" else spec
                if isinstance(schema, str):
                    schema = json.loads(schema)
                if not isinstance(schema, (dict, bool)):
                    raise ValueError("a JSON schema is an object (or a bool)")
                if closed:
                    schema = _no_additional_properties(schema)
                return M.grammar_from_json_schema(schema, defaults=options)
            if kind == "regex":
                return M.grammar_from_regex(spec)
            if kind == "choice":  # each choice a Lark string literal (JSON escapes)
                return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
            if kind == "grammar":  # Lark, or GBNF as llama.cpp writes it
                return self._llg.grammar_from("grammar", spec)
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"{where} does not compile: {_short(str(e))}") from None
        raise ValueError(
            f"{where} is not supported by loraplex's grammar backend (llguidance) yet; "
            "use json, regex, choice, grammar or json_object"
        )

    def fill_masks(self, matchers: list[Matcher]) -> torch.Tensor:
        """The tokens each matcher's next step forbids: bool ``[len(matchers), V]``. A
        matcher in error forbids every token."""
        words = torch.zeros((len(matchers), (self.vocab_size + 31) // 32), dtype=torch.int32)
        self._fill([m._m for m in matchers], words)
        bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        banned = bits.flatten(1)[:, : self.vocab_size] == 0
        for i, m in enumerate(matchers):
            if m._m.is_error():
                banned[i] = True
        return banned

    def _fill(self, inner: list[Any], words: torch.Tensor) -> None:
        """Fills ``words`` (int32 ``[n, ceil(V / 32)]``) on llguidance's threads, the GIL
        released."""
        from llguidance.torch import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(inner)], words)


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
