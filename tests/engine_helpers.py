"""Greedy-decoding oracle: every token the engine emits must be transformers' argmax for the
same model and prefix (teacher-forced over the engine's own output)."""

from __future__ import annotations

import torch

# float32: only true ties may differ. bfloat16: both sides round every activation to 8
# mantissa bits; over a 2-layer model that moves a logit by a few units in the last place of
# the row's largest logit, so allow 4 ulps of bf16 (4 * 2**-7) of the row's scale. A wrong
# position, mask or KV block moves logits by O(1) of that scale and still fails (see the
# negative controls in test_engine.py).
TOLERANCE = {
    torch.float32: lambda row: 1e-4,
    torch.bfloat16: lambda row: 4 * 2**-7 * row.abs().max(),
}


def greedy_mismatches(hf, outputs, dtype=torch.float32) -> list[str]:
    """Positions where the engine's token is not within tolerance of transformers' best."""
    bad = []
    for out in outputs:
        prompt = list(out.prompt_token_ids)
        gen = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + gen])).logits[0].float()
        for t, tok in enumerate(gen):
            row = logits[len(prompt) - 1 + t]
            tol = float(TOLERANCE[dtype](row))
            if row[tok] < row.max() - tol:
                bad.append(
                    f"request {out.request_id} token {t}: engine chose {tok} "
                    f"({row[tok]:.4f}), transformers' best is {int(row.argmax())} ({row.max():.4f})"
                )
    return bad
