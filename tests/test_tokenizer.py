"""Tokenizer loading, EOS resolution, and incremental detokenization at UTF-8 boundaries."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.tokenizer import Tokenizer
from tiny_models import BOS, EOS, build_tokenizer


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


@pytest.mark.parametrize("extra", [{}, {"pad_token": EOS, "unk_token": BOS}])
def test_the_transformers_surface_answers_as_autotokenizer(tmp_path, extra):
    """What code written against vLLM's ``get_tokenizer()`` (a transformers fast tokenizer)
    calls: the same answers as ``AutoTokenizer`` on the same folder."""
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **extra}))
    ours, hf = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = ["the quick brown fox", "héllo 🙂", "SELECT 1;"]
    for text in texts:
        enc, want = ours(text), hf(text)
        assert enc["input_ids"] == enc.input_ids == want["input_ids"]
        assert enc.attention_mask == want["attention_mask"]
        assert (
            ours(text, add_special_tokens=False).input_ids
            == hf(text, add_special_tokens=False)["input_ids"]
        )
        assert ours.tokenize(text) == hf.tokenize(text)
        ids = want["input_ids"] + [hf.eos_token_id]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
        assert ours.decode(ids) == hf.decode(ids)  # the default keeps special tokens
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        tokens = hf.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    batch = ours(texts)
    assert batch.input_ids == hf(texts)["input_ids"]
    assert ours.batch_decode(batch.input_ids) == hf.batch_decode(batch.input_ids)
    assert ours.convert_tokens_to_ids("never-a-token") == hf.convert_tokens_to_ids("never-a-token")
    assert (len(ours), ours.vocab_size) == (len(hf), hf.vocab_size)
    assert ours.get_vocab() == hf.get_vocab()
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(hf, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
    assert set(ours.all_special_tokens) == set(hf.all_special_tokens)
    assert set(ours.all_special_ids) == set(hf.all_special_ids)


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
