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
        # transformers' meanings: vocab_size leaves added tokens out, len() counts them
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)
        self.name_or_path = str(folder)

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

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` of each text, in one call into the tokenizers library."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

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

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # transformers' tokenizer surface, for code written against vLLM's ``get_tokenizer()``
    # (a transformers fast tokenizer there)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> Encoding:
        """``input_ids`` and ``attention_mask`` of a text (or of each of a list of texts)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return Encoding(input_ids=ids, attention_mask=[1] * len(ids))
        rows = [self.encode(t, add_special_tokens) for t in text]
        return Encoding(input_ids=rows, attention_mask=[[1] * len(r) for r in rows])

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def batch_decode(
        self, sequences: list[list[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Unknown tokens give ``unk_token_id`` (None without one), as transformers'."""
        if isinstance(tokens, str):
            return self._id_or_unk(tokens)
        return [self._id_or_unk(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _id_or_unk(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return found if found is not None else self.unk_token_id

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        if "eos_token" in self.special_tokens:
            return self.special_tokens["eos_token"]
        return None if self.eos_token_id is None else self._tok.id_to_token(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens.values()))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self._id_of(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> Detokenizer:
        return Detokenizer(self, prompt_ids, skip_special_tokens)


class Encoding(dict):
    """What calling the tokenizer answers: a dict (``out["input_ids"]``) whose keys are
    also attributes (``out.input_ids``), as transformers' ``BatchEncoding``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


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
