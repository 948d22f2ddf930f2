"""Where adapters come from (issue 27): an S3 bucket served by moto on 127.0.0.1 (fetched into
the content-addressed cache, its digest the version, a changed object a new version on
reload, the cache's bound kept), a hub repo from a hand-built Hugging Face cache with
``HF_HUB_OFFLINE=1`` (the ref's commit and a pinned revision), and a read that hangs ending
as that adapter's error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tiny_adapters import build_adapter
from tiny_models import build_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sources-base"), "llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources-adapters")
    return [build_adapter(base, root / f"a{i}", r=8, alpha=16, seed=40 + i) for i in range(2)]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port), its bucket ``adapters``; the client."""
    boto3 = pytest.importorskip("boto3", reason="moto[server] (requirements-test.txt)")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="adapters")
    yield client, env
    server.stop()


def upload(client, folder: Path, prefix: str) -> None:
    for f in folder.iterdir():
        if f.name.startswith("adapter_"):
            client.upload_file(str(f), "adapters", f"{prefix}/{f.name}")


def greedy():
    from loraplex import SamplingParams

    return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def greedy_tokens(llm, lora):
    out = llm.generate("the quick", greedy(), lora_request=lora, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length", out
    return out.outputs[0].token_ids


def test_s3_adapters_are_fetched_by_content_and_a_changed_object_is_a_new_version(
    base, adapters, s3, tmp_path, monkeypatch
):
    from loraplex import LLM, LoRARequest
    from loraplex.errors import InvalidAdapterError

    client, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    upload(client, adapters[0], "team/alpha")
    cache = tmp_path / "cache"
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, lora_cache_dir=str(cache))
    local = [
        greedy_tokens(llm, LoRARequest(f"local{i}", 10 + i, str(a))) for i, a in enumerate(adapters)
    ]
    assert local[0] != local[1]

    remote = LoRARequest("remote", 1, "s3://adapters/team/alpha")
    assert greedy_tokens(llm, remote) == local[0]
    first = llm.llm_engine.lora_version(1)
    assert first is not None and len(first) == 64
    entry = cache / "adapters" / first
    assert sorted(p.name for p in entry.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (entry / "adapter_config.json").read_bytes() == (
        adapters[0] / "adapter_config.json"
    ).read_bytes()

    upload(client, adapters[1], "team/alpha")  # the object changes in the bucket
    llm.llm_engine.add_lora(LoRARequest("remote", 1, "s3://adapters/team/alpha", load_inplace=True))
    second = llm.llm_engine.lora_version(1)
    assert second not in (None, first)
    assert greedy_tokens(llm, remote) == local[1]

    # the same content under another prefix is the same cache entry, the same version
    upload(client, adapters[1], "copy")
    assert greedy_tokens(llm, LoRARequest("copy", 2, "s3://adapters/copy")) == local[1]
    assert llm.llm_engine.lora_version(2) == second

    with pytest.raises(
        InvalidAdapterError, match=r"adapter 'missing'.*s3://adapters/nothing.*holds no adapter"
    ):
        llm.llm_engine.add_lora(LoRARequest("missing", 3, "s3://adapters/nothing"))
    assert greedy_tokens(llm, remote) == local[1]


def test_the_object_store_cache_keeps_its_bound(base, adapters, s3, tmp_path, monkeypatch):
    """An adapter larger than the bound is refused before it is fetched; with room for one,
    fetching a second adapter evicts the least recently used entry."""
    from loraplex import LLM, LoRARequest
    from loraplex.errors import InvalidAdapterError

    client, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    upload(client, adapters[0], "bound/one")
    upload(client, adapters[1], "bound/two")
    size = sum(f.stat().st_size for f in adapters[0].iterdir() if f.name.startswith("adapter_"))
    cache = tmp_path / "cache"

    small = LLM(
        model=str(base),
        enable_lora=True,
        max_lora_rank=8,
        lora_cache_dir=str(cache),
        lora_cache_max_bytes=size // 2,
    )
    with pytest.raises(InvalidAdapterError, match=r"adapter_model.safetensors is \d+ bytes, over"):
        small.llm_engine.add_lora(LoRARequest("one", 1, "s3://adapters/bound/one"))
    assert not list(cache.rglob("adapter_*"))  # nothing was fetched
    del small

    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_lora_rank=8,
        lora_cache_dir=str(cache),
        lora_cache_max_bytes=size + size // 2,
    )
    llm.llm_engine.add_lora(LoRARequest("one", 1, "s3://adapters/bound/one"))
    llm.llm_engine.add_lora(LoRARequest("two", 2, "s3://adapters/bound/two"))
    entries = [p.name for p in (cache / "adapters").iterdir() if not p.name.startswith(".")]
    assert entries == [llm.llm_engine.lora_version(2)]


def hub_repo(cache: Path, repo: str, commits: dict[str, Path], refs: dict[str, str]) -> Path:
    """``repo`` in a Hugging Face cache laid out as ``huggingface_hub`` lays it out: each
    commit's snapshot files links into ``blobs``, each ref a file naming its commit."""
    import hashlib

    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, adapter in commits.items():
        for f in sorted(adapter.rglob("adapter_*")):
            data = f.read_bytes()
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = folder / "snapshots" / commit / f.relative_to(adapter)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    for ref, commit in refs.items():
        (folder / "refs" / ref).write_text(commit)
    return folder


HUB_CHILD = textwrap.dedent(
    """
    import json, sys
    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.errors import InvalidAdapterError
    base, snapshot = sys.argv[1:3]
    llm = LLM(model=base, enable_lora=True, max_lora_rank=8)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = {}
    for i, path in enumerate(["org/tiny-lora", "org/tiny-lora@v1", "hf://org/tiny-lora@" + "a" * 40,
                              snapshot]):
        got = llm.generate("the quick", greedy, lora_request=LoRARequest(f"h{i}", i + 1, path),
                           use_tqdm=False)[0].outputs[0]
        out[path] = [got.token_ids, llm.llm_engine.lora_version(i + 1)]
    try:
        llm.llm_engine.add_lora(LoRARequest("absent", 9, "org/absent-lora"))
        out["absent"] = None
    except InvalidAdapterError as e:
        out["absent"] = str(e)
    print(json.dumps(out))
    """
)


def test_hub_ids_read_through_the_hub_cache_offline_at_a_ref_or_revision(base, adapters, tmp_path):
    """``org/name`` follows ``refs/main``; ``@v1`` (a ref) and ``@<commit>`` pin a commit,
    which is the adapter's version; with ``HF_HUB_OFFLINE=1`` nothing is asked of the network
    and a repo missing from the cache is that adapter's error. A snapshot folder given as a
    local path is read beneath its repo folder (its files are links into ``blobs``)."""
    from loraplex import LLM, LoRARequest

    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8)
    local = [
        greedy_tokens(llm, LoRARequest(f"l{i}", 1 + i, str(a))) for i, a in enumerate(adapters)
    ]
    del llm
    a, b = "a" * 40, "b" * 40
    cache = tmp_path / "hub"
    repo = hub_repo(cache, "org/tiny-lora", {a: adapters[0], b: adapters[1]}, {"main": b, "v1": a})
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", HUB_CHILD, str(base), str(repo / "snapshots" / a)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["org/tiny-lora"] == [local[1], b]
    assert out["org/tiny-lora@v1"] == [local[0], a]
    assert out["hf://org/tiny-lora@" + a] == [local[0], a]
    assert out[str(repo / "snapshots" / a)][0] == local[0]
    assert (
        "adapter 'absent'" in out["absent"]
        and "could not be fetched as a hub repo" in out["absent"]
    )


def test_a_read_that_hangs_times_out_as_that_adapters_error(base, adapters, monkeypatch):
    """A read blocked until the test releases it (a stalled mount, say) ends as the adapter's
    error after ``lora_read_timeout``; other adapters load and serve meanwhile, and the hung
    read, once released, changes nothing."""
    import loraplex.lora.adapter as adapter_mod
    from loraplex import LLM, LoRARequest
    from loraplex.errors import InvalidAdapterError

    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, lora_read_timeout=0.5)
    good = LoRARequest("good", 1, str(adapters[0]))
    before = greedy_tokens(llm, good)
    llm.llm_engine.remove_lora(1)
    release, entered = threading.Event(), threading.Event()
    real = adapter_mod._read_config

    def stalled(request, where, walk):
        if request.lora_name == "stalled":
            entered.set()
            release.wait()  # never within the test's waits: released at its end
        return real(request, where, walk)

    monkeypatch.setattr(adapter_mod, "_read_config", stalled)
    stalled_request = LoRARequest("stalled", 2, str(adapters[1]))
    try:
        with pytest.raises(
            InvalidAdapterError, match=r"adapter 'stalled'.*did not finish in 0.5 s"
        ):
            llm.llm_engine.add_lora(stalled_request)
        assert entered.is_set() and not release.is_set()
        out = llm.generate("the quick", greedy(), lora_request=stalled_request, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "abort" and "did not finish" in out.error
        assert greedy_tokens(llm, good) == before  # another adapter's read is not held up
    finally:
        release.set()
    assert 2 not in llm.llm_engine.list_loras()
