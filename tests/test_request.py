"""LoRARequest: vLLM's surface, validation, identity, pickling, from_path."""

import copy
import os
import pathlib
import pickle
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

import loraplex
from loraplex import InvalidLoRARequestError, LoraplexError
from loraplex.lora.request import LoRARequest


def test_both_import_paths_name_one_class():
    assert loraplex.LoRARequest is LoRARequest


def test_positional_fields_in_vllm_order():
    r = LoRARequest("sql", 3, "/a/sql", None, 4096, "meta-llama/Llama-3-8B", {"k": 1})
    assert r.lora_name == "sql"
    assert r.lora_int_id == 3
    assert r.lora_path == "/a/sql"
    assert r.lora_local_path is None
    assert r.long_lora_max_len == 4096
    assert r.base_model_name == "meta-llama/Llama-3-8B"
    assert r.tensorizer_config_dict == {"k": 1}


def test_keyword_construction_and_defaults():
    r = LoRARequest(lora_int_id=2, lora_path="/p", lora_name="code")
    assert (r.lora_name, r.lora_int_id, r.lora_path) == ("code", 2, "/p")
    assert r.long_lora_max_len is None
    assert r.base_model_name is None
    assert r.tensorizer_config_dict is None


def test_aliases():
    r = LoRARequest("sql", 7, "/a/sql")
    assert (r.adapter_id, r.name, r.path) == (7, "sql", "/a/sql")


@pytest.mark.parametrize("bad_id", [0, -1, -(2**40)])
def test_id_below_one_raises_value_error_with_vllm_message(bad_id):
    with pytest.raises(ValueError) as info:
        LoRARequest("sql", bad_id, "/a")
    assert str(info.value) == f"id must be > 0, got {bad_id}"
    assert isinstance(info.value, InvalidLoRARequestError)
    assert isinstance(info.value, LoraplexError)


@pytest.mark.parametrize(
    "kwargs", [{}, {"lora_path": ""}, {"lora_path": "", "lora_local_path": ""}]
)
def test_empty_path_raises(kwargs):
    with pytest.raises(ValueError, match="lora_path cannot be empty"):
        LoRARequest("sql", 1, **kwargs)


def test_empty_name_raises():
    with pytest.raises(ValueError, match="lora_name cannot be empty"):
        LoRARequest("", 1, "/a")


def test_a_wrong_type_is_a_type_error_naming_the_field():
    with pytest.raises(TypeError, match="lora_int_id must be an int, got float"):
        LoRARequest("sql", 1.5, "/a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lora_int_id must be an int, got str"):
        LoRARequest("sql", "1", "/a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lora_name must be a str, got int"):
        LoRARequest(7, 1, "/a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lora_path must be a str or os.PathLike, got int"):
        LoRARequest("sql", 1, 5)  # type: ignore[arg-type]


def test_path_like_is_accepted(tmp_path):
    r = LoRARequest("sql", 1, tmp_path / "sql")
    assert r.lora_path == os.fspath(tmp_path / "sql")


def test_lora_local_path_warns_and_fills_lora_path():
    with pytest.warns(DeprecationWarning, match="lora_local_path"):
        r = LoRARequest("sql", 1, lora_local_path="/old/sql")
    assert r.lora_path == "/old/sql"
    assert r.lora_local_path == "/old/sql"
    with pytest.warns(DeprecationWarning):
        kept = LoRARequest("sql", 1, "/new", "/old")
    assert kept.lora_path == "/new"


def test_local_path_property_warns():
    r = LoRARequest("sql", 1, "/a")
    with pytest.warns(DeprecationWarning, match="local_path"):
        assert r.local_path == "/a"


def test_no_warning_without_local_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRARequest("sql", 1, "/a")


def test_equality_and_hash_by_name_in_dicts_and_sets():
    a = LoRARequest("sql", 1, "/a")
    same_name = LoRARequest("sql", 2, "/b")
    other = LoRARequest("code", 1, "/a")
    assert a == same_name and not (a != same_name)
    assert a != other and not (a == other)
    assert hash(a) == hash(same_name) == hash("sql")
    assert len({a, same_name, other}) == 2
    d = {a: "first"}
    d[same_name] = "second"
    assert d == {a: "second"}
    assert d[LoRARequest("sql", 9, "/z")] == "second"
    assert a != "sql" and a != 1 and a is not None


def test_fields_are_read_only():
    r = LoRARequest("sql", 1, "/a")
    with pytest.raises(AttributeError):
        r.lora_name = "other"  # type: ignore[misc]


def test_pickle_keeps_every_field_without_warning():
    with pytest.warns(DeprecationWarning):
        r = LoRARequest("sql", 5, "/a", "/old", 8192, "base", {"uri": "s3://x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = pickle.loads(pickle.dumps(r))
        shallow = copy.copy(r)
    for x in (back, shallow):
        assert x == r
        fields = (
            x.lora_name,
            x.lora_int_id,
            x.lora_path,
            x.lora_local_path,
            x.long_lora_max_len,
            x.base_model_name,
            x.tensorizer_config_dict,
        )
        assert fields == ("sql", 5, "/a", "/old", 8192, "base", {"uri": "s3://x"})


def test_repr_is_readable():
    assert repr(LoRARequest("sql", 1, "/a/sql")) == (
        "LoRARequest(lora_name='sql', lora_int_id=1, lora_path='/a/sql')"
    )
    r = LoRARequest("it's", 2, "/p", base_model_name="m")
    assert repr(r) == (
        "LoRARequest(lora_name=\"it's\", lora_int_id=2, lora_path='/p', base_model_name='m')"
    )


def fnv1a_id(location: str) -> int:
    """Independent reimplementation of the documented id derivation."""
    h = 0xCBF29CE484222325
    for b in location.encode():
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h % (2**31 - 1) + 1


def test_from_path_local_folder(tmp_path):
    folder = tmp_path / "sql-adapter"
    folder.mkdir()
    r = LoRARequest.from_path(folder)
    assert r.lora_name == "sql-adapter"
    assert r.lora_int_id == fnv1a_id(str(folder.resolve()))
    assert r.lora_path == str(folder)
    # the same folder however it is spelled gets the same id
    spelled = LoRARequest.from_path(f"{folder}/../sql-adapter/", name="mine")
    assert spelled.lora_int_id == r.lora_int_id
    assert spelled.lora_name == "mine"


def test_from_path_hub_id_and_symlink(tmp_path):
    hub = LoRARequest.from_path("org/sql-lora")
    assert (hub.lora_name, hub.lora_int_id) == ("org/sql-lora", fnv1a_id("org/sql-lora"))
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert LoRARequest.from_path(link).lora_int_id == LoRARequest.from_path(real).lora_int_id
    with pytest.raises(ValueError, match="lora_path cannot be empty"):
        LoRARequest.from_path("")


def test_from_path_ids_differ_across_locations(tmp_path):
    ids = {LoRARequest.from_path(f"org/adapter-{i}").lora_int_id for i in range(1000)}
    assert len(ids) == 1000
    assert all(1 <= i <= 2**31 - 1 for i in ids)


names = st.text(min_size=1, max_size=40)
paths = st.text(min_size=1, max_size=80).filter(lambda p: "\x00" not in p)


@given(
    names, st.integers(1, 2**63 - 1), paths, st.none() | st.integers(0, 2**40), st.none() | names
)
def test_property_roundtrip_and_identity(name, lora_id, path, long_len, base):
    r = LoRARequest(name, lora_id, path, None, long_len, base)
    back = pickle.loads(pickle.dumps(r))
    got = (
        back.lora_name,
        back.lora_int_id,
        back.lora_path,
        back.long_lora_max_len,
        back.base_model_name,
    )
    assert got == (name, lora_id, path, long_len, base)
    assert hash(back) == hash(name)
    assert eval(repr(r), {"LoRARequest": LoRARequest}).lora_int_id == lora_id


@given(names, names, st.integers(1, 100), st.integers(1, 100))
def test_property_equality_iff_same_name(n1, n2, i1, i2):
    a, b = LoRARequest(n1, i1, "/p"), LoRARequest(n2, i2, "/q")
    assert (a == b) == (n1 == n2)
    assert (a != b) == (n1 != n2)


@given(st.integers(max_value=0))
def test_property_nonpositive_ids_rejected(bad):
    with pytest.raises(ValueError, match=f"^id must be > 0, got {bad}$"):
        LoRARequest("x", bad, "/p")


def test_pathlib_and_str_agree():
    assert LoRARequest("a", 1, pathlib.Path("/x/y")).lora_path == "/x/y"


def test_id_beyond_int64_is_named():
    with pytest.raises(ValueError, match=f"^id must be <= 9223372036854775807, got {2**63}$"):
        LoRARequest("x", 2**63, "/p")
