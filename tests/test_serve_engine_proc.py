"""``loraplex serve`` runs its engine in a process of its own, as vLLM V1 does
(``VLLM_ENABLE_V1_MULTIPROCESSING``, on by default; ``0`` keeps it in the server's
process): outputs are the same either way and equal offline ``LLM.generate``; an engine
process that dies fails the requests in flight (each stream ends with an error event and
``[DONE]``), and every later request, ``/health`` included, is a 503 naming the engine,
while the server keeps answering and exits cleanly on SIGTERM; and no engine
process outlives its server, however the server ends."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from test_server import PROMPTS, client, http, start_server
from tiny_models import build_model

SPAWNED = b"from multiprocessing.spawn import spawn_main"


def engine_children(pid: int) -> list[int]:
    """The spawned children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat[1]) == pid and SPAWNED in cmdline:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """No such process, or only its zombie left."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True
    return stat[0] == "Z"


def wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # bounded
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("proc-base"), "llama")


def complete_all(url: str, model: str) -> list[str]:
    c = client(url, key=None)
    return [
        c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
        for p in PROMPTS
    ]


def test_outputs_equal_with_the_engine_in_either_process_and_offline(base, tmp_path):
    llm = LLM(model=str(base), max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=12)
    offline = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    answers = {}
    for mode in ("1", "0"):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING=mode)
        proc, url = start_server(
            [str(base), "--max-model-len", "256"], tmp_path / f"log{mode}", env=env
        )
        try:
            children = engine_children(proc.pid)
            assert len(children) == (1 if mode == "1" else 0), children
            answers[mode] = complete_all(url, str(base))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        for child in children:
            assert wait_for(lambda child=child: gone(child), 10), "the engine outlived its server"
    assert answers["1"] == answers["0"] == offline


def sse_events(response) -> list[str]:
    return [
        line[len("data: ") :]
        for line in (raw.decode().rstrip("\n") for raw in response)
        if line.startswith("data: ")
    ]


def test_a_dead_engine_process_fails_its_requests_not_the_server(base, tmp_path):
    import urllib.request

    proc, url = start_server([str(base), "--max-model-len", "256"], tmp_path / "log")
    try:
        (engine,) = engine_children(proc.pid)
        body = dict(
            model=str(base), prompt=PROMPTS[0], max_tokens=240, stream=True, ignore_eos=True
        )
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as response:
            first = response.readline()  # in flight: 240 tokens cannot all be out yet
            assert first.startswith(b"data: ") and b'"error"' not in first
            os.kill(engine, signal.SIGKILL)
            events = sse_events(response)  # the stream ends: no hang
        assert events[-1] == "[DONE]"
        errors = [json.loads(e) for e in events[:-1] if '"error"' in e]
        assert errors and errors[-1]["error"]["code"] == 503, events[-3:]
        assert wait_for(lambda: http(url + "/health", key=None)[0] == 503, 10)
        status, text = http(
            url + "/v1/completions", "POST", dict(model=str(base), prompt="hi", max_tokens=2)
        )
        assert status == 503 and "engine" in json.loads(text)["error"]["message"]
        for route in ("/v1/models", "/metrics"):  # what needs the engine says it is gone
            status, text = http(url + route, key=None)
            assert status == 503 and "engine" in json.loads(text)["error"]["message"], route
        assert proc.poll() is None  # the server itself answers on
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_killed_server_leaves_no_engine_process(base, tmp_path):
    proc, url = start_server([str(base), "--max-model-len", "256"], tmp_path / "log")
    (engine,) = engine_children(proc.pid)
    assert complete_all(url, str(base))
    proc.kill()  # no shutdown at all: the engine sees its pipe close
    proc.wait(timeout=30)
    assert wait_for(lambda: gone(engine), 30), "the engine process outlived a killed server"
