"""The door against vLLM's behaviour, with the openai SDK and plain HTTP on a real server:
content parts, every refused field a 400 naming it, echo logprobs equal to offline
``prompt_logprobs``, vLLM's metrics after a known workload, disconnects and SIGTERM that
abort work that could not have finished, and hostile requests that never get a 5xx nor
hold up ``/health``."""

from __future__ import annotations

import json
import math
import signal
import socket
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex import LLM, SamplingParams
from test_server import CHATML, KEY, health_latencies, http, p99, start_server
from tiny_adapters import build_adapter
from tiny_models import build_model, set_chat_template

LONG = 30000  # tokens a request asks for: minutes of decoding, far past any wait here
LOOP = "{% for i in range(10**4) %}{% for j in range(10**4) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = build_model(tmp_path_factory.mktemp("door-base"), "llama", max_position_embeddings=32768)
    set_chat_template(base, CHATML)
    root = tmp_path_factory.mktemp("door-root")
    adapters = {n: build_adapter(base, root / n, seed=s) for n, s in (("d0", 5), ("d1", 6))}
    return dict(base=base, root=root, adapters=adapters)


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    a = assets["adapters"]
    args = [str(assets["base"]), "--served-model-name", "tiny", "--api-key", KEY]
    args += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "4"]
    args += ["--lora-modules", f"d0={a['d0']}", "--allow-runtime-lora-updating"]
    args += ["--lora-root", str(assets["root"]), "--trust-request-chat-template"]
    args += ["--max-request-body-bytes", str(4 << 20), "--max-logprobs", "5"]
    args += ["--enable-prompt-tokens-details"]
    proc, url = start_server(args, tmp_path_factory.mktemp("door-logs") / "server.log")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def post(url: str, route: str, body) -> tuple[int, dict]:
    status, text = http(url + route, "POST", body)
    try:
        return status, json.loads(text)
    except ValueError:
        return status, {"text": text}


def scrape(url: str) -> dict[str, list]:
    """Every sample of /metrics, parsed by prometheus_client's own parser, by name."""
    _, text = http(url + "/metrics", key=None)
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def total(samples: dict[str, list], name: str, **labels) -> float:
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_idle(url: str) -> dict[str, list]:
    for _ in range(200):  # bounded: aborts land within a few engine steps
        m = scrape(url)
        if total(m, "vllm:num_requests_running") == 0 and total(
            m, "loraplex:kv_cache_free_blocks"
        ) == total(m, "loraplex:kv_cache_total_blocks"):
            return m
        time.sleep(0.1)
    raise AssertionError("the engine did not go idle")


def test_content_parts_equal_the_same_text_as_a_string(server):
    text = [{"role": "user", "content": "hello there\nand more"}]
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello there"},
                {"type": "text", "text": "and more"},
            ],
        }
    ]
    a = post(server, "/tokenize", {"messages": text})[1]["tokens"]
    b = post(server, "/tokenize", {"messages": parts})[1]["tokens"]
    assert a == b and len(a) > 5
    c = client(server)
    one = c.chat.completions.create(model="tiny", messages=text, max_tokens=4, temperature=0)
    two = c.chat.completions.create(model="tiny", messages=parts, max_tokens=4, temperature=0)
    assert one.usage.prompt_tokens == two.usage.prompt_tokens == len(a)
    assert one.choices[0].message.content == two.choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [image]}], max_tokens=2
        )
    assert "messages[0].content[0]" in str(e.value) and "image_url" in str(e.value)


@pytest.mark.parametrize(
    "route, extra, named",
    [
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format",
        ),
        ("chat", {"response_format": {"type": "structural_tag"}}, "structural_tag"),
        ("chat", {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
        # tool_choice 'auto' (the default with tools) on a server without the parser flags
        (
            "chat",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "--enable-auto-tool-choice",
        ),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"use_beam_search": True}, "use_beam_search"),
        ("completion", {"guided_grammar": "root ::= [unclosed"}, "guided_grammar"),
        ("completion", {"suffix": "tail"}, "suffix"),
        ("completion", {"best_of": 3}, "best_of"),
        ("completion", {"logits_processors": ["x"]}, "logits_processors"),
    ],
)
def test_fields_not_honoured_are_a_400_naming_them(server, route, extra, named):
    if route == "chat":
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
        status, out = post(server, "/v1/chat/completions", {"max_tokens": 2, **body})
    else:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra}
        status, out = post(server, "/v1/completions", body)
    assert status == 400, out
    assert named in out["error"]["message"] and out["error"]["type"] == "BadRequestError"


def test_echo_logprobs_equal_offline_prompt_logprobs(server, assets):
    prompt = "the quick brown fox"
    llm = LLM(model=str(assets["base"]), max_model_len=256, max_logprobs=5)
    offline = llm.generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0), use_tqdm=False
    )[0]
    ids = offline.prompt_token_ids
    for max_tokens in (0, 3):
        body = dict(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=max_tokens)
        status, out = post(server, "/v1/completions", dict(body, temperature=0))
        assert status == 200, out
        choice = out["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith(prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            want = offline.prompt_logprobs[i][ids[i]].logprob
            assert math.isclose(lp["token_logprobs"][i], want, rel_tol=1e-4, abs_tol=1e-5)
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert out["usage"]["completion_tokens"] == max_tokens
        if max_tokens == 0:
            assert choice["text"] == prompt
    status, out = post(
        server,
        "/v1/completions",
        dict(model="tiny", prompt=prompt, max_tokens=2, prompt_logprobs=1, return_token_ids=True),
    )
    choice = out["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 2
    got = choice["prompt_logprobs"]
    assert got[0] is None
    for i in range(1, len(ids)):
        want = offline.prompt_logprobs[i][ids[i]].logprob
        assert math.isclose(got[i][str(ids[i])]["logprob"], want, rel_tol=1e-4, abs_tol=1e-5)
    status, out = post(
        server,
        "/v1/completions",
        dict(
            model="tiny", prompt=prompt, max_tokens=2, logprobs=1, return_tokens_as_token_ids=True
        ),
    )
    assert all(t.startswith("token_id:") for t in out["choices"][0]["logprobs"]["tokens"])


def test_a_request_chat_template_needs_trust_and_a_looping_one_is_refused_fast(server, assets):
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 2}
    status, out = post(server, "/v1/chat/completions", dict(body, chat_template="{{ 'x' }}"))
    assert status == 200, out  # this server trusts request templates
    start = time.monotonic()
    status, out = post(server, "/v1/chat/completions", dict(body, chat_template=LOOP))
    assert status == 400 and "chat template" in out["error"]["message"], out
    assert time.monotonic() - start < 30  # the render is bounded: hours unbounded


def test_vllm_metrics_after_a_known_workload(server, assets):
    before = wait_idle(server)
    c = client(server)
    workload = [("tiny", 5), ("d0", 7), ("tiny", 3)]
    for model, n in workload:
        c.completions.create(
            model=model,
            prompt="hello",
            max_tokens=n,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    stream = c.completions.create(
        model="d0", prompt="hi", max_tokens=6, stream=True, extra_body={"ignore_eos": True}
    )
    assert sum(len(ch.choices[0].text) >= 0 for ch in stream if ch.choices) >= 1
    after = wait_idle(server)
    generated = sum(n for _, n in workload) + 6
    requests = len(workload) + 1
    v = {"model_name": "tiny"}

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("vllm:generation_tokens_total", **v) == generated
    assert delta("vllm:request_success_total", finished_reason="length", **v) == requests
    assert delta("vllm:inter_token_latency_seconds_count", **v) == generated - requests
    assert delta("vllm:time_to_first_token_seconds_count", **v) == requests
    assert delta("vllm:e2e_request_latency_seconds_count", **v) == requests
    for name in (
        "vllm:request_queue_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_prompt_tokens_count",
        "vllm:request_generation_tokens_count",
    ):
        assert delta(name, **v) == requests, name
    assert delta("vllm:request_generation_tokens_sum", **v) == generated
    assert delta("vllm:prompt_tokens_total", **v) > 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert [s.labels["model_name"] for s in after[name]] == ["tiny"]
    assert 0 <= total(after, "vllm:kv_cache_usage_perc", **v) < 1
    (info,) = after["vllm:lora_requests_info"]
    assert info.labels["max_lora"] == "2" and info.labels["running_lora_adapters"] == ""
    assert delta("loraplex:generation_tokens_total", adapter="d0") == 13
    # an unloaded adapter's own series go
    status, body = post(
        server,
        "/v1/load_lora_adapter",
        {"lora_name": "temp", "lora_path": str(assets["adapters"]["d1"])},
    )
    assert status == 200, body
    c.completions.create(model="temp", prompt="x", max_tokens=2)
    _, text = http(server + "/metrics", key=None)
    assert 'adapter="temp"' in text
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "temp"})[0] == 200
    _, text = http(server + "/metrics", key=None)
    assert 'adapter="temp"' not in text


def _post_raw(url: str, body: dict, key: str | None = KEY) -> socket.socket:
    """A completion request sent on a socket of its own (the caller reads or drops it)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    s = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    s.sendall(head.encode() + payload)
    return s


def _read_until(s: socket.socket, marker: bytes, seen: bytes = b"") -> bytes:
    while marker not in seen:
        chunk = s.recv(65536)
        if not chunk:
            break
        seen += chunk
    return seen


def _stream_then_drop(url: str, body: dict) -> None:
    """Opens a streamed completion, reads its first event, and drops the connection."""
    with _post_raw(url, body) as s:
        assert b"data: " in _read_until(s, b"data: ")


def _send_then_drop(url: str, body: dict, after_s: float) -> None:
    with _post_raw(url, body):
        time.sleep(after_s)


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_aborts_work_that_could_not_have_finished(server, streamed):
    before = wait_idle(server)
    body = {"model": "d0", "prompt": "hi", "max_tokens": LONG, "ignore_eos": True}
    if streamed:
        _stream_then_drop(server, dict(body, stream=True))
    else:
        _send_then_drop(server, body, after_s=1.0)
    after = wait_idle(server)  # well before LONG tokens could be decoded
    aborted = total(after, "vllm:request_success_total", finished_reason="abort") - total(
        before, "vllm:request_success_total", finished_reason="abort"
    )
    assert aborted == 1
    generated = total(after, "vllm:generation_tokens_total") - total(
        before, "vllm:generation_tokens_total"
    )
    assert generated < LONG


def test_hostile_requests_get_4xx_and_never_hold_up_health(server, assets, tmp_path):
    hostile = [
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "max_tokens": 2,
                "chat_template": LOOP,
                "messages": [{"role": "user", "content": "x"}],
            },
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "word " * 700_000, "max_tokens": 2}),
        (
            "/v1/completions",
            {
                "model": "tiny",
                "prompt": "x",
                "max_tokens": 2,
                "bad_words": [f"w{i}" for i in range(10_000)],
            },
        ),
        ("/v1/completions", {"model": "m" * 100_000, "prompt": "x"}),
        ("/v1/load_lora_adapter", {"lora_name": "nul", "lora_path": "/tmp/a\u0000b"}),
        ("/v1/completions", {"model": "tiny", "prompt": [10**9], "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}),
        (
            "/tokenize",
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        ),
    ]
    with health_latencies(server, tmp_path) as latencies:
        for route, body in hostile:
            status, out = post(server, route, body)
            costly_but_valid = "bad_words" in body  # served: linear in the words
            assert status == 200 if costly_but_valid else 400 <= status < 500, (
                route,
                status,
                str(out)[:300],
            )
        big = b'{"model": "tiny", "prompt": "' + b"x" * (5 << 20) + b'"}'
        req = urllib.request.Request(server + "/v1/completions", data=big, method="POST")
        req.add_header("Authorization", f"Bearer {KEY}")
        req.add_header("Content-Type", "application/json")
        try:
            urllib.request.urlopen(req, timeout=60)
            raise AssertionError("a body past the limit was taken")
        except urllib.error.HTTPError as e:
            assert e.code == 413
        ok = client(server).completions.create(model="d0", prompt="x", max_tokens=2)
        assert ok.usage.completion_tokens == 2  # every later good request is served
    assert len(latencies) > 5
    assert p99(latencies) < 0.05, sorted(latencies)[-5:]


def sigterm_during_stream(proc, url: str) -> tuple[str, float]:
    """Starts a 30,000-token stream, sends the server SIGTERM once it has begun, and reads
    to ``[DONE]`` (or the end): what the stream said, and when the signal went."""
    body = {"prompt": "hi", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with _post_raw(url, body, key=None) as s:
        seen = _read_until(s, b"data: ")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen = _read_until(s, b"data: [DONE]", seen)
    return seen.decode(errors="replace"), start


def test_sigterm_cuts_streams_with_an_error_event_and_done(assets, tmp_path):
    args = [str(assets["base"]), "--shutdown-timeout", "2", "--max-model-len", "32768"]
    proc, url = start_server(args, tmp_path / "log")
    text, start = sigterm_during_stream(proc, url)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - start < 2 + 8  # --shutdown-timeout plus a few seconds
    assert '"error"' in text and "shutting down" in text and "data: [DONE]" in text


def test_cached_prompt_tokens_are_reported_and_a_cache_salt_keeps_them_apart(server):
    """With --enable-prompt-tokens-details, ``usage.prompt_tokens_details.cached_tokens``
    is what the prefix cache held (left out when nothing, as vLLM); a ``cache_salt`` is
    found only by the same salt (completions and chat, streamed too); an empty salt is a
    400 naming it."""
    prompt = "a salted prefix of quite a few words to fill several blocks " * 4
    api = client(server)

    def cached(salt=None, **kw):
        extra = {} if salt is None else {"cache_salt": salt}
        out = api.completions.create(
            model="tiny", prompt=prompt, max_tokens=2, temperature=0, extra_body=extra, **kw
        )
        details = out.usage.prompt_tokens_details
        return 0 if details is None else details.cached_tokens

    assert cached("first") == 0
    assert cached("second") == 0
    hit = cached("first")
    assert hit > 0 and hit % 16 == 0
    chat = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=2,
        extra_body={"cache_salt": "chat"},
        stream=True,
        stream_options={"include_usage": True},
    )
    assert list(chat)[-1].usage.prompt_tokens_details is None
    again = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=2,
        extra_body={"cache_salt": "chat"},
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        cached("")


def test_user_is_inert_under_fcfs(server):
    """vLLM takes any ``user`` and does nothing with it; so does loraplex without fair
    share (under ``fair`` it names the tenant: tests/test_serve_fair.py)."""
    r = client(server).completions.create(model="tiny", prompt="hi", max_tokens=2, user="u" * 300)
    assert r.usage.completion_tokens == 2
    assert "loraplex:tenant_request_queue_time_seconds_count" not in scrape(server)
