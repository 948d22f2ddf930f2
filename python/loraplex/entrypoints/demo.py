"""The demo: one base model and three LoRA adapters, shipped in the package, served in one
mixed batch. The base model copies a lowercase word; ``upper`` upper-cases it, ``shift``
moves each letter one place on, ``vowels`` masks the vowels. Every output is checkable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "demo_assets"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = {
    None: lambda w: w,
    "upper": str.upper,
    "shift": lambda w: "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w),
    "vowels": lambda w: "".join("*" if c in "aeiou" else c for c in w),
}
WORDS = ["hello", "lora", "serving", "batch", "adapter", "punica", "rust", "kernel"]


@dataclass
class Row:
    word: str
    adapter: str | None
    output: str
    expected: str

    @property
    def ok(self) -> bool:
        return self.output == self.expected


def run(max_loras: int = 2) -> tuple[list[Row], dict[str, int]]:
    """Serves every word through the base model and each adapter, in one ``generate`` call
    with fewer device slots than adapters (so adapters are loaded and evicted mid-run)."""
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(
        model=str(ASSETS / "base"),
        enable_lora=True,
        max_loras=max_loras,
        max_cpu_loras=3,
        max_lora_rank=8,
    )
    names = [n for n in TASKS if n is not None]
    requests = {n: LoRARequest(n, i, str(ASSETS / n)) for i, n in enumerate(names, start=1)}
    plan = [(w, n) for w in WORDS for n in TASKS]
    outs = llm.generate(
        [f"{w}>" for w, _ in plan],
        SamplingParams(temperature=0, max_tokens=12),
        lora_request=[requests[n] if n else None for _, n in plan],
        use_tqdm=False,
    )
    rows = [Row(w, n, o.outputs[0].text, TASKS[n](w)) for (w, n), o in zip(plan, outs)]
    stats = {"requests": len(plan), "adapters": len(names), "max_loras": max_loras}
    return rows, stats


def main() -> int:
    rows, stats = run()
    print(
        f"loraplex demo: {stats['requests']} requests, base model + {stats['adapters']} LoRA "
        f"adapters in one batch, {stats['max_loras']} adapter slots\n"
    )
    print(f"{'prompt':<12} {'adapter':<8} {'output':<12} {'expected':<12}")
    for r in rows:
        mark = "ok" if r.ok else "WRONG"
        print(f"{r.word + '>':<12} {r.adapter or 'base':<8} {r.output:<12} {r.expected:<12} {mark}")
    wrong = sum(not r.ok for r in rows)
    print(f"\n{len(rows) - wrong}/{len(rows)} outputs are the task's right answer")
    return 1 if wrong else 0
