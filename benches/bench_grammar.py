"""The grammar backends side by side on this machine's CPUs: llguidance and xgrammar.

A byte-level BPE of ``--vocab`` tokens (32k, a Llama-sized vocabulary) is trained here, offline,
on the Python standard library's sources. For each backend that imports:

- ``tokenizer_ms``: building the backend's view of the tokenizer (once per served model);
- ``compile_ms``: compiling one JSON schema, per schema, over ``--schemas`` distinct schemas of
  the family the tests draw from (objects with required string / integer / enum / array
  fields), caches off or keyed apart so every compile is a real one; and a regex, a choice;
- ``mask_us``: computing one row's next-token mask (the bitmask a step needs), per row, while a
  matcher walks a valid document: each step the mask is filled and a random allowed token is
  accepted, till the grammar ends; medians and p99 over all rows of all documents.

    .venv/bin/python benches/bench_grammar.py [--vocab 32000] [--schemas 24]

xgrammar is not a dependency: install it apart (``pip install xgrammar``) to compare. Prints
one JSON line per backend and kind.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch


def train_tokenizer(vocab: int, folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in lib.glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def schema_family(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        props, required = {}, []
        for j in range(rng.randint(2, 5)):
            name = f"f{i}_{j}"
            kind = rng.choice(["string", "integer", "enum", "array"])
            if kind == "enum":
                props[name] = {"enum": [f"v{i}{j}{k}" for k in range(rng.randint(2, 4))]}
            elif kind == "array":
                props[name] = {"type": "array", "items": {"type": "integer"}, "maxItems": 4}
            elif kind == "string":
                props[name] = {"type": "string", "maxLength": 12}
            else:
                props[name] = {"type": "integer"}
            required.append(name)
        out.append(
            {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    return out


REGEX = r"[a-z]{3,8}-\d{2,4}(\.[a-z]+)?"
CHOICE = ["positive", "negative", "neutral", "mixed feelings"]


def unpack_allowed(mask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        import llguidance as llg
        import llguidance.torch as lt

        self.llg, self.lt = llg, lt
        t0 = time.perf_counter()
        self.tok = llg.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.tokenizer_ms = (time.perf_counter() - t0) * 1e3
        self.vocab = vocab

    def compile(self, kind: str, spec):
        M = self.llg.LLMatcher
        if kind == "json":
            g = M.grammar_from_json_schema(
                json.dumps(spec), defaults={"whitespace_flexible": False}
            )
        elif kind == "regex":
            g = M.grammar_from_regex(spec)
        else:
            alts = " | ".join(json.dumps(c) for c in spec)
            g = M.grammar_from_lark(f"start: {alts}")
        m = M(self.tok, g, log_level=0)  # llguidance compiles lazily: make it walk once
        mask = self.lt.allocate_token_bitmask(1, self.vocab)
        self.lt.fill_next_token_bitmask(m, mask, 0)
        return g

    def matcher(self, g):
        return self.llg.LLMatcher(self.tok, g, log_level=0)

    def allocate(self):
        return self.lt.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, mask):
        self.lt.fill_next_token_bitmask(m, mask, 0)

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def done(self, m) -> bool:
        return m.is_stopped()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=_load(tokenizer_json), eos_token="</s>")
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.tokenizer_ms = (time.perf_counter() - t0) * 1e3
        self.vocab = vocab

    def compile(self, kind: str, spec):
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec), any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(spec)
        alts = " | ".join(json.dumps(json.dumps(x)[1:-1]) for x in spec)
        return c.compile_grammar(f"root ::= {alts}")

    def matcher(self, g):
        return self.xgr.GrammarMatcher(g)

    def allocate(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, mask):
        m.fill_next_token_bitmask(mask, 0)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_terminated()


def _load(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def walk(backend, g, rng: random.Random, eos: int, limit: int = 256) -> list[float]:
    """Mask times (us) of one document: fill, pick a random allowed token (EOS last), accept."""
    m, mask, times = backend.matcher(g), backend.allocate(), []
    for _ in range(limit):
        t0 = time.perf_counter()
        backend.fill(m, mask)
        times.append((time.perf_counter() - t0) * 1e6)
        allowed = unpack_allowed(mask[0], backend.vocab)
        if not allowed:
            break
        others = [t for t in allowed if t != eos]
        t = rng.choice(others) if others and rng.random() < 0.9 else allowed[0]
        if t == eos and len(allowed) > 1 and others:
            t = rng.choice(others)
        if not backend.accept(m, t) or backend.done(m):
            break
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--schemas", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = train_tokenizer(args.vocab, Path(tmp))
        text = path.read_text()
        tok = _load(text)
        vocab, eos = tok.get_vocab_size(), tok.token_to_id("</s>")
        print(
            json.dumps(
                {
                    "tokenizer": "byte-level BPE",
                    "vocab": vocab,
                    "train_s": round(time.perf_counter() - t0, 1),
                }
            )
        )
        schemas = schema_family(args.schemas)
        for cls in (Llguidance, Xgrammar):
            try:
                backend = cls(text, vocab, eos)
            except ImportError as e:
                print(json.dumps({"backend": cls.name, "skipped": f"not installed: {e}"}))
                continue
            print(json.dumps({"backend": cls.name, "tokenizer_ms": round(backend.tokenizer_ms, 1)}))
            rng = random.Random(0)
            for kind, specs in (
                ("json", schemas),
                ("regex", [REGEX] * 8),
                ("choice", [CHOICE] * 8),
            ):
                compiles, masks = [], []
                for i, spec in enumerate(specs):
                    if kind != "json":  # distinct text, so no cache can answer
                        spec = spec + f"z{i}" if kind == "regex" else [*spec, f"other {i}"]
                    t0 = time.perf_counter()
                    g = backend.compile(kind, spec)
                    compiles.append((time.perf_counter() - t0) * 1e3)
                    for _ in range(2):
                        masks += walk(backend, g, rng, eos)
                masks.sort()
                print(
                    json.dumps(
                        {
                            "backend": cls.name,
                            "kind": kind,
                            "compile_ms_median": round(statistics.median(compiles), 2),
                            "compile_ms_max": round(max(compiles), 2),
                            "mask_us_median": round(statistics.median(masks), 1),
                            "mask_us_p99": round(masks[int(len(masks) * 0.99)], 1),
                            "rows": len(masks),
                        }
                    )
                )


if __name__ == "__main__":
    main()
