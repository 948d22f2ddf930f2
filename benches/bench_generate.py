"""Generation throughput: loraplex vs transformers.generate on the same workload, in one run.

A SmolLM-135M-shaped Llama with random weights (built here, offline), a word-level tokenizer
of the same vocabulary size, and 32 requests of mixed prompt (16-128 tokens) and output
(16-64 tokens) lengths, greedy, EOS ignored. transformers runs the 32 prompts as one
left-padded batch to the longest output (how one batches with `generate`); both count only
the tokens each request asked for. Also reports the share of loraplex's step time spent
outside the model forward (scheduling, batching, sampling, detokenizing).

    .venv/bin/python benches/bench_generate.py [--requests 32] [--threads 2]

Prints one JSON line per setup, then the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import loraplex  # noqa: F401 - before torch, so its OpenMP default applies here too

# isort: split
import torch

SMOLLM_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
)


def build(folder: Path, config: dict | None = None, dtype=torch.float32) -> None:
    """A random Llama of ``config``'s shape (SmolLM-135M's by default) in ``dtype``, and a
    word-level tokenizer of its vocabulary size, saved to ``folder``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = config or SMOLLM_135M
    vocab = {f"w{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(dtype)
    model.save_pretrained(folder)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    vocab = SMOLLM_135M["vocab_size"]
    return [
        ([rng.randrange(2, vocab) for _ in range(rng.randint(16, 128))], rng.randint(16, 64))
        for _ in range(n)
    ]


def run_loraplex(folder: Path, jobs) -> dict:
    from loraplex import LLM, SamplingParams

    llm = LLM(model=str(folder), max_model_len=512)
    engine = llm.llm_engine
    model = engine.model
    forward_s = 0.0
    real_forward, real_logits = model.forward, model.compute_logits

    def timed(fn):
        def wrapper(*args, **kwargs):
            nonlocal forward_s
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                forward_s += time.perf_counter() - start

        return wrapper

    model.forward, model.compute_logits = timed(real_forward), timed(real_logits)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in jobs]
    llm.generate(
        [{"prompt_token_ids": p} for p, _ in jobs[:2]], params[:2], use_tqdm=False
    )  # warm up
    forward_s = 0.0
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert new_tokens == sum(m for _, m in jobs)
    share = round(1 - forward_s / elapsed, 4)
    return rate_row({"engine": "loraplex"}, new_tokens, elapsed, share_outside_forward=share)


def rate_row(label: dict, new_tokens: int, elapsed: float, **extra) -> dict:
    """One JSON row: ``label``, new tokens, seconds and new tokens per second (+ ``extra``)."""
    return {
        **label,
        "new_tokens": new_tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(new_tokens / elapsed, 1),
        **extra,
    }


def pad_left(jobs) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch (pad id 2) and its attention mask."""
    width = max(len(p) for p, _ in jobs)
    ids = torch.full((len(jobs), width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(jobs):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def time_generate(model, jobs, **extra) -> float:
    """Seconds for one left-padded ``generate`` over every job, run to the longest output
    (after a 2-prompt warm-up). ``extra`` goes to ``generate`` (e.g. PEFT's adapter_names,
    a list with one entry per job)."""
    ids, mask = (t.to(model.device) for t in pad_left(jobs))
    longest = max(m for _, m in jobs)
    gen = dict(do_sample=False, pad_token_id=2, eos_token_id=None)
    warm = {k: v[:2] if isinstance(v, list) else v for k, v in extra.items()}
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2, **gen, **warm)
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            **gen,
            **extra,
        )
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def run_transformers(folder: Path, jobs) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    elapsed = time_generate(model, jobs)
    return rate_row({"engine": "transformers.generate"}, sum(m for _, m in jobs), elapsed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    jobs = workload(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        ours = run_loraplex(folder, jobs)
        print(json.dumps(ours), flush=True)
        ref = run_transformers(folder, jobs)
        print(json.dumps(ref), flush=True)
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
    print(json.dumps({"ratio_loraplex_over_transformers": round(ratio, 2)}))


if __name__ == "__main__":
    main()
