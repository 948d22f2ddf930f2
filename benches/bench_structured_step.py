"""What constraining half the rows of a 32-row decode batch costs a step, against none.

The SmolLM-135M-shaped random model (float32) with a byte-level BPE of ``--vocab`` tokens
trained here (``bench_grammar.train_tokenizer``), its vocabulary the model's. Each round
queues 32 requests of 32 prompt tokens, lets the first step prefill them all, then times
``--steps`` decode steps of all 32 (``LLMEngine.step``, wall time, each step alone); then
aborts them. Setups, in turn, ``--rounds`` times: ``none`` (32 free requests) and ``half``
(16 of them constrained to a JSON schema whose documents are far longer than the window: a
list of at least 40 objects of a string, an integer and an enum field, no whitespace; so
every constrained row needs a mask on every timed step). Also timed, inside ``half``'s
steps: the mask fill (``GrammarBackend.fill_masks``, which runs beside the forward).

    .venv/bin/python benches/bench_structured_step.py [--steps 24] [--rounds 6]

Prints one JSON line per setup (median and p90 step ms over all rounds), then the ratio.
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
from bench_generate import SMOLLM_135M  # noqa: E402
from bench_grammar import train_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer"},
                    "kind": {"enum": ["tool", "part", "kit"]},
                },
                "required": ["name", "qty", "kind"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def build(folder: Path, vocab: int) -> int:
    import transformers
    from tokenizers import Tokenizer

    train_tokenizer(vocab, folder)
    size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SMOLLM_135M, "vocab_size": size, "eos_token_id": 1})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from loraplex import LLM, SamplingParams
    from loraplex.sampling_params import StructuredOutputsParams

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        vocab = build(folder, args.vocab)
        llm = LLM(model=str(folder), max_model_len=1024, max_num_seqs=32)
        engine = llm.llm_engine
        grammars = engine.grammars
        fill_s: list[float] = []
        real_fill = grammars.fill_masks

        def timed_fill(matchers):
            t0 = time.perf_counter()
            try:
                return real_fill(matchers)
            finally:
                fill_s.append(time.perf_counter() - t0)

        grammars.fill_masks = timed_fill
        so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
        rng = random.Random(0)
        times: dict[str, list[float]] = {"none": [], "half": []}
        fills: list[float] = []
        for r in range(args.rounds):
            for setup in ("none", "half"):
                ids = []
                for i in range(32):
                    constrained = setup == "half" and i % 2 == 0
                    p = SamplingParams(
                        max_tokens=args.steps + 8,
                        ignore_eos=True,
                        temperature=1.0,
                        seed=r * 100 + i,
                        structured_outputs=so if constrained else None,
                    )
                    rid = f"{setup}-{r}-{i}"
                    prompt = [rng.randrange(2, vocab) for _ in range(32)]
                    engine.add_request(rid, {"prompt_token_ids": prompt}, p)
                    ids.append(rid)
                engine.step()  # the prefill of all 32
                engine.step()
                fill_s.clear()
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    engine.step()
                    times[setup].append(time.perf_counter() - t0)
                if setup == "half":
                    fills += fill_s
                running = engine.get_num_unfinished_requests()
                engine.abort_request(ids)
                while engine.has_unfinished_requests():
                    engine.step()
                if running != 32:
                    sys.exit(f"{setup}: {running} of 32 requests ran the window; widen it")
        out = {}
        for setup, values in times.items():
            values.sort()
            out[setup] = statistics.median(values)
            print(
                json.dumps(
                    {
                        "setup": setup,
                        "step_ms_median": round(out[setup] * 1e3, 2),
                        "step_ms_p90": round(values[int(len(values) * 0.9)] * 1e3, 2),
                        "steps": len(values),
                    }
                )
            )
        fills.sort()
        print(
            json.dumps(
                {
                    "mask_fill_ms_median_16_rows": round(statistics.median(fills) * 1e3, 3),
                    "mask_fill_ms_p90": round(fills[int(len(fills) * 0.9)] * 1e3, 3),
                    "vocab": vocab,
                    "half_over_none": round(out["half"] / out["none"], 4),
                }
            )
        )


if __name__ == "__main__":
    main()
