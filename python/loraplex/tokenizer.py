"""The tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and incremental
detokenization that never emits a broken UTF-8 sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from loraplex import chat_template as chat_template_lib

# Tokens of prompt context kept for detokenizing the first generated tokens: enough for the
# decoder to see a word boundary (SentencePiece-style leading spaces) and byte fallback runs.
_CONTEXT_TOKENS = 6


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """The default template: chat_template.jinja, else tokenizer_config.json's
    ``chat_template`` (a string, or named templates of which 'default' is used)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = tok_config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


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
        self.chat_template = _chat_template(folder, tok_config)
        self.special_tokens = {
            name: text
            for name in (
                "bos_token",
                "eos_token",
                "unk_token",
                "pad_token",
                "sep_token",
                "cls_token",
                "mask_token",
            )
            if (text := _token_text(tok_config.get(name))) is not None
        }
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the special tokens the tokenizer's post-processor adds
        (e.g. BOS), as ``AutoTokenizer(text)`` gives them, unless told not to."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """transformers' ``apply_chat_template`` for one conversation: the text, or (with
        ``tokenize``) its ids without added special tokens, as transformers gives them."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                "or chat_template.jinja); pass chat_template="
            )
        text = chat_template_lib.render(
            template,
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

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
