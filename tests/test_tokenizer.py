"""Tokenizer loading, EOS resolution, and incremental detokenization at UTF-8 boundaries."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.tokenizer import Tokenizer
from tiny_models import EOS, build_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


def test_encode_adds_bos_like_autotokenizer(tok, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    for text in ["the quick brown fox", "héllo 🙂", "SELECT 1;"]:
        assert tok.encode(text) == hf(text)["input_ids"]


def test_eos_from_tokenizer_config(tok):
    assert tok.eos_token_ids == [tok._tok.token_to_id(EOS)]


def test_eos_precedence(tmp_path):
    build_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer(tmp_path).eos_token_ids == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    assert Tokenizer(tmp_path).eos_token_ids == [3, 4]


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


texts = st.text(
    alphabet=st.sampled_from(list("abc xyz") + ["é", "ö", "日", "本", "🙂", "🚀", "—", "\n"]),
    min_size=1,
    max_size=30,
)


@given(texts, texts)
def test_property_incremental_text_is_exact_and_never_broken(tok, prompt, text):
    prompt_ids = tok._tok.encode(prompt, add_special_tokens=False).ids
    ids = tok._tok.encode(text, add_special_tokens=False).ids
    detok = tok.detokenizer(prompt_ids, skip_special_tokens=True)
    pieces = [detok.step(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_multibyte_character_split_over_tokens_is_held_back(tok):
    # byte-level BPE: a character absent from the merges spans several byte tokens
    ids = tok._tok.encode("🦀", add_special_tokens=False).ids
    assert len(ids) > 1
    detok = tok.detokenizer([], skip_special_tokens=True)
    pieces = [detok.step(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🦀"
