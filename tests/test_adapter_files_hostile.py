"""Adapter files are untrusted input (issue 27's hostile cases, the reading side): a FIFO, a
link to ``/dev/zero``, a link to a file outside the adapter's folder, a config past its size
bound, a sparse weights file far larger than its header declares. Each load runs in a child
process (a wait it could not finish if it blocked or read the file whole): it is refused
naming the adapter and the file, the child's peak memory grows by under 64 MB, and a good
adapter's output before and after is the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tiny_adapters import build_adapter
from tiny_models import build_model

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.errors import InvalidAdapterError
    base, good, bad = sys.argv[1:4]
    llm = LLM(model=base, enable_lora=True, max_lora_rank=8, max_loras=2)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    def run():
        out = llm.generate("the quick", greedy, lora_request=LoRARequest("good", 1, good),
                           use_tqdm=False)
        return out[0].outputs[0].token_ids
    before = run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    try:
        llm.llm_engine.add_lora(LoRARequest("hostile", 2, bad))
        error = None
    except InvalidAdapterError as e:
        error = str(e)
    seconds = time.monotonic() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    print(json.dumps({"error": error, "grown_mb": grown_mb, "seconds": seconds,
                      "same": run() == before}))
    """
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("hostile-base"), "llama")


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return build_adapter(base, tmp_path_factory.mktemp("good") / "good", r=8, alpha=16, seed=4)


def fifo(path):
    path.unlink()
    os.mkfifo(path)


def dev_zero(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def link_out(path):
    """The file swapped for a link to a copy of itself outside the adapter's folder."""
    outside = path.parent.parent / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside)


def huge_config(path):
    path.write_text(json.dumps(json.loads(path.read_text())) + " " * (2 << 20))


def sparse_weights(path):
    os.truncate(path, 2 << 30)  # the header's tensors, then 2 GB of holes


@pytest.mark.parametrize(
    "file, break_it, said",
    [
        ("adapter_config.json", fifo, "adapter_config.json is not a regular file"),
        ("adapter_config.json", dev_zero, "adapter_config.json is refused: it leads outside"),
        ("adapter_config.json", link_out, "adapter_config.json is refused: it leads outside"),
        ("adapter_config.json", huge_config, "over the 1048576-byte bound"),
        ("adapter_model.safetensors", fifo, "is not a regular file"),
        ("adapter_model.safetensors", dev_zero, "safetensors is refused: it leads outside"),
        ("adapter_model.safetensors", link_out, "safetensors is refused: it leads outside"),
        ("adapter_model.safetensors", sparse_weights, "the file holds 2147483648"),
    ],
)
def test_a_hostile_file_is_refused_fast_and_small(base, good, tmp_path, file, break_it, said):
    folder = build_adapter(base, tmp_path / "hostile", r=8, alpha=16, seed=9)
    break_it(folder / file)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), str(good), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None, result
    assert "adapter 'hostile'" in result["error"] and said in result["error"], result
    assert result["grown_mb"] < 64, result
    # the bound (1 s from the read's start); these refusals take milliseconds, so
    # the machine's noise cannot reach it
    assert result["seconds"] < 1.0, result
    assert result["same"], result


def test_through_the_server_each_is_refused_and_health_answers(base, good, tmp_path):
    """The same files loaded through ``/v1/load_lora_adapter`` (inside ``--lora-root``), and
    a backtracking ``rank_pattern``: each load answers, the bad ones a 400 naming the
    adapter, ``/health`` (polled from another process) under 50 ms at p99 throughout, and the
    good adapter's completion the same before and after."""
    import shutil
    import signal

    from test_server import KEY, health_latencies, http, p99, start_server
    from tiny_adapters import edit_config

    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(good, root / "good")
    cases = {
        "fifo": fifo,
        "zero": dev_zero,
        "big": huge_config,
        "sparse": sparse_weights,
        "out": link_out,
    }
    for name, break_it in cases.items():
        folder = build_adapter(base, root / name, r=8, alpha=16, seed=9)
        target = "adapter_model.safetensors" if name in ("sparse", "out") else "adapter_config.json"
        break_it(folder / target)
    swap = build_adapter(base, root / "swap", r=8, alpha=16, seed=11)
    elsewhere = build_adapter(base, tmp_path / "elsewhere", r=8, alpha=16, seed=12)
    evil = build_adapter(base, root / "evil", r=8, alpha=16, seed=10)
    edit_config(evil, rank_pattern={"(.|.)*Z": 4})
    args = [str(base), "--api-key", KEY, "--enable-lora", "--max-lora-rank", "8"]
    args += ["--allow-runtime-lora-updating", "--lora-root", str(root), "--max-model-len", "128"]
    proc, url = start_server(args, tmp_path / "server.log")
    try:
        body = {"prompt": "the quick", "max_tokens": 6, "temperature": 0, "ignore_eos": True}

        def complete() -> str:
            status, text = http(url + "/v1/completions", "POST", {"model": "good", **body})
            assert status == 200, text
            return json.loads(text)["choices"][0]["text"]

        status, text = http(
            url + "/v1/load_lora_adapter",
            "POST",
            {"lora_name": "good", "lora_path": str(root / "good")},
        )
        assert status == 200, text
        before = complete()
        with health_latencies(url, tmp_path) as latencies:
            for name in cases:
                status, text = http(
                    url + "/v1/load_lora_adapter",
                    "POST",
                    {"lora_name": name, "lora_path": str(root / name)},
                )
                assert status == 400 and f"adapter {name!r}" in text, (name, status, text)
            status, text = http(
                url + "/v1/load_lora_adapter", "POST", {"lora_name": "evil", "lora_path": str(evil)}
            )
            assert status == 200, text
            # a folder read once, then swapped for a link out of the root: its next read
            # (after an eviction: one host slot) is refused
            status, text = http(
                url + "/v1/load_lora_adapter", "POST", {"lora_name": "swap", "lora_path": str(swap)}
            )
            assert status == 200, text
            assert complete() == before  # evicts "swap"
            shutil.rmtree(swap)
            swap.symlink_to(elsewhere)
            status, text = http(url + "/v1/completions", "POST", {"model": "swap", **body})
            assert status != 200 and "adapter 'swap'" in text, (status, text)
            assert "adapter_config.json is refused: it leads outside" in text, text
        assert p99(latencies) < 0.05, sorted(latencies)[-5:]
        assert complete() == before
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_folder_swapped_for_a_link_out_is_refused_at_its_next_read(base, good, tmp_path):
    """Offline, with ``lora_root``: an adapter read once, its folder then swapped for a link
    to an adapter outside the root; the read after its eviction (one host slot), and an
    in-place reload, are each refused naming the adapter and the file; the walk that stands
    in for ``openat2`` refuses the same."""
    import shutil

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.errors import InvalidAdapterError

    root = tmp_path / "root"
    swap = build_adapter(base, root / "swap", r=8, alpha=16, seed=11)
    elsewhere = build_adapter(base, tmp_path / "elsewhere", r=8, alpha=16, seed=12)
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, lora_root=[str(root)])
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    swapped, other = LoRARequest("swap", 1, str(swap)), LoRARequest("good", 2, str(good))

    def run(lora):
        return llm.generate("the quick", greedy, lora_request=lora, use_tqdm=False)[0]

    assert run(swapped).outputs[0].finish_reason == "length"
    assert run(other).outputs[0].finish_reason == "length"  # evicts "swap"
    shutil.rmtree(swap)
    swap.symlink_to(elsewhere)
    out = run(swapped)
    assert out.outputs[0].finish_reason == "abort", out
    assert "adapter 'swap'" in out.error and "leads outside the adapter's root" in out.error
    with pytest.raises(InvalidAdapterError, match="adapter_config.json is refused"):
        llm.llm_engine.add_lora(LoRARequest("swap", 1, str(swap), load_inplace=True))
    llm.llm_engine.lora.policy.walk = True
    with pytest.raises(InvalidAdapterError, match="adapter_config.json is refused"):
        llm.llm_engine.add_lora(LoRARequest("swap", 1, str(swap), load_inplace=True))
    assert run(other).outputs[0].finish_reason == "length"
