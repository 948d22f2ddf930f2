"""Prompt forms, as vLLM's ``vllm.inputs``: a string, or one of these dicts."""

from __future__ import annotations

from typing import TypedDict, Union


class TextPrompt(TypedDict):
    """A prompt given as text, tokenized by the engine."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt given as token ids (``prompt`` optional: the text, kept in the output)."""

    prompt: str


PromptType = Union[str, TextPrompt, TokensPrompt, list[int]]

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
