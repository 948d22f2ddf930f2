"""The tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and incremental
detokenization that never emits a broken UTF-8 sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

# Tokens of prompt context kept for detokenizing the first generated tokens: enough for the
# decoder to see a word boundary (SentencePiece-style leading spaces) and byte fallback runs.
_CONTEXT_TOKENS = 6


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """``tokenizer_config.json`` gives special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A model folder's tokenizer, with its end-of-sequence ids."""

    def __init__(self, folder: str | Path, model_config: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}: loraplex reads tokenizers in the fast "
                "(tokenizers library) format; save one with tokenizer.save_pretrained()"
            )
        self._tok = _HFTokenizer.from_file(str(path))
        tok_config = _read_json(folder / "tokenizer_config.json")
        gen_config = _read_json(folder / "generation_config.json")
        model_config = model_config or _read_json(folder / "config.json")
        self.special_ids: set[int] = {
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.eos_token_ids = self._eos_ids(tok_config, gen_config, model_config)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _eos_ids(self, tok_config: dict, gen_config: dict, model_config: dict) -> list[int]:
        """EOS ids: generation_config.json, then config.json, then tokenizer_config.json's
        ``eos_token`` (the order transformers' generate uses)."""
        for source in (gen_config, model_config):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                return [value]
            if isinstance(value, list) and value:
                return [int(v) for v in value]
        text = _token_text(tok_config.get("eos_token"))
        token_id = self._tok.token_to_id(text) if text else None
        return [token_id] if token_id is not None else []

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the special tokens the tokenizer's post-processor adds
        (e.g. BOS), as ``AutoTokenizer(text)`` gives them."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> Detokenizer:
        return Detokenizer(self, prompt_ids, skip_special_tokens)


class Detokenizer:
    """Turns one sequence's new tokens into text, a piece per token.

    Each step decodes a short window twice — up to the last emitted token, and through the new
    one — and emits the difference. A window that ends inside a multi-byte character decodes
    to U+FFFD; nothing is emitted until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, token_id: int) -> str:
        """Text that ``token_id`` completes (possibly empty)."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]
