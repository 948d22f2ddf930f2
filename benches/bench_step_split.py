"""Where one many-adapter step's time goes: the model over one fixed step, its LoRA op apart.

The step is the thousand-adapter case's usual one at 256 slots (``bench_lora.py
--thousand-only``): 256 decode tokens (20 tokens of context each) and 14 prefill chunks of 25
tokens, 606 tokens in all, on the SmolLM-135M-shaped model, adapters of rank 8 on q/k/v/o.
The same step runs with no adapter, with 8 adapters (~34 requests each, as the 8-adapter
baseline batches them) and with 270 distinct adapters (one a request, as a thousand adapters
meet it), in turn, ``--reps`` times; medians. The adapters' weights are random values written
straight into the host tier's slots (448 of its 512: the bench's host tier), which the CPU
backend's LoRA op reads in place; a step over 270 distinct adapters reads each one's weights
from memory. The LoRA op (``LoRAContext.apply``) is timed inside the forward, so

- ``op_ms``: the LoRA op; ``rest_ms``: the rest of the forward and the sampled rows' logits
  (unchanged by the adapters' number unless their reads slow the base model down);
- ``ratio_distinct_over_8``: the 8-adapter step's time over the distinct-adapter step's, the
  throughput the distinct adapters keep when nothing else differs (no loads, the same batch):
  what the thousand case's registered ratio can reach on this machine.

``--loads-per-step N`` then prices the loader: the distinct-adapter step ten times alone,
then ten times while two threads (the engine's loader pool) read, validate and copy N
adapters a step into the host tier (rank-8 files written here; the thousand case's
registered run reads ~8 a step, but 32 stand out of this VM's noise), six rounds of both in
turn: ``wall_over_loader_cpu`` is the time the steps lost over the CPU time the loads took
(1: as if the loads ran alone on a core the steps needed).

    .venv/bin/python benches/bench_step_split.py [--reps 12] [--lora-dtype bfloat16]
        [--loads-per-step 32]

Prints one JSON line per setup, then the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import loraplex  # noqa: F401 - before torch, so its OpenMP default applies here too

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import build  # noqa: E402

DECODE, PREFILL, CHUNK, CONTEXT = 256, 14, 25, 20
HOST_SLOTS = 512
LOAD_SLOTS = 64  # of them, written by --loads-per-step's loads


def fixed_step(block_size: int):
    """The step's plan (the fields the model runner's metadata reads) and each sequence's
    first row; every sequence in blocks of its own."""
    num_new = [1] * DECODE + [CHUNK] * PREFILL
    computed = [CONTEXT] * DECODE + [0] * PREFILL
    per_seq = -(-(CONTEXT + CHUNK) // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(num_new))]
    positions, slot_mapping, starts = [], [], []
    for table, c, n in zip(tables, computed, num_new):
        starts.append(len(positions))
        for p in range(c, c + n):
            positions.append(p)
            slot_mapping.append(table[p // block_size] * block_size + p % block_size)
    plan = types.SimpleNamespace(
        num_new_tokens=num_new,
        num_computed_tokens=computed,
        num_batched_tokens=len(positions),
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=tables,
    )
    return plan, starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--lora-dtype", default="auto")
    ap.add_argument("--loads-per-step", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from loraplex import LLM

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build(base)
        llm = LLM(
            model=str(base),
            max_model_len=512,
            enable_lora=True,
            max_lora_rank=8,
            max_loras=256,
            max_cpu_loras=HOST_SLOTS,
            lora_dtype=args.lora_dtype,
        )
        run(llm, args.reps, args.lora_dtype, args.loads_per_step, base, Path(tmp))


def run(llm, reps: int, lora_dtype: str, loads_per_step: int, base: Path, tmp: Path) -> None:
    from loraplex.lora.slots import LoRAContext
    from loraplex.model.attention import build_metadata

    engine = llm.llm_engine
    host = engine.lora.host
    if engine.lora.device_slots is not None:
        sys.exit("this backend keeps device slots apart from the host tier: a CPU bench")
    g = torch.Generator().manual_seed(0)
    for key, a in host.a.items():  # adapters on q/k/v/o, as the thousand case's
        if key[1] in ("qkv_proj", "o_proj"):
            for t in (a, host.bt[key]):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    host.groups = [frozenset({"qkv_proj", "o_proj"})] * HOST_SLOTS
    steps_slots = HOST_SLOTS - LOAD_SLOTS  # the rest take the loads (--loads-per-step)

    plan, starts = fixed_step(engine.args.block_size)
    runner = engine.runner
    meta = build_metadata(
        plan, starts, engine.args.block_size, None, engine.backend.device, runner.decode_attention
    )
    ids = torch.randint(2, engine.model.config.vocab_size, (plan.num_batched_tokens,))
    last_rows = [s + n - 1 for s, n in zip(starts, plan.num_new_tokens)]
    sizes = plan.num_new_tokens
    rng = random.Random(0)

    def context(adapters: int) -> LoRAContext | None:
        if adapters == 0:
            return None
        if adapters == 8:  # 32 requests an adapter, grouped by adapter as the core batches
            slots = [i * 8 // len(sizes) for i in range(len(sizes))]
            pool = rng.sample(range(steps_slots), 8)
        else:  # one adapter a request, a fresh set each step
            slots = list(range(len(sizes)))
            pool = rng.sample(range(steps_slots), len(sizes))
        segments = []  # one a run of requests of one adapter, as the core's plan gives
        for i, n in enumerate(sizes):
            if segments and segments[-1][2] == pool[slots[i]]:
                start, length, slot = segments[-1]
                segments[-1] = (start, length + n, slot)
            else:
                segments.append((starts[i], n, pool[slots[i]]))
        return LoRAContext(host, segments)

    op_s = 0.0
    real_apply = LoRAContext.apply

    def timed_apply(self, *a):
        nonlocal op_s
        start = time.perf_counter()
        real_apply(self, *a)
        op_s += time.perf_counter() - start

    def step_once(lora) -> None:
        hidden = engine.model(ids, meta, runner.kv_caches, lora)
        engine.model.compute_logits(hidden[last_rows])

    LoRAContext.apply = timed_apply
    setups = {0: "no adapter", 8: "8 adapters", len(sizes): f"{len(sizes)} distinct adapters"}
    runs = {k: [] for k in setups}
    for _ in range(reps):
        for k in (8, len(sizes), 0, 0, len(sizes), 8):  # mirrored: drift falls on each alike
            lora = context(k)
            op_s = 0.0
            start = time.perf_counter()
            step_once(lora)
            runs[k].append((time.perf_counter() - start, op_s))
    LoRAContext.apply = real_apply

    step = {}
    for k, label in setups.items():
        total = statistics.median(t for t, _ in runs[k])
        step[k] = total
        row = {
            "setup": f"{label}, lora_dtype={lora_dtype}",
            "tokens": plan.num_batched_tokens,
            "step_ms": round(total * 1e3, 1),
            "op_ms": round(statistics.median(o for _, o in runs[k]) * 1e3, 1),
            "rest_ms": round(statistics.median(t - o for t, o in runs[k]) * 1e3, 1),
        }
        print(json.dumps(row), flush=True)
    ratio = step[8] / step[len(sizes)]
    print(json.dumps({"ratio_distinct_over_8": round(ratio, 3)}), flush=True)
    if loads_per_step > 0:
        price_loads(engine, lambda: step_once(context(len(sizes))), loads_per_step, base, tmp)


def price_loads(engine, step, loads_per_step: int, base: Path, tmp: Path, rounds: int = 6):
    """Ten steps alone, then ten while the loader pool's two threads read and copy
    ``loads_per_step`` adapters a step (into the host tier's last slots); ``rounds`` times."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from bench_lora import make_raw_adapters

    from loraplex import LoRARequest

    manager = engine.lora
    paths = make_raw_adapters(base, tmp / "loads", LOAD_SLOTS)
    requests = [LoRARequest(f"load{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    loader_cpu = []

    def load(i: int) -> None:
        start = time.thread_time()
        adapter = manager.load(requests[i % LOAD_SLOTS])
        manager.host.load(HOST_SLOTS - LOAD_SLOTS + i % LOAD_SLOTS, adapter)
        loader_cpu.append(time.thread_time() - start)

    rows = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(10):
                step()
            alone = time.perf_counter() - start
            loader_cpu.clear()
            jobs, start = [], time.perf_counter()
            for s in range(10):
                jobs += [pool.submit(load, s * loads_per_step + j) for j in range(loads_per_step)]
                step()
            wait(jobs)
            loaded = time.perf_counter() - start
            for job in jobs:
                job.result()
            rows.append((alone, loaded, sum(loader_cpu)))
    print(
        json.dumps(
            {
                "loads_per_step": loads_per_step,
                "ten_steps_alone_s": [round(a, 3) for a, _, _ in rows],
                "ten_steps_with_loads_s": [round(w, 3) for _, w, _ in rows],
                "loader_cpu_s": [round(c, 3) for _, _, c in rows],
                "loader_cpu_ms_per_load": round(
                    statistics.median(c for _, _, c in rows) / (10 * loads_per_step) * 1e3, 2
                ),
                "wall_over_loader_cpu": [round((w - a) / c, 2) for a, w, c in rows],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
