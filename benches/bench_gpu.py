"""GPU benchmarks (a CUDA machine; ``scripts/gpu_check.sh`` runs them):

1. Copy bandwidth: a device-to-device copy of 2 GiB (bytes read + written per second), the
   ceiling the kernels are held to.
2. SGMV kernels at decode shapes: shrink (2048 -> rank) and expand (rank -> 8192) for 64
   decode rows over 8 and 64 adapters and 256 rows over 256, bfloat16, rank 16 and 64; the
   bytes they must move (the touched adapters' weights, inputs, outputs) per second, against
   the copy.
3. End to end on a Llama-3.2-1B-shaped random model (bfloat16): loraplex with 8 and 64
   adapters (rank 16, all seven projections) and 1,000 (rank 8, q/k/v/o) against the base
   model alone (LoRA overhead) and against transformers + PEFT's mixed batch (8 adapters);
   1,000 requests (prompts 16-128 tokens, outputs 16-64), greedy, EOS ignored, each naming
   the next adapter in turn.

    python benches/bench_gpu.py [--skip-e2e] [--requests 1000]

Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import loraplex  # noqa: F401 - before torch, so its OpenMP default applies here too

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import build, rate_row, time_generate, workload  # noqa: E402

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
)


def cuda_time(fn, reps: int = 20) -> float:
    """Mean seconds of ``fn`` over ``reps`` runs after 3 warm-ups, timed by CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def bench_copy() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), reps=10)
    rate = 2 * src.numel() / seconds
    print(json.dumps({"copy_GBps": round(rate / 1e9, 1)}), flush=True)
    return rate


def bench_kernels(copy_rate: float) -> None:
    from loraplex.ops import cuda

    assert cuda.available(), "the CUDA kernels did not build"
    for rows, adapters in ((64, 8), (64, 64), (256, 256)):
        for rank in (16, 64):
            print(json.dumps(kernel_row(cuda, rows, adapters, rank, copy_rate)), flush=True)


def kernel_row(cuda, rows: int, adapters: int, rank: int, copy_rate: float) -> dict:
    """The kernels alone (segment tables on the device beforehand, as a step builds them
    once for every layer)."""
    dtype, fan_in, fan_out, slots = torch.bfloat16, 2048, 8192, 256
    size = torch.finfo(dtype).bits // 8
    per = rows // adapters
    tables = cuda._tables([(i * per, per, i) for i in range(adapters)], "cuda")
    x = torch.randn(rows, fan_in, dtype=dtype, device="cuda")
    a = torch.randn(slots, rank, fan_in, dtype=dtype, device="cuda") * 0.02
    b = torch.randn(slots, fan_out, rank, dtype=dtype, device="cuda") * 0.02
    y = torch.empty(rows, rank, dtype=dtype, device="cuda")
    out = torch.zeros(rows, fan_out, dtype=dtype, device="cuda")
    ops = torch.ops.loraplex
    shrink = cuda_time(lambda: ops.sgmv_shrink(x, a, *tables, y))
    expand = cuda_time(lambda: ops.sgmv_expand(y, b, *tables, out, 0))
    moved_shrink = (adapters * rank * fan_in + rows * fan_in + rows * rank) * size
    moved_expand = (adapters * fan_out * rank + rows * rank + 2 * rows * fan_out) * size
    return {
        "kernels": f"{rows} rows over {adapters} adapters, rank {rank}, bf16",
        "shrink_us": round(shrink * 1e6, 1),
        "expand_us": round(expand * 1e6, 1),
        "shrink_GBps": round(moved_shrink / shrink / 1e9, 1),
        "expand_GBps": round(moved_expand / expand / 1e9, 1),
        "shrink_of_copy": round(moved_shrink / shrink / copy_rate, 3),
        "expand_of_copy": round(moved_expand / expand / copy_rate, 3),
    }


def run_engine(base: Path, jobs, adapters: list[Path], label: str, rank: int) -> dict:
    from loraplex import LLM, LoRARequest, SamplingParams

    kw = dict(max_model_len=1024, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)
    if adapters:
        kw.update(enable_lora=True, max_lora_rank=rank, max_loras=min(len(adapters), 256))
        kw.update(max_cpu_loras=len(adapters))
    llm = LLM(model=str(base), **kw)
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    for r in reqs:
        llm.llm_engine.add_lora(r)
    loras = [reqs[i % len(reqs)] if reqs else None for i in range(len(jobs))]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in jobs]
    prompts = [{"prompt_token_ids": p} for p, _ in jobs]
    llm.generate(prompts[:4], params[:4], lora_request=loras[:4], use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return rate_row({"setup": label}, tokens, elapsed)


def run_peft(base: Path, jobs, adapters: list[Path]) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda().eval()
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, p in enumerate(adapters[1:], start=1):
        model.load_adapter(p, adapter_name=f"a{i}")
    names = [f"a{i % len(adapters)}" for i in range(len(jobs))]
    elapsed = time_generate(model, jobs, adapter_names=names)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rate_row(
        {"setup": "transformers+peft mixed batch, 8 adapters"}, sum(m for _, m in jobs), elapsed
    )


def bench_e2e(requests: int) -> None:
    from bench_lora import make_adapters, make_raw_adapters

    jobs = workload(requests)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        build(base, LLAMA_1B, torch.bfloat16)
        many = make_adapters(base, Path(tmp) / "many", 64)
        thousand = make_raw_adapters(base, Path(tmp) / "thousand", 1000)
        bare = run_engine(base, jobs, [], "loraplex, base model only", 16)
        print(json.dumps(bare), flush=True)
        rows = {}
        for label, adapters, rank in (
            ("8 adapters", many[:8], 16),
            ("64 adapters", many, 16),
            ("1,000 adapters (rank 8, q/k/v/o)", thousand, 8),
        ):
            rows[label] = run_engine(base, jobs, adapters, f"loraplex, {label}", rank)
            overhead = 1 - rows[label]["tokens_per_s"] / bare["tokens_per_s"]
            print(json.dumps({**rows[label], "lora_overhead": round(overhead, 3)}), flush=True)
        peft = run_peft(base, jobs, many[:8])
        ratio = rows["8 adapters"]["tokens_per_s"] / peft["tokens_per_s"]
        print(json.dumps({**peft, "loraplex_8_adapters_over_peft": round(ratio, 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--requests", type=int, default=1000, help="one adapter each, in turn")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))
    bench_kernels(bench_copy())
    if not args.skip_e2e:
        bench_e2e(args.requests)


if __name__ == "__main__":
    main()
