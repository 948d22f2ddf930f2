"""Prompt forms, as vLLM's ``vllm.inputs``: a string, or one of these dicts."""

from __future__ import annotations

from typing import TypedDict, Union


class _Text(TypedDict):
    prompt: str


class TextPrompt(_Text, total=False):
    """A prompt given as text, tokenized by the engine; ``cache_salt`` (vLLM's): only
    requests with the same salt share cached prefixes."""

    cache_salt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt given as token ids (``prompt`` optional: the text, kept in the output;
    ``cache_salt`` as in ``TextPrompt``)."""

    prompt: str
    cache_salt: str


PromptType = Union[str, TextPrompt, TokensPrompt, list[int]]

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
