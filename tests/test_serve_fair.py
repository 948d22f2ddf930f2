"""``loraplex serve --scheduling-policy fair`` (issue 29) with the openai SDK on a real
server: the body's ``user`` names the tenant whose share a request counts against, tenants
and their queue time reach /metrics, a bad ``user`` is a 400 naming it while the server
serves on; under ``fcfs`` the same ``user`` is inert, as in vLLM."""

from __future__ import annotations

import json
import signal

import openai
import pytest

from test_serve_door import scrape
from test_server import CHATML, KEY, start_server
from tiny_adapters import build_adapter
from tiny_models import build_model, set_chat_template


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = build_model(tmp_path_factory.mktemp("fair-serve-base"), "llama")
    set_chat_template(base, CHATML)
    adapter = build_adapter(base, tmp_path_factory.mktemp("fair-serve-a") / "a0", seed=3)
    args = [str(base), "--served-model-name", "tiny", "--api-key", KEY]
    args += ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"a0={adapter}"]
    args += ["--scheduling-policy", "fair", "--fair-share-weights", json.dumps({"alice": 2})]
    proc, url = start_server(args, tmp_path_factory.mktemp("fair-serve-logs") / "server.log")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def by_tenant(samples: dict[str, list], name: str) -> dict[str, float]:
    return {s.labels["tenant"]: s.value for s in samples.get(name, [])}


def test_user_names_the_tenant_and_reaches_the_metrics(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    for user, model in (("alice", "a0"), ("alice", "tiny"), ("bob", "a0")):
        r = c.completions.create(model=model, prompt="hello there", max_tokens=3, user=user)
        assert r.usage.completion_tokens == 3
    chat = c.chat.completions.create(
        model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="carol"
    )
    assert chat.usage.completion_tokens == 2
    samples = scrape(server)
    queued = by_tenant(samples, "loraplex:tenant_request_queue_time_seconds_count")
    assert queued == {"alice": 2, "bob": 1, "carol": 1}, queued
    service = by_tenant(samples, "loraplex:tenant_fair_share_service")
    assert set(service) == {"alice", "bob", "carol"} and min(service.values()) > 0, service
    # alice's weight 2 halves what the same work counts: her two requests (one on the
    # base) count about what bob's one does
    assert service["alice"] < 2 * service["bob"], service


def test_a_bad_user_is_a_400_naming_it_and_the_server_serves_on(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    for bad in ("", "u" * 257):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="a0", prompt="hi", max_tokens=2, user=bad)
        assert e.value.body["param"] == "user", e.value.body
    r = c.completions.create(model="a0", prompt="hi", max_tokens=2, user="u" * 256)
    assert r.usage.completion_tokens == 2
