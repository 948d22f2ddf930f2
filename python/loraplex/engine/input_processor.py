"""A request's inputs checked against the served model before anything is queued: the prompt
tokenized and bounded, ``SamplingParams`` token ids inside the vocabulary, logprobs within
``max_logprobs``, bad words tokenized. Every error names the request and the field."""

from __future__ import annotations

from typing import Any

from loraplex.sampling_params import SamplingParams
from loraplex.tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]

_TOKENIZATION_KWARGS = {"add_special_tokens", "truncate_prompt_tokens"}


def with_truncation(kwargs: dict[str, Any] | None, params: SamplingParams) -> dict | None:
    """Tokenization kwargs with ``params.truncate_prompt_tokens`` (vLLM's field) where the
    kwargs do not set it themselves."""
    if params.truncate_prompt_tokens is None or "truncate_prompt_tokens" in (kwargs or {}):
        return kwargs
    return {**(kwargs or {}), "truncate_prompt_tokens": params.truncate_prompt_tokens}


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, max_logprobs):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = vocab_size if max_logprobs == -1 else max_logprobs

    def tokenize(
        self, request_id: str, prompt: Prompt, kwargs: dict[str, Any] | None = None
    ) -> tuple[str | None, list[int]]:
        kwargs = dict(kwargs or {})
        unknown = set(kwargs) - _TOKENIZATION_KWARGS
        if unknown:
            raise ValueError(
                f"request {request_id!r}: tokenization_kwargs {sorted(unknown)} are not "
                f"supported (supported: {sorted(_TOKENIZATION_KWARGS)})"
            )
        special = bool(kwargs.get("add_special_tokens", True))
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if salt is not None and not (isinstance(salt, str) and salt):
                raise ValueError(
                    f"request {request_id!r}: cache_salt must be a non-empty string, got {salt!r}"
                )
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text = prompt["prompt"]
                ids = self._encode(request_id, text, special)
            else:
                raise ValueError(
                    f"request {request_id!r}: a prompt dict needs 'prompt' or 'prompt_token_ids'"
                )
        elif isinstance(prompt, str):
            text, ids = prompt, self._encode(request_id, prompt, special)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            raise TypeError(
                f"request {request_id!r}: prompt must be str, token ids or a dict, "
                f"got {type(prompt).__name__}"
            )
        keep = kwargs.get("truncate_prompt_tokens")
        if keep is not None:  # the last ``keep`` tokens; -1: as many as the context holds
            if not isinstance(keep, int) or isinstance(keep, bool) or keep == 0 or keep < -1:
                raise ValueError(
                    f"request {request_id!r}: truncate_prompt_tokens must be >= 1 or -1, "
                    f"got {keep!r}"
                )
            ids = ids[-(self.max_model_len if keep == -1 else keep) :]
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        if len(ids) > self.max_model_len:  # before the per-token check: it bounds that
            raise ValueError(
                f"request {request_id!r}: the prompt ({len(ids)} tokens) is longer than "
                f"max_model_len ({self.max_model_len})"
            )
        bad = self._outside_vocab(ids)
        if bad:
            raise ValueError(
                f"request {request_id!r}: token ids {bad[:5]} are outside the vocabulary "
                f"(size {self.vocab_size})"
            )
        return text, ids

    def _encode(self, request_id: str, text: Any, special: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"request {request_id!r}: prompt text must be str, got {text!r}")
        return self.tokenizer.encode(text, add_special_tokens=special)

    def _outside_vocab(self, ids: Any) -> list[Any]:
        return [
            t
            for t in ids
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size
        ]

    def check_params(self, request_id: str, p: SamplingParams) -> None:
        """Checks ``p`` against the model (what the server can refuse before submitting)."""
        where = f"request {request_id!r}: SamplingParams"
        for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            ids = getattr(p, name)
            bad = self._outside_vocab(list(ids or []))
            if bad:
                raise ValueError(
                    f"{where}.{name} has token ids {bad[:5]} outside the vocabulary "
                    f"(size {self.vocab_size})"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(p, name)
            wanted = self.vocab_size if value == -1 else value
            if wanted is not None and wanted > self.max_logprobs:
                raise ValueError(
                    f"{where}.{name}={value} asks for {wanted} logprobs, more than "
                    f"max_logprobs ({self.max_logprobs}); raise max_logprobs (-1: the "
                    "whole vocabulary)"
                )

    def bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as it tokenizes alone and after a space (vLLM tries both), each token
        sequence once, in order: one batched encode, linear in the words."""
        texts = [text for word in words for text in (word.lstrip(), " " + word.lstrip())]
        out: dict[tuple[int, ...], None] = {}
        for ids in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            if ids:
                out.setdefault(tuple(ids))
        return [list(ids) for ids in out]
