"""Serving load: N concurrent streaming clients over M adapters against ``loraplex serve``.

Requests arrive as a Poisson process (``--rate`` per second; ``inf`` sends them all at once),
at most ``--clients`` in flight at a time; each names one of the base model and M adapters in
turn as its ``model``, streams a completion (the official ``openai`` client, async) and
records when each piece arrived. Reports throughput (requests and generated tokens per
second), time to first token, inter-token latency (the gap between streamed pieces) and
end-to-end latency, p50 and p99, overall and per adapter.

By default it builds a SmolLM-135M-shaped random model and M rank-16 adapters on all seven
projections (offline, as ``bench_lora.py`` does), starts ``loraplex serve`` on 127.0.0.1 and
stops it afterwards. ``--url`` points it at a server already running instead (``--models``
then names what to ask for).

    .venv/bin/python benches/bench_serve.py [--clients 32] [--adapters 8] [--rate 8]
        [--requests 256] [--threads 2] [--url http://127.0.0.1:8000 --models base a0 a1]

Prints one JSON line overall, then one per model.

``--saturate`` measures the server against offline ``LLM.generate`` on the same workload
(the same prompts, adapters and lengths, at most ``--max-num-seqs`` sequences at once on
both sides): every request is sent at once, ``--clients`` of them in flight, and
``/health`` is polled every ``--health-interval`` seconds (20 ms) while the server is
saturated. Prints one JSON line with both throughputs, their ratio and the ``/health``
latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import build, workload  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation between the nearest ranks (numpy's)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(label: dict, results: list[dict], elapsed: float) -> dict:
    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    ttft = [r["ttft"] for r in results]
    itl = [gap for r in results for gap in r["itl"]]
    e2e = [r["e2e"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    row = dict(label)
    row.update(
        requests=len(results),
        output_tokens=tokens,
        requests_per_s=round(len(results) / elapsed, 2),
        output_tokens_per_s=round(tokens / elapsed, 1),
    )
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        row[f"{name}_p50_ms"] = ms(percentile(values, 50))
        row[f"{name}_p99_ms"] = ms(percentile(values, 99))
    return row


async def one(
    client, model: str, prompt: list[int], max_tokens: int, streamed: bool = True
) -> dict:
    start = time.perf_counter()
    arrivals, tokens = [], 0
    if not streamed:  # one answer a request: no per-token work at the door or the client
        out = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        end = time.perf_counter()
        tokens = out.usage.completion_tokens
        return dict(model=model, tokens=tokens, ttft=end - start, itl=[], e2e=end - start)
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if not arrivals:
        raise RuntimeError(f"{model}: a stream ended with no text")
    return dict(
        model=model,
        tokens=tokens,
        ttft=arrivals[0] - start,
        itl=[b - a for a, b in zip(arrivals, arrivals[1:])],
        e2e=arrivals[-1] - start,
    )


async def drive(
    url: str,
    key: str,
    models: list[str],
    jobs,
    clients: int,
    rate: float,
    seed: int,
    stream: bool = True,
):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    rng = random.Random(seed)
    gate = asyncio.Semaphore(clients)

    async def limited(i: int, prompt, max_tokens):
        async with gate:
            return await one(client, models[i % len(models)], prompt, max_tokens, stream)

    tasks = []
    start = time.perf_counter()
    for i, (prompt, max_tokens) in enumerate(jobs):
        tasks.append(asyncio.create_task(limited(i, prompt, max_tokens)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await client.close()
    return results, elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    base: Path, adapters: list[Path], key: str, log: Path, threads: int, max_num_seqs: int = 256
):
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", str(base), "--port", str(port)]
    cmd += ["--served-model-name", "base", "--api-key", key, "--max-model-len", "512"]
    cmd += ["--max-num-seqs", str(max_num_seqs)]
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(adapters))]
        cmd += ["--max-cpu-loras", str(len(adapters)), "--lora-modules"]
        cmd += [f"a{i}={p}" for i, p in enumerate(adapters)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):  # bounded: the model and adapters load first
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server did not come up:\n{log.read_text()}")


def report(config: dict, results: list[dict], elapsed: float) -> None:
    print(json.dumps(summary({"scope": "overall", **config}, results, elapsed)), flush=True)
    for model in sorted({r["model"] for r in results}):
        mine = [r for r in results if r["model"] == model]
        print(json.dumps(summary({"scope": model}, mine, elapsed)), flush=True)


def offline(base: Path, adapters: list[Path], jobs, max_num_seqs: int) -> float:
    """Generated tokens per second of ``LLM.generate`` over the same jobs and adapters."""
    from loraplex import LLM, LoRARequest, SamplingParams

    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=len(adapters)) if adapters else {}
    if adapters:
        kw["max_cpu_loras"] = len(adapters)
    llm = LLM(model=str(base), max_model_len=512, max_num_seqs=max_num_seqs, **kw)
    loras = [None] + [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    prompts = [{"prompt_token_ids": p} for p, _ in jobs]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in jobs]
    which = [loras[i % len(loras)] for i in range(len(jobs))]
    warm = [{"prompt_token_ids": p[:16]} for p, _ in jobs[: len(loras)]]
    llm.generate(warm, SamplingParams(max_tokens=2), lora_request=loras, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=which, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if llm.llm_engine.lora is not None:
        llm.llm_engine.lora.close()  # its loader threads
    del llm
    return tokens / elapsed


def in_process(base: Path, adapters: list[Path], jobs, max_num_seqs: int, clients: int) -> float:
    """Generated tokens per second of ``AsyncLLM`` in this process over the same jobs,
    ``clients`` streamed at once (no HTTP): what the engine's async loop costs alone."""
    from loraplex import AsyncEngineArgs, AsyncLLM, LoRARequest, RequestOutputKind, SamplingParams

    kw = dict(enable_lora=True, max_lora_rank=16, max_loras=len(adapters)) if adapters else {}
    if adapters:
        kw["max_cpu_loras"] = len(adapters)
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(model=str(base), max_model_len=512, max_num_seqs=max_num_seqs, **kw)
    )
    loras = [None] + [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]

    async def run(batch) -> int:
        gate = asyncio.Semaphore(clients)

        async def one(i: int, prompt, n: int) -> int:
            params = SamplingParams(
                max_tokens=n, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            tokens = 0
            async with gate:
                async for out in engine.generate(
                    {"prompt_token_ids": prompt},
                    params,
                    f"r{i}-{n}-{len(prompt)}",
                    lora_request=loras[i % len(loras)],
                ):
                    tokens += len(out.outputs[0].token_ids)
            return tokens

        return sum(await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(batch))))

    try:
        asyncio.run(run([(p[:16], 2) for p, _ in jobs[: len(loras)]]))
        start = time.perf_counter()
        tokens = asyncio.run(run(jobs))
        return tokens / (time.perf_counter() - start)
    finally:
        engine.shutdown()


def proc_cpu(pid: int, system: bool = False) -> float:
    """A process's user + system CPU seconds, or its system seconds alone (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, sys_ = int(fields[11]), int(fields[12])
    return (sys_ if system else user + sys_) / os.sysconf("SC_CLK_TCK")


POLLER = """
import json, select, sys, time, urllib.request
url, interval, out = sys.argv[1], float(sys.argv[2]), []
while not select.select([sys.stdin], [], [], interval)[0]:  # until stdin closes
    start = time.perf_counter()
    with urllib.request.urlopen(url + "/health", timeout=60) as r:
        r.read()
    out.append(time.perf_counter() - start)
print(json.dumps(out))
"""


def start_poller(url: str, interval: float) -> subprocess.Popen | None:
    """A process of its own (a probe is one; a thread here would share the clients' GIL)
    that polls ``url``'s /health every ``interval`` seconds until its stdin closes."""
    if interval <= 0:
        return None
    cmd = [sys.executable, "-c", POLLER, url, str(interval)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def stop_poller(poller: subprocess.Popen | None) -> list[float]:
    """The poller's /health latencies, in seconds."""
    if poller is None:
        return []
    out, _ = poller.communicate(timeout=120)
    return json.loads(out)


def saturate(args, jobs) -> None:
    from bench_lora import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build(base)
        adapters = make_adapters(base, Path(tmp), args.adapters) if args.adapters else []
        offline_tps = offline(base, adapters, jobs, args.max_num_seqs)
        async_tps = (
            in_process(base, adapters, jobs, args.max_num_seqs, args.clients)
            if args.in_process
            else None
        )
        log = Path(tmp) / "log"
        proc, url = start_server(base, adapters, args.api_key, log, args.threads, args.max_num_seqs)
        try:
            models = ["base"] + [f"a{i}" for i in range(len(adapters))]
            warm = [(p[:16], 2) for p, _ in jobs[: len(models)]]
            asyncio.run(drive(url, args.api_key, models, warm, len(models), math.inf, 0))
            poller = start_poller(url, args.health_interval)
            cpu = (time.process_time(), proc_cpu(proc.pid), proc_cpu(proc.pid, system=True))
            try:
                results, elapsed = asyncio.run(
                    drive(
                        url,
                        args.api_key,
                        models,
                        jobs,
                        args.clients,
                        math.inf,
                        args.seed,
                        args.stream,
                    )
                )
            finally:
                latencies = stop_poller(poller)
            client_cpu, server_cpu = time.process_time() - cpu[0], proc_cpu(proc.pid) - cpu[1]
            server_sys = proc_cpu(proc.pid, system=True) - cpu[2]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    served_tps = sum(r["tokens"] for r in results) / elapsed
    ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
    row = dict(
        scope="saturated",
        stream=args.stream,
        clients=args.clients,
        max_num_seqs=args.max_num_seqs,
        adapters=args.adapters,
        requests=len(results),
        offline_tokens_per_s=round(offline_tps, 1),
        asyncllm_tokens_per_s=None if async_tps is None else round(async_tps, 1),
        asyncllm_over_offline=None if async_tps is None else round(async_tps / offline_tps, 3),
        served_tokens_per_s=round(served_tps, 1),
        served_over_offline=round(served_tps / offline_tps, 3),
        health_polls=len(latencies),
        health_p50_ms=ms(percentile(latencies, 50)),
        health_p99_ms=ms(percentile(latencies, 99)),
        health_max_ms=ms(max(latencies, default=None)),
        elapsed_s=round(elapsed, 1),
        client_cpu_s=round(client_cpu, 1),  # this process: the clients
        server_cpu_s=round(server_cpu, 1),
        server_sys_s=round(server_sys, 1),  # of which in the kernel
    )
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="requests in flight at most")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="a running server (else one is built and started)")
    ap.add_argument("--models", nargs="+", help="with --url: the model names to ask for")
    ap.add_argument("--api-key", default="sk-bench")
    ap.add_argument(
        "--saturate", action="store_true", help="against offline LLM.generate, /health polled"
    )
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=32,
        help="with --saturate: sequences at once, offline and served (--clients above it "
        "keeps requests waiting at the server, as offline all of them wait)",
    )
    ap.add_argument(
        "--no-in-process",
        dest="in_process",
        action="store_false",
        help="with --saturate: skip the in-process AsyncLLM run",
    )
    ap.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="one answer a request instead of a stream",
    )
    ap.add_argument(
        "--health-interval",
        type=float,
        default=0.02,
        help="with --saturate: seconds between /health polls (0: none)",
    )
    args = ap.parse_args()
    jobs = workload(args.requests, seed=args.seed)
    if args.saturate:
        saturate(args, jobs)
        return
    config = dict(clients=args.clients, rate=args.rate, adapters=args.adapters)
    if args.url:
        if not args.models:
            ap.error("--url needs --models")
        results, elapsed = asyncio.run(
            drive(args.url, args.api_key, args.models, jobs, args.clients, args.rate, args.seed)
        )
        report(config, results, elapsed)
        return
    from bench_lora import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build(base)
        adapters = make_adapters(base, Path(tmp), args.adapters) if args.adapters else []
        proc, url = start_server(base, adapters, args.api_key, Path(tmp) / "log", args.threads)
        try:
            models = ["base"] + [f"a{i}" for i in range(len(adapters))]
            # warm-up: one short request per model, outside the timed run
            warm = [(p[:16], 2) for p, _ in jobs[: len(models)]]
            asyncio.run(drive(url, args.api_key, models, warm, len(models), math.inf, 0))
            results, elapsed = asyncio.run(
                drive(url, args.api_key, models, jobs, args.clients, args.rate, args.seed)
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        report(config, results, elapsed)


if __name__ == "__main__":
    main()
