"""Multi-LoRA throughput, in one run on one workload:

1. loraplex vs transformers + PEFT mixed-adapter batches (``generate(adapter_names=...)``):
   a SmolLM-135M-shaped model, 8 adapters of rank 16 on all seven projections, 32 requests
   spread over the adapters, mixed prompt (16-128) and output (16-64) lengths; each side's
   best of two runs. Goal: >= 3x.
2. LoRA overhead: the same workload on loraplex with the adapters vs the base model only
   (in ABBA order, best of each kept), the adapters held in float32 and (``lora_dtype``)
   in bfloat16. Goal: adapters cost at most 10% throughput.
3. Many adapters: 256 adapters over 512 shorter requests (prompts 16-32, outputs 8-16) with
   max_loras=8, max_cpu_loras=32, beside the same 512 requests over 8 adapters.
   Adapters are registered (read, validated) before the timed run; with 256 adapters and a
   32-adapter host tier most loads during the run still read the disk again.
3b. A thousand adapters (``--thousand-only`` runs just this): 1,000 rank-8 adapters on
   q/k/v/o, 1,000 shorter requests (one per adapter), beside the same requests over 8
   adapters: once with every adapter registered before the timed run, once on demand (first
   seen by the timed ``generate``, read from disk by the loader pool during it). Two slot
   settings: max_loras=64 / max_cpu_loras=128, and 256 / 512 (slots that do not cap the
   batch). The host tier holds fewer than 1,000, so either way most are read from disk
   inside the timed run. ``--lora-dtype bfloat16`` holds the adapters in bfloat16. Each
   setup runs twice in mirrored order (8, registered, on demand, on demand, registered, 8),
   the faster run kept, as the overhead runs are; ``--rounds N`` runs that sequence N times
   and adds the ratios of each setup's median over all its runs. The mirrored ratio (the
   mean over rounds of a round's two runs' mean over the 8-adapter pair's) cancels a drift
   that is straight over a round.
4. Ops: the CPU paths (torch SGMV loop, BGMV, padded grid; the C++ op) vs the per-segment
   float64 loop reference, at decode and prefill shapes (576 -> rank 16 -> 1536); and the
   C++ op on one-token items over distinct slots whose weights come from memory (as a
   thousand adapters meet it), with the read rate it reaches.

    .venv/bin/python benches/bench_lora.py [--threads 2] [--skip-many]
        [--thousand-only [--lora-dtype bfloat16] [--slots 64|256] [--rounds N]]

Prints one JSON line per setup.
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
from bench_generate import build, rate_row, time_generate, workload  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, root: Path, n: int, rank: int = 16) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    )
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        path = root / f"a{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def model_with_adapters(tmp: Path, n: int) -> tuple[Path, list[Path]]:
    """The SmolLM-135M-shaped random model in ``tmp/base`` and ``n`` rank-16 adapters."""
    base = tmp / "base"
    base.mkdir()
    build(base)
    return base, make_adapters(base, tmp / "adapters", n)


def make_raw_adapters(base: Path, root: Path, n: int, rank: int = 8) -> list[Path]:
    """n PEFT adapters on q/k/v/o: one saved by PEFT as the template, the rest its config
    with fresh random tensors of the same names and shapes (fast to write at n = 1,000)."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    )
    template = root / "template"
    peft_model.save_pretrained(template)
    shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        path = root / f"t{i}"
        path.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", path)
        tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        save_file(tensors, path / "adapter_model.safetensors")
        paths.append(path)
    return paths


def run_loraplex(base, jobs, adapters, label, register=True, rank=16, **engine_kw):
    from loraplex import LLM, LoRARequest, SamplingParams

    kw = dict(max_model_len=512, **engine_kw)
    if adapters:
        kw.update(enable_lora=True, max_lora_rank=rank)
        kw.setdefault("max_loras", min(8, len(adapters)))
    llm = LLM(model=str(base), **kw)
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    loras = [reqs[i % len(reqs)] if reqs else None for i in range(len(jobs))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in jobs]
    prompts = [{"prompt_token_ids": p} for p, _ in jobs]
    if register:  # adapters registered up front, as a server holds them: the timed run
        for r in reqs:  # measures serving, not the first validation of each adapter
            llm.llm_engine.add_lora(r)
    warm = [None, None] if not register else loras[:2]  # on demand: no adapter seen before
    llm.generate(prompts[:2], params[:2], lora_request=warm, use_tqdm=False)  # warm up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return rate_row({"setup": label}, sum(len(o.outputs[0].token_ids) for o in outs), elapsed)


def run_peft(base, jobs, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, p in enumerate(adapters[1:], start=1):
        model.load_adapter(p, adapter_name=f"a{i}")
    names = [f"a{i % len(adapters)}" for i in range(len(jobs))]
    elapsed = time_generate(model, jobs, adapter_names=names)
    tokens = sum(m for _, m in jobs)
    return rate_row({"setup": "transformers+peft mixed batch"}, tokens, elapsed)


def _timeit(fn, reps=20):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def _bench_shape(label, lengths, fan_in=576, rank=16, fan_out=1536):
    from loraplex.ops import cpu, cpu_ext, reference

    g = torch.Generator().manual_seed(0)
    segs, start = [], 0
    for i, n in enumerate(lengths):
        segs.append((start, n, i))
        start += n
    x = torch.randn(start, fan_in, generator=g)
    a = torch.randn(len(lengths), rank, fan_in, generator=g)
    b = torch.randn(len(lengths), fan_out, rank, generator=g)
    bt = b.transpose(1, 2).contiguous()  # the C++ op's layout, as the slots store it
    y, out = torch.empty(start, rank), torch.zeros(start, fan_out)
    slots = torch.tensor([s for _, n, s in segs for _ in range(n)])
    layout = cpu.padded_layout(segs)
    table = cpu_ext.segment_table(segs)

    def run(shrink, expand, route):
        return lambda: (shrink(x, a, route, y), expand(y, b, route, out))

    times = {
        "reference_loop_us": _timeit(run(reference.sgmv_shrink, reference.sgmv_expand, segs)),
        "torch_sgmv_us": _timeit(run(cpu.sgmv_shrink, cpu.sgmv_expand, segs)),
        "torch_bgmv_us": _timeit(run(cpu.bgmv_shrink, cpu.bgmv_expand, slots)),
    }
    if layout is not None:
        times["torch_padded_grid_us"] = _timeit(
            lambda: cpu.expand_padded(cpu.shrink_padded(x, a, layout), b, layout, out)
        )
    if cpu_ext.available():
        times["cpp_us"] = _timeit(lambda: cpu_ext.lora_apply(x, a, bt, table, out, [0, fan_out]))
    ref = times["reference_loop_us"]
    row = {"ops": label, **{k: round(v, 1) for k, v in times.items()}}
    row.update(
        {
            f"speedup_{k[:-3]}": round(ref / v, 2)
            for k, v in times.items()
            if k != "reference_loop_us"
        }
    )
    return row


def bench_ops():
    rows = [
        _bench_shape("decode: 32 tokens over 8 adapters", [4] * 8),
        _bench_shape("decode: 32 tokens over 32 adapters", [1] * 32),
        _bench_shape("prefill: 2048 tokens over 8 adapters", [256] * 8),
    ]
    from loraplex.ops import cpu_ext

    if cpu_ext.available():
        rows += [_bench_from_memory(dtype) for dtype in (torch.float32, torch.bfloat16)]
    return rows


def _bench_from_memory(dtype, pool=16384, tokens=256, rank=8, fan_in=576, splits=(576, 192, 192)):
    """The C++ op as a thousand distinct adapters meet it in decode: one token per slot, a
    new set of slots each call from a pool far larger than the caches (1.4 GB of float32
    q/k/v weights, on huge pages, B^T packed as the host tier holds it), so the weights come
    from memory."""
    from loraplex.engine import host_memory
    from loraplex.ops import cpu_ext

    k, out_total = len(splits), sum(splits)
    a = host_memory.zeros((pool, k * rank, fan_in), dtype, populate=True)
    bt = host_memory.zeros((pool, rank, out_total), dtype, populate=True)  # packed
    for chunk in range(0, pool, 1024):  # random weights, a chunk at a time
        n = min(1024, pool - chunk)
        a[chunk : chunk + n] = torch.randn(n, k * rank, fan_in) * 0.01
        bt[chunk : chunk + n] = torch.randn(n, rank, out_total) * 0.01
    x, out = torch.randn(tokens, fan_in), torch.zeros(tokens, out_total)
    tables = [
        cpu_ext.segment_table([(i, 1, start + i) for i in range(tokens)])
        for start in range(0, pool - tokens + 1, tokens)
    ]
    cols = [sum(splits[:i]) for i in range(k + 1)]
    calls = iter(range(10**9))
    us = _timeit(
        lambda: cpu_ext.lora_apply(x, a, bt, tables[next(calls) % len(tables)], out, cols), 60
    )
    read = tokens * (a[0].numel() + bt[0].numel()) * a.element_size()
    label = f"decode from memory: {tokens} tokens over distinct slots of {pool}, {dtype}"
    return {"ops": label, "cpp_us": round(us, 1), "read_gb_per_s": round(read / us / 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--thousand-only", action="store_true")
    ap.add_argument("--lora-dtype", default="auto", help="the thousand case's lora_dtype")
    ap.add_argument(
        "--slots", type=int, choices=(64, 256), help="the thousand case at one max_loras only"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="the thousand case's mirrored sequence this many times (medians over all runs)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.thousand_only:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            base.mkdir()
            build(base)
            bench_thousand(base, Path(tmp), args.lora_dtype, args.slots, args.rounds)
        return
    for row in bench_ops():
        print(json.dumps(row), flush=True)
    jobs = workload(32)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build(base)
        adapters = make_adapters(base, Path(tmp), 8)
        # this machine is noisy and drifts: with adapters, base only, base only, with adapters
        # (ABBA, so neither side always runs first), and each one's best kept; PEFT best of two
        setups = {
            "lora": lambda: run_loraplex(base, jobs, adapters, "loraplex, 8 adapters"),
            "bf16": lambda: run_loraplex(
                base, jobs, adapters, "loraplex, 8 adapters in bfloat16", lora_dtype="bfloat16"
            ),
            "base": lambda: run_loraplex(base, jobs, [], "loraplex, base model only"),
        }
        runs = {kind: [] for kind in setups}
        for kind in ("lora", "bf16", "base", "base", "bf16", "lora"):
            runs[kind].append(setups[kind]())
        best = lambda rs: max(rs, key=lambda r: r["tokens_per_s"])  # noqa: E731
        ours, half, bare = best(runs["lora"]), best(runs["bf16"]), best(runs["base"])
        for row in (ours, half, bare):
            print(json.dumps(row), flush=True)
        peft = best([run_peft(base, jobs, adapters) for _ in range(2)])
        print(json.dumps(peft), flush=True)
        print(
            json.dumps(
                {
                    "ratio_loraplex_over_peft": round(
                        ours["tokens_per_s"] / peft["tokens_per_s"], 2
                    ),
                    "lora_overhead": round(1 - ours["tokens_per_s"] / bare["tokens_per_s"], 3),
                    "lora_overhead_bf16": round(1 - half["tokens_per_s"] / bare["tokens_per_s"], 3),
                }
            ),
            flush=True,
        )
        if not args.skip_many:
            rng = random.Random(1)
            vocab = 49152
            short = [
                ([rng.randrange(2, vocab) for _ in range(rng.randint(16, 32))], rng.randint(8, 16))
                for _ in range(512)
            ]
            many = make_adapters(base, Path(tmp) / "many", 256)
            few = run_loraplex(
                base, short, many[:8], "512 requests over 8 adapters", max_loras=8, max_cpu_loras=32
            )
            print(json.dumps(few), flush=True)
            lots = run_loraplex(
                base, short, many, "512 requests over 256 adapters", max_loras=8, max_cpu_loras=32
            )
            print(json.dumps(lots), flush=True)
            print(
                json.dumps(
                    {
                        "ratio_256_over_8_adapters": round(
                            lots["tokens_per_s"] / few["tokens_per_s"], 2
                        )
                    }
                )
            )
            bench_thousand(base, Path(tmp), args.lora_dtype, args.slots)


def bench_thousand(
    base: Path, tmp: Path, lora_dtype: str, slots: int | None = None, rounds: int = 1
) -> None:
    rng = random.Random(2)
    vocab = 49152
    jobs = [
        ([rng.randrange(2, vocab) for _ in range(rng.randint(16, 32))], rng.randint(8, 16))
        for _ in range(1000)
    ]
    adapters = make_raw_adapters(base, tmp / "thousand", 1000)
    # the slots (64 device, 128 host), and slots that do not cap the batch (256 =
    # max_num_seqs; host 512, still half the adapters): with one request per adapter, 64
    # slots hold at most 64 running requests where 8 adapters let 256 run
    for max_loras, max_cpu_loras in ((64, 128), (256, 512)):
        if slots not in (None, max_loras):
            continue
        kw = dict(max_loras=max_loras, max_cpu_loras=max_cpu_loras, rank=8, lora_dtype=lora_dtype)
        tag = f"max_loras={max_loras}, max_cpu_loras={max_cpu_loras}, lora_dtype={lora_dtype}"
        setups = {  # adapters, label, registered ahead
            "few": (adapters[:8], f"over 8 adapters, {tag}", True),
            "registered": (adapters, f"over 1,000 adapters, registered, {tag}", True),
            "on_demand": (adapters, f"over 1,000 adapters, on demand, {tag}", False),
        }
        # as the overhead runs: each setup twice, in mirrored order (so none always runs
        # first or last while the machine drifts), the faster of its two runs kept; with
        # more rounds, also the ratios of the setups' medians over all their runs (this VM
        # drifts 5% within one round: one fast run decides a best-of-two ratio)
        runs = {kind: [] for kind in setups}
        mirrored = ("few", "registered", "on_demand", "on_demand", "registered", "few")
        for kind in mirrored * rounds:
            ads, label, register = setups[kind]
            runs[kind].append(run_loraplex(base, jobs, ads, label, register=register, **kw))
        rows = {k: max(rs, key=lambda r: r["tokens_per_s"]) for k, rs in runs.items()}
        for k, rs in runs.items():  # both runs' rates beside the kept one
            rows[k] = {**rows[k], "both_runs_tokens_per_s": [r["tokens_per_s"] for r in rs]}
        for row in rows.values():
            print(json.dumps(row), flush=True)
        few = rows["few"]["tokens_per_s"]
        ratios = {
            f"ratio_{k}_over_8_adapters": round(rows[k]["tokens_per_s"] / few, 3)
            for k in ("registered", "on_demand")
        }
        if rounds > 1:
            median = {k: statistics.median(r["tokens_per_s"] for r in rs) for k, rs in runs.items()}
            for k in ("registered", "on_demand"):
                ratios[f"median_ratio_{k}_over_8_adapters"] = round(median[k] / median["few"], 3)
        for k in ("registered", "on_demand"):
            ratios[f"mirrored_ratio_{k}_over_8_adapters"] = round(mirrored_ratio(runs, k), 3)
        print(json.dumps({"slots": tag, **ratios}), flush=True)


def mirrored_ratio(runs: dict[str, list[dict]], kind: str) -> float:
    """Each round runs every setup twice, in an order mirrored about its middle, so a drift
    of the machine's speed that is straight over the round weighs on each setup's two runs
    alike: the ratio of the two runs' means cancels it. This ratio for ``kind`` over the
    8-adapter setup, averaged over the rounds (each setup's runs listed in the order run)."""
    rate = lambda r: r["tokens_per_s"]  # noqa: E731
    per_round = [
        (rate(runs[kind][i]) + rate(runs[kind][i + 1]))
        / (rate(runs["few"][i]) + rate(runs["few"][i + 1]))
        for i in range(0, len(runs["few"]), 2)
    ]
    return statistics.mean(per_round)


if __name__ == "__main__":
    main()
