"""``loraplex serve --replicas 2``: a local Ray cluster (started by the server, a real
subprocess on 127.0.0.1) with 2 CPU engine replicas of a tiny model and 6 adapters, driven by
the ``openai`` client. Greedy outputs equal one engine's; after warm-up each adapter's
requests land on the replica that holds it (the ``x-loraplex-replica`` header) unless that
replica is saturated; an id clash registered through one replica is refused through the
other; unload frees the adapter on every replica; a replica killed mid-run fails only its
own in-flight requests and the cluster serves on."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")

from loraplex import LLM, LoRARequest, SamplingParams  # noqa: E402
from test_server import http, start_server  # noqa: E402
from tiny_adapters import build_adapter, build_corrupt_adapter  # noqa: E402
from tiny_models import build_model  # noqa: E402

HEADER = "x-loraplex-replica"
PROMPTS = ["def add(a, b):", "the quick brown"]
ADAPTERS = [f"a{i}" for i in range(6)]
MAX_TOKENS = 8
SPILL_TOKENS = 48
LONG = 400  # tokens: seconds of decoding, so streams are mid-run when a replica is killed
MAX_NUM_SEQS = 4  # a replica's max_ongoing_requests: more at once saturates it


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = build_model(tmp_path_factory.mktemp("ray-base"), "llama")
    root = tmp_path_factory.mktemp("ray-root")
    paths = {name: build_adapter(base, root / name, seed=40 + i) for i, name in enumerate(ADAPTERS)}
    spare = build_adapter(base, tmp_path_factory.mktemp("ray-spare") / "s", seed=60)
    extra = build_adapter(base, root / "extra", seed=61)
    build_corrupt_adapter(base, root / "corrupt", seed=62)
    return dict(base=base, root=root, paths=paths, spare=spare, extra=extra)


@pytest.fixture(scope="module")
def cluster(assets, tmp_path_factory):
    p = assets["paths"]
    args = [
        str(assets["base"]),
        "--served-model-name",
        "tiny",
        "--replicas",
        "2",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",  # as many as a replica holds: its streams all run at once
        "4",
        "--max-cpu-loras",
        "4",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--lora-modules",  # a0..a2 at start; a3..a5 found in the root on first use
        *(f"{name}={p[name]}" for name in ADAPTERS[:3]),
        "--lora-root",
        str(assets["root"]),
        "--enable-lora-discovery",
        "--allow-runtime-lora-updating",
    ]
    log = tmp_path_factory.mktemp("ray-logs") / "server.log"
    proc, url = start_server(args, log)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def reference(assets):
    """One engine's greedy outputs, by (model, prompt, max_tokens); the base model is None."""
    llm = LLM(model=str(assets["base"]), enable_lora=True, max_lora_rank=8, max_model_len=512)
    wanted = [(m, p, MAX_TOKENS) for m in [None, *ADAPTERS] for p in PROMPTS]
    wanted += [("a0", p, SPILL_TOKENS) for p in PROMPTS]
    wanted += [(m, PROMPTS[0], LONG) for m in ADAPTERS]
    ids = {m: i + 1 for i, m in enumerate(ADAPTERS)}
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, _, n in wanted]
    loras = [LoRARequest(m, ids[m], str(assets["paths"][m])) if m else None for m, _, _ in wanted]
    outs = llm.generate([p for _, p, _ in wanted], params, lora_request=loras, use_tqdm=False)
    return {key: o.outputs[0].text for key, o in zip(wanted, outs)}


_clients: dict[str, openai.OpenAI] = {}


def client(url: str) -> openai.OpenAI:
    if url not in _clients:  # no API key on this server; no retries: each error is seen
        _clients[url] = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    return _clients[url]


@pytest.fixture(scope="module", autouse=True)
def close_clients():
    yield
    for c in _clients.values():
        c.close()
    _clients.clear()


def complete(url: str, model: str | None, prompt: str, max_tokens: int = MAX_TOKENS):
    """(text, replica) of a greedy completion."""
    raw = client(url).completions.with_raw_response.create(
        model=model or "tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return raw.parse().choices[0].text, raw.headers[HEADER]


def replicas(url: str) -> list[dict]:
    status, body = http(url + "/v1/replicas", key=None)
    assert status == 200, body
    return json.loads(body)["data"]


def holders(url: str) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for r in replicas(url):
        for a in r["adapters"]:
            where.setdefault(a["name"], set()).add(r["replica_id"])
    return where


def stream_completion(url: str, model: str, prompt: str, max_tokens: int, on_first=None):
    """(text, replica) of a streamed greedy completion; ``on_first(replica)`` runs once the
    first chunk is in."""
    with client(url).completions.with_streaming_response.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as resp:
        replica, text = resp.headers[HEADER], ""
        for n, chunk in enumerate(resp.parse()):
            text += "".join(c.text for c in chunk.choices)
            if n == 0 and on_first is not None:
                on_first(replica)
    return text, replica


def test_outputs_equal_one_engine_and_requests_follow_their_adapter(cluster, assets, reference):
    url = cluster
    placed: dict[str, str] = {}
    for model in ADAPTERS:  # warm-up: a3..a5 are found in --lora-root and registered
        _, placed[model] = complete(url, model, PROMPTS[0])
    assert len(set(placed.values())) == 2, placed  # the adapters spread over both replicas
    for _ in range(2):  # sequential: no replica is saturated, so affinity holds every time
        for model in [*ADAPTERS, None]:
            for prompt in PROMPTS:
                text, replica = complete(url, model, prompt)
                assert text == reference[(model, prompt, MAX_TOKENS)], (model, prompt)
                if model is not None:
                    assert replica == placed[model], (model, replica, placed)
    text, replica = stream_completion(url, "a4", PROMPTS[1], MAX_TOKENS)  # streamed
    assert (text, replica) == (reference[("a4", PROMPTS[1], MAX_TOKENS)], placed["a4"])
    cpus = os.cpu_count() or 1  # each replica computes on its share of the cores
    assert [r["torch_threads"] for r in replicas(url)] == [max(1, cpus // 2)] * 2
    for _ in range(150):  # bounded: replicas report to the registry after their steps
        view = holders(url)  # the cluster view agrees with where requests went
        if all(placed[m] in view.get(m, set()) for m in ADAPTERS):
            break
        time.sleep(0.2)
    for model in ADAPTERS:
        assert placed[model] in view.get(model, set()), (model, view)
    status, metrics = http(url + "/metrics", key=None)
    assert status == 200
    for replica in set(placed.values()):
        assert f'replica="{replica}"' in metrics
    assert 'loraplex:request_success_total{adapter="a3",finish_reason="length"}' in metrics
    served = f'loraplex:replica_requests_total{{adapter="a3",replica="{placed["a3"]}"}}'
    assert served in metrics, metrics  # requests counted by the replica that served them


def test_a_saturated_holder_spills_and_outputs_stay_right(cluster, reference):
    url = cluster
    _, home = complete(url, "a0", PROMPTS[0])
    burst = 6 * MAX_NUM_SEQS  # many more at once than one replica takes
    with ThreadPoolExecutor(burst) as pool:
        got = list(
            pool.map(lambda i: complete(url, "a0", PROMPTS[i % 2], SPILL_TOKENS), range(burst))
        )
    served = {replica for _, replica in got}
    assert home in served and len(served) == 2, served  # spilled past the saturated holder
    for i, (text, _) in enumerate(got):
        assert text == reference[("a0", PROMPTS[i % 2], SPILL_TOKENS)]


def test_an_id_clash_through_one_replica_is_refused_through_the_other(cluster, assets, reference):
    url = cluster
    status, body, headers = urllib_post(
        url + "/v1/load_lora_adapter",
        {"lora_name": "c1", "lora_path": str(assets["extra"]), "lora_int_id": 777},
    )
    assert status == 200, body
    owner = headers[HEADER]
    # an adapter whose requests go to the other replica (affinity: sequential requests go
    # to the holder); its in-place reload goes there too
    elsewhere = {}
    for _ in range(3):  # bounded: a holder on both replicas may send a round to either
        for model in ADAPTERS:
            _, replica = complete(url, model, PROMPTS[0])
            if replica != owner:
                elsewhere[model] = replica
        if elsewhere:
            break
    assert elsewhere, f"every adapter's requests went to {owner}, the replica that loaded c1"
    model, other = next(iter(elsewhere.items()))
    status, body, headers = urllib_post(
        url + "/v1/load_lora_adapter",
        {
            "lora_name": model,
            "lora_path": str(assets["extra"]),
            "lora_int_id": 777,
            "load_inplace": True,
        },
    )
    assert status == 400, body
    assert "777" in body and "'c1'" in body, body
    assert headers[HEADER] == other  # refused through the other replica
    # ... before its engine took the new weights: the adapter serves its own, there
    for prompt in PROMPTS:
        assert complete(url, model, prompt) == (reference[(model, prompt, MAX_TOKENS)], other)
    # a new name with the id is refused too, wherever it goes, and is not registered
    status, body, headers = urllib_post(
        url + "/v1/load_lora_adapter",
        {"lora_name": "c2", "lora_path": str(assets["extra"]), "lora_int_id": 777},
    )
    assert status == 400, body
    assert "777" in body and "'c1'" in body and headers[HEADER] in (owner, other), body
    names = [m.id for m in client(url).models.list().data]
    assert "c1" in names and "c2" not in names
    # unload frees it on every replica; it is gone from the cluster
    assert http(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "c1"})[0] == 200
    assert "c1" not in holders(url), replicas(url)
    assert http(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "c1"})[0] == 404
    with pytest.raises(openai.NotFoundError):
        complete(url, "c1", PROMPTS[0])


def test_a_bad_adapter_found_in_the_root_fails_alone(cluster):
    """Found in --lora-root but corrupt: its request is a 400 naming it, nothing is
    registered, and every other adapter serves on."""
    url = cluster
    status, body, headers = urllib_post(
        url + "/v1/completions", {"model": "corrupt", "prompt": "x", "max_tokens": 2}
    )
    assert status == 400 and "corrupt" in body and "Traceback" not in body, body
    assert HEADER in {k.lower() for k in headers}  # the replica that tried it
    assert "corrupt" not in [m.id for m in client(url).models.list().data]
    for model in ADAPTERS:
        assert complete(url, model, PROMPTS[0])[0]


def test_a_client_that_disconnects_frees_its_request_and_the_adapter_can_go(cluster):
    """A stream left after its first chunk is cancelled on its replica: the ingress counts
    it no more (unload is not refused as in use), the replica drops the adapter (it cannot
    while a request uses it), and every KV block comes back."""
    url = cluster
    with client(url).completions.with_streaming_response.create(
        model="extra",  # found in the root on first use
        prompt=PROMPTS[0],
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as resp:
        for _ in resp.parse():
            break  # leave after the first chunk: the connection closes
    status, body = http(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "extra"})
    for _ in range(200):  # bounded: the cancellation reaches the ingress asynchronously
        if status != 409:
            break
        threading.Event().wait(0.1)
        status, body = http(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "extra"})
    assert status == 200, body
    assert "extra" not in holders(url)  # unload answers once no replica holds it
    for _ in range(200):  # bounded: replicas report twice a second
        view = replicas(url)
        if all(r["running"] == r["waiting"] == 0 for r in view) and all(
            r["kv_free_blocks"] == r["kv_total_blocks"] for r in view
        ):
            break
        threading.Event().wait(0.1)
    else:
        pytest.fail(f"blocks not freed: {view}")


def urllib_post(url: str, body: dict) -> tuple[int, str, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_a_killed_replica_fails_only_its_requests_and_the_other_serves_on(cluster, reference):
    url = cluster
    for model in ADAPTERS:  # every adapter held somewhere
        complete(url, model, PROMPTS[0])
    pids = {r["replica_id"]: r["pid"] for r in replicas(url)}
    results: dict[int, tuple[str, str | None]] = {}
    where: dict[int, str] = {}  # stream -> the replica serving it (its response header)
    started = threading.Barrier(len(ADAPTERS) + 1, timeout=120)

    def stream(i: int, model: str) -> None:
        def first_chunk(replica: str) -> None:
            where[i] = replica
            started.wait()

        try:
            text, _ = stream_completion(url, model, PROMPTS[0], LONG, first_chunk)
            results[i] = (text, None)
        except (openai.APIError, openai.APIConnectionError) as e:
            results[i] = ("", str(e))
            if i not in where:  # failed before its first chunk: the kill must still happen
                started.wait()

    threads = [threading.Thread(target=stream, args=(i, m)) for i, m in enumerate(ADAPTERS)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first tokens: kill the replica serving a0's
    victim = where[0]
    os.kill(pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads)  # none hung
    for i, model in enumerate(ADAPTERS):
        text, error = results[i]
        if where[i] != victim:  # the other replica's requests are untouched
            assert error is None, (model, error)
            assert text == reference[(model, PROMPTS[0], LONG)], model
        elif error is None:  # the victim's: finished before it died, right
            assert text == reference[(model, PROMPTS[0], LONG)], model
    # a0's stream had ~400 tokens to go when its replica died: it failed, with a 503's text
    assert results[0][1] is not None and "replica" in results[0][1], results[0]
    # the cluster serves on: every adapter, right outputs (Serve replaces the dead replica)
    for model in ADAPTERS:
        text, _ = complete(url, model, PROMPTS[1])
        assert text == reference[(model, PROMPTS[1], MAX_TOKENS)]
    assert http(url + "/health", key=None)[0] == 200
