"""``loraplex serve`` takes a ``vllm serve`` launch line: every flag of vLLM's ``--help``
that is not refused on purpose starts a server that serves; the refused ones stop the
start naming the flag; ``--help`` gives each inert flag's reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from test_server import CHATML, KEY, http, start_server
from tiny_adapters import build_adapter
from tiny_models import build_model

# vLLM 0.33's `vllm serve --help`, less the flags refused on purpose (below), each with a
# value a vLLM user would give it
ENGINE_FLAGS = [
    ["--tokenizer-mode", "auto"],
    ["--trust-remote-code"],
    ["--dtype", "auto"],
    ["--seed", "0"],
    ["--max-model-len", "256"],
    ["--enforce-eager"],
    ["--max-logprobs", "20"],
    ["--logprobs-mode", "raw_logprobs"],
    ["--disable-cascade-attn"],
    ["--config-format", "auto"],
    ["--generation-config", "auto"],
    ["--override-generation-config", "{}"],
    ["--enable-sleep-mode"],
    ["--model-impl", "auto"],
    ["--load-format", "auto"],
    ["--safetensors-load-strategy", "lazy"],
    ["--use-tqdm-on-load"],
    ["--pt-load-map-location", "cpu"],
    ["--distributed-executor-backend", "mp"],
    ["--pipeline-parallel-size", "1"],
    ["-tp", "1"],
    ["--data-parallel-size", "1"],
    ["--max-parallel-loading-workers", "2"],
    ["--disable-custom-all-reduce"],
    ["--block-size", "16"],
    ["--gpu-memory-utilization", "0.9"],
    ["--swap-space", "4"],
    ["--kv-cache-dtype", "auto"],
    ["--enable-prefix-caching"],
    ["--prefix-caching-hash-algo", "sha256"],
    ["--cpu-offload-gb", "0"],
    ["--calculate-kv-scales"],
    ["--max-num-batched-tokens", "2048"],
    ["--max-num-seqs", "8"],
    ["--max-num-partial-prefills", "1"],
    ["--max-long-partial-prefills", "1"],
    ["--long-prefill-token-threshold", "0"],
    ["--scheduling-policy", "fcfs"],
    ["--enable-chunked-prefill"],
    ["--async-scheduling"],
    ["--cudagraph-capture-sizes", "1", "2", "4"],
    ["--max-cudagraph-capture-size", "8"],
    ["-O", '{"level": 0}'],
    ["--disable-log-stats"],
    ["--enable-lora"],
    ["--max-loras", "2"],
    ["--max-lora-rank", "8"],
    ["--max-cpu-loras", "4"],
    ["--lora-dtype", "auto"],
    ["--fully-sharded-loras"],
    ["--limit-mm-per-prompt", "{}"],
    ["--mm-processor-cache-gb", "0"],
    ["--hf-token"],
    ["--aggregate-engine-logging"],
    ["--disable-hybrid-kv-cache-manager"],
    ["--kv-sharing-fast-prefill"],
    ["--show-hidden-metrics-for-version", "0.32"],
]
FRONTEND_FLAGS = [
    ["--host", "127.0.0.1"],
    ["--uvicorn-log-level", "warning"],
    ["--disable-uvicorn-access-log"],
    ["--allow-credentials"],
    ["--allowed-origins", '["*"]'],
    ["--allowed-methods", '["*"]'],
    ["--allowed-headers", '["*"]'],
    ["--api-key", KEY],
    ["--chat-template", CHATML],
    ["--chat-template-content-format", "string"],
    ["--trust-request-chat-template"],
    ["--default-chat-template-kwargs", "{}"],
    ["--response-role", "bot"],
    ["--return-tokens-as-token-ids"],
    ["--enable-auto-tool-choice"],
    ["--tool-call-parser", "hermes"],
    ["--exclude-tools-when-tool-choice-none"],
    ["--max-log-len", "100"],
    ["--disable-fastapi-docs"],
    ["--enable-prompt-tokens-details"],
    ["--enable-server-load-tracking"],
    ["--enable-force-include-usage"],
    ["--enable-request-id-headers"],
    ["--enable-log-requests"],
    ["--enable-log-outputs"],
    ["--disable-log-requests", "--no-disable-log-requests"],
    ["--disable-access-log-for-endpoints", "/health,/metrics"],
    ["--h11-max-incomplete-event-size", "4194304"],
    ["--h11-max-header-count", "256"],
    ["--enable-tokenizer-info-endpoint"],
    ["--log-error-stack"],
    ["--fingerprint-mode", "full"],
    ["--enable-per-request-metrics"],
    ["--ssl-cert-reqs", "0"],
    ["--allow-runtime-lora-updating"],
]
REFUSED = [
    (["--tensor-parallel-size", "2"], "tensor_parallel_size"),
    (["--quantization", "awq"], "quantization"),
    (["--speculative-config", '{"method": "ngram"}'], "speculative_config"),
    (["--kv-cache-dtype", "fp8"], "kv_cache_dtype"),
    (["--grpc"], "--grpc"),
    (["--headless"], "--headless"),
    (["--tool-server", "demo"], "--tool-server"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("flags-base"), "llama")


def test_a_vllm_launch_line_with_every_flag_starts_and_serves(base, tmp_path):
    adapter = build_adapter(base, tmp_path / "root" / "a0", seed=3)
    gen = base / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.exists() else {}
    gen.write_text(json.dumps(dict(config, max_new_tokens=3)))
    args = [str(base), "--served-model-name", "tiny", "--lora-modules", f"a0={adapter}"]
    args += ["--lora-root", str(tmp_path / "root")]
    for flag in ENGINE_FLAGS + FRONTEND_FLAGS:
        args += flag
    log = tmp_path / "server.log"
    proc, url = start_server(args, log)
    try:
        body = {"model": "a0", "prompt": "hello", "max_tokens": 3, "logprobs": 1}
        status, text = http(url + "/v1/completions", "POST", body)
        assert status == 200, text
        out = json.loads(text)
        assert out["usage"]["completion_tokens"] == 3
        # --return-tokens-as-token-ids: logprob tokens are "token_id:N"
        assert all(t.startswith("token_id:") for t in out["choices"][0]["logprobs"]["tokens"])
        # --enable-force-include-usage: a stream carries usage without asking
        status, text = http(url + "/v1/completions", "POST", dict(body, stream=True))
        chunks = [json.loads(x[6:]) for x in text.split("\n\n") if x.startswith("data: {")]
        assert chunks[-1]["usage"]["completion_tokens"] == 3, text
        # --chat-template (the model has none of its own) and --response-role
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        status, text = http(url + "/v1/chat/completions", "POST", chat)
        assert status == 200, text
        choice = json.loads(text)["choices"][0]
        assert choice["message"]["role"] == "bot"
        # --generation-config auto: generation_config.json's max_new_tokens is the default
        assert json.loads(text)["usage"]["completion_tokens"] == 3
        # --disable-fastapi-docs
        assert http(url + "/docs")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    printed = log.read_text()
    # the banner, and (--enable-log-requests, --enable-log-outputs) a line per request
    assert "Serving on http://127.0.0.1:" in printed and "a0" in printed
    assert "Received request cmpl-" in printed and "Generated response cmpl-" in printed


@pytest.mark.parametrize("flags, named", REFUSED)
def test_refused_flags_stop_the_start_naming_themselves(base, flags, named):
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", str(base), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert named in done.stderr and "not supported" in done.stderr, done.stderr


def test_help_gives_each_inert_flag_its_reason():
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--help"]
    text = " ".join(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split())
    assert "--gpu-memory-utilization" in text and "--enable-auto-tool-choice" in text
    assert "accepted, inert: the CPU backend has no GPU memory" in text
    assert "--tool-call-parser" in text and "hermes, llama3_json, mistral, pythonic" in text
    assert "refused unless at vLLM's default" in text


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice requires --tool-call-parser"),
        (["--tool-call-parser", "nonesuch"], "invalid tool call parser: nonesuch"),
        (["--tool-parser-plugin", "my.py"], "--tool-parser-plugin is not supported"),
    ],
)
def test_tool_flags_are_checked_at_start(base, flags, said):
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", str(base), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and said in done.stderr, done.stderr
