"""Fair share against FCFS under a heavy client's flood, in one run (issue 29).

A SmolLM-135M-shaped Llama with random weights (built here, offline) and 5 rank-16
adapters. Client A (an adapter) queues 200 requests at once; then clients B-E (one adapter
each) queue 8 requests each; prompts 64 random tokens, replies 32 tokens (EOS ignored),
`max_num_seqs=16`, `max_loras=5`. Per client: TTFT p50 / p99 (first token time less
submission time); in all: generated tokens per second over the whole run.

With `--tenants`, the clients A-E are tenants (a request's `tenant=`, the server's `user`)
and every request runs on one adapter, A's: the flood and the light clients share it.

    .venv/bin/python benches/bench_fair.py [--threads 2] [--flood 200] [--tenants]

Prints one JSON line per policy, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import loraplex  # noqa: F401 - before torch, so its OpenMP default applies here too

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SMOLLM_135M, percentile  # noqa: E402
from bench_lora import model_with_adapters  # noqa: E402

CLIENTS = "ABCDE"


def run(base: Path, adapters: list[Path], policy: str, flood: int, tenants: bool) -> dict:
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=5,
        max_cpu_loras=5,
        max_num_seqs=16,
        max_model_len=256,
        scheduling_policy=policy,
    )
    engine = llm.llm_engine
    loras = [LoRARequest(c, i + 1, str(p)) for i, (c, p) in enumerate(zip(CLIENTS, adapters))]
    for lora in loras:
        engine.add_lora(lora)
    rng = random.Random(3)
    vocab = SMOLLM_135M["vocab_size"]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    jobs = [(0, i) for i in range(flood)] + [(c, i) for c in range(1, 5) for i in range(8)]
    submitted = {}
    for c, i in jobs:
        rid = f"{CLIENTS[c]}-{i}"
        ids = [rng.randrange(2, vocab) for _ in range(64)]
        submitted[rid] = time.time()
        lora, tenant = (loras[0], CLIENTS[c]) if tenants else (loras[c], None)
        prompt = {"prompt_token_ids": ids}
        engine.add_request(rid, prompt, params, lora_request=lora, tenant=tenant)
    ttft: dict[str, list[float]] = {c: [] for c in CLIENTS}
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                ttft[out.request_id[0]].append(
                    out.metrics.first_token_time - submitted[out.request_id]
                )
                generated += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    row = dict(policy=policy, flood=flood, tenants=tenants, seconds=round(elapsed, 2))
    row["generated_tokens_per_s"] = round(generated / elapsed, 1)
    for c, values in ttft.items():
        row[f"{c}_ttft_p50_s"] = round(statistics.median(values), 2)
        row[f"{c}_ttft_p99_s"] = round(percentile(values, 0.99), 2)
    light = [v for c in CLIENTS[1:] for v in ttft[c]]
    row["light_ttft_p50_s"] = round(statistics.median(light), 2)
    row["light_ttft_p99_s"] = round(percentile(light, 0.99), 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flood", type=int, default=200)
    ap.add_argument("--tenants", action="store_true", help="clients are tenants on one adapter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = model_with_adapters(Path(tmp), len(CLIENTS))
        rows = {}
        for policy in ("fair", "fcfs", "fcfs", "fair"):  # mirrored: drift cancels
            row = run(base, adapters, policy, args.flood, args.tenants)
            rows.setdefault(policy, []).append(row)
            print(json.dumps(row), flush=True)
        tput = {
            p: statistics.mean(r["generated_tokens_per_s"] for r in rs) for p, rs in rows.items()
        }
        light = {p: statistics.mean(r["light_ttft_p50_s"] for r in rs) for p, rs in rows.items()}
        light99 = {p: statistics.mean(r["light_ttft_p99_s"] for r in rs) for p, rs in rows.items()}
        print(
            json.dumps(
                dict(
                    throughput_fair_over_fcfs=round(tput["fair"] / tput["fcfs"], 3),
                    light_ttft_p50_fcfs_over_fair=round(light["fcfs"] / light["fair"], 2),
                    light_ttft_p99_fcfs_over_fair=round(light99["fcfs"] / light99["fair"], 2),
                )
            )
        )


if __name__ == "__main__":
    main()
