"""The prefix cache on a multi-tenant chat workload, on and off, in one run (issue 28).

A SmolLM-135M-shaped Llama with random weights (built here, offline) and 16 rank-16 adapters
on all seven projections. Each adapter is a tenant with its own 512-token system prompt; 64
conversations (tenant ``c % 16``) of 4 turns: turn ``t``'s prompt is the system prompt, every
earlier turn's user message and reply (the reply's token ids as generated), and a new
32-token user message; each reply is 32 tokens (EOS ignored). 16 conversations are in
flight at a time, each sending its next turn when its last reply ends (a closed loop, as
chat clients are). TTFT is a request's first token time less the time it was submitted.

Then a workload with no shared prefix (every prompt its own random tokens, the same
lengths), on and off: the cache's cost where it never hits, with the scheduler's own time
(``schedule`` + ``postprocess``, where the hashing and lookups run) as a share of the step.

    .venv/bin/python benches/bench_prefix_cache.py [--threads 2] [--conversations 64]

Prints one JSON line per setup, then the ratios.
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

TENANTS, SYSTEM, USER, REPLY, TURNS, IN_FLIGHT = 16, 512, 32, 32, 4, 16


class TimedCore:
    """The engine's core, its ``schedule`` and ``postprocess`` timed (everything else
    passed through)."""

    def __init__(self, core):
        self._core, self.seconds = core, 0.0

    def __getattr__(self, name):
        return getattr(self._core, name)

    def schedule(self):
        t = time.perf_counter()
        try:
            return self._core.schedule()
        finally:
            self.seconds += time.perf_counter() - t

    def postprocess(self, *args):
        t = time.perf_counter()
        try:
            return self._core.postprocess(*args)
        finally:
            self.seconds += time.perf_counter() - t


def run(base: Path, adapters: list[Path], cache: bool, conversations: int, shared: bool) -> dict:
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=TENANTS,
        max_cpu_loras=TENANTS,
        max_num_seqs=IN_FLIGHT,
        max_model_len=1024,
        enable_prefix_caching=cache,
    )
    engine = llm.llm_engine
    loras = [LoRARequest(f"t{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    for lora in loras:  # read before the timed run: the cache is what is measured
        engine.add_lora(lora)
    engine.scheduler = core = TimedCore(engine.scheduler)
    vocab = SMOLLM_135M["vocab_size"]
    rng = random.Random(7)
    systems = [[rng.randrange(2, vocab) for _ in range(SYSTEM)] for _ in range(TENANTS)]
    params = SamplingParams(max_tokens=REPLY, temperature=0, ignore_eos=True)
    history: dict[int, list[int]] = {}
    turn = dict.fromkeys(range(conversations), 0)
    submitted: dict[str, float] = {}
    ttft, prompt_tokens, cached_tokens, generated = [], 0, 0, 0
    waiting = list(range(conversations))
    live: set[int] = set()

    def submit(c: int) -> None:
        nonlocal prompt_tokens
        user = [rng.randrange(2, vocab) for _ in range(USER)]
        if shared:
            ids = history.setdefault(c, list(systems[c % TENANTS])) + user
        else:  # the same length, nothing shared
            length = SYSTEM + turn[c] * (USER + REPLY) + USER
            ids = [rng.randrange(2, vocab) for _ in range(length)]
        history[c] = ids
        rid = f"{c}-{turn[c]}"
        submitted[rid] = time.time()
        engine.add_request(rid, {"prompt_token_ids": ids}, params, lora_request=loras[c % TENANTS])
        prompt_tokens += len(ids)
        live.add(c)

    start = time.perf_counter()
    step_seconds = 0.0
    while waiting or live:
        while waiting and len(live) < IN_FLIGHT:
            submit(waiting.pop(0))
        t = time.perf_counter()
        outs = engine.step()
        step_seconds += time.perf_counter() - t
        for out in outs:
            if not out.finished:
                continue
            c = int(out.request_id.split("-")[0])
            live.discard(c)
            ttft.append(out.metrics.first_token_time - submitted[out.request_id])
            cached_tokens += out.num_cached_tokens
            generated += len(out.outputs[0].token_ids)
            history[c] = history[c] + list(out.outputs[0].token_ids)
            turn[c] += 1
            if turn[c] < TURNS:
                waiting.insert(0, c)  # its next turn, before new conversations
    elapsed = time.perf_counter() - start
    return dict(
        workload="chat" if shared else "no shared prefix",
        prefix_caching=cache,
        requests=len(ttft),
        seconds=round(elapsed, 2),
        ttft_p50_ms=round(statistics.median(ttft) * 1000, 1),
        ttft_p99_ms=round(percentile(ttft, 0.99) * 1000, 1),
        generated_tokens_per_s=round(generated / elapsed, 1),
        prompt_tokens_per_s=round(prompt_tokens / elapsed, 1),
        cached_share=round(cached_tokens / prompt_tokens, 3),
        core_share_of_step=round(core.seconds / step_seconds, 4),
        preemptions=engine.num_preemptions,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = model_with_adapters(Path(tmp), TENANTS)
        rows = {}
        for shared in (True, False):
            for cache in (True, False):
                row = run(base, adapters, cache, args.conversations, shared)
                rows[(shared, cache)] = row
                print(json.dumps(row), flush=True)
        on, off = rows[(True, True)], rows[(True, False)]
        flat_on, flat_off = rows[(False, True)], rows[(False, False)]
        print(
            json.dumps(
                dict(
                    chat_ttft_p50_off_over_on=round(off["ttft_p50_ms"] / on["ttft_p50_ms"], 2),
                    chat_ttft_p99_off_over_on=round(off["ttft_p99_ms"] / on["ttft_p99_ms"], 2),
                    chat_throughput_on_over_off=round(
                        on["generated_tokens_per_s"] / off["generated_tokens_per_s"], 2
                    ),
                    no_shared_throughput_on_over_off=round(
                        flat_on["generated_tokens_per_s"] / flat_off["generated_tokens_per_s"], 3
                    ),
                    no_shared_core_share_on_minus_off=round(
                        flat_on["core_share_of_step"] - flat_off["core_share_of_step"], 4
                    ),
                )
            )
        )


if __name__ == "__main__":
    main()
