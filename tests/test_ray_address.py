"""``loraplex serve --replicas 2 --ray-address ADDR`` on a cluster that already runs (``ray
start --head``, token authentication as Ray 2.60 sets it up): the app is deployed there and
serves; on SIGTERM the server exits 0 and deletes its app, and the cluster, with its adapter
registry, stays up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")

import openai  # noqa: E402

from test_ray_serve import HEADER  # noqa: E402
from test_server import free_port, http, start_server  # noqa: E402
from tiny_adapters import build_adapter, build_corrupt_adapter  # noqa: E402
from tiny_models import build_model  # noqa: E402


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def stop_cluster(group: int) -> None:
    """Stops this cluster's processes only (``ray stop`` would stop every cluster of this
    user on the machine): ``ray start`` ran in a session of its own, and every process it
    started, workers included, is in its process group."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_replicas_join_an_existing_cluster_and_leave_it_running(tmp_path, monkeypatch):
    base = build_model(tmp_path / "base", "llama")
    build_adapter(base, tmp_path / "root" / "b0", seed=80)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    temp_dir = tempfile.mkdtemp(prefix="lpray-", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    head = [ray_cli(), "start", "--head", "--port", str(port), "--num-cpus", "4"]
    head += ["--include-dashboard", "false", "--temp-dir", temp_dir, "--disable-usage-stats"]
    starter = subprocess.Popen(
        head, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert starter.wait(timeout=120) == 0, starter.stdout.read().decode()[-3000:]
        address = f"127.0.0.1:{port}"
        args = [str(base), "--replicas", "2", "--ray-address", address, "--enable-lora"]
        args += ["--max-lora-rank", "8", "--max-model-len", "128"]
        args += ["--lora-root", str(tmp_path / "root"), "--enable-lora-discovery"]
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the server presents the token
        proc, url = start_server(args, tmp_path / "server.log")
        try:
            with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
                raw = client.completions.with_raw_response.create(
                    model="b0", prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}
                )
            assert raw.parse().usage.completion_tokens == 4 and raw.headers[HEADER]
            # 4 CPUs over 2 replicas: 2 torch threads each (Ray alone would give them one)
            status, body = http(url + "/v1/replicas", key=None)
            assert status == 200, body
            assert [r["torch_threads"] for r in json.loads(body)["data"]] == [2, 2], body
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
        # the cluster is still up, the registry in it, the app gone
        check = (
            "import ray; from ray import serve\n"
            f"ray.init(address={address!r}, log_to_driver=False)\n"
            "registry = ray.get_actor('loraplex-adapter-registry', namespace='loraplex')\n"
            "names = [e['name'] for e in ray.get(registry.entries.remote())]\n"
            "print(names, sorted(serve.status().applications))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == "['b0'] []", out.stdout
    finally:
        starter.stdout.close()
        stop_cluster(starter.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_bad_startup_adapter_stops_the_start_naming_it(tmp_path):
    """The server exits non-zero naming the adapter (and is never healthy meanwhile)."""
    base = build_model(tmp_path / "base", "llama")
    bad = build_corrupt_adapter(base, tmp_path / "bad", seed=81)
    log = tmp_path / "server.log"
    args = [str(base), "--replicas", "1", "--enable-lora", "--max-lora-rank", "8"]
    args += ["--max-model-len", "128", "--lora-modules", f"broken={bad}"]
    with pytest.raises(RuntimeError, match="exited") as info:
        proc, _ = start_server(args, log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert "--lora-modules" in str(info.value) and "'broken'" in str(info.value), log.read_text()
