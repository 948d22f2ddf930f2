"""The one place a scheduled batch becomes tensors: inputs, attention metadata, the forward
pass, and the logits of the rows that sample."""

from __future__ import annotations

from collections.abc import Sequence as Rows

import torch

from loraplex._core import StepPlan
from loraplex.engine.backend import Backend
from loraplex.engine.sequence import Sequence
from loraplex.lora.slots import LoRAContext
from loraplex.model.attention import build_metadata
from loraplex.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, backend: Backend):
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.kv_caches = backend.kv_caches(model.config, num_blocks, block_size)
        self.decode_attention = backend.decode_attention()

    def run(
        self,
        plan: StepPlan,
        seqs: list[Sequence],
        lora: LoRAContext | None = None,
        prompt_rows: Rows[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """seqs: the plan's sequences in batch order. Returns float32 logits [S, vocab] for
        the S sequences that sample this step (``plan.sample_rows``), in batch order; and for
        each batch index in ``prompt_rows``, the logits of every token it computed this step
        (prompt logprobs)."""
        num_new = plan.num_new_tokens
        input_ids: list[int] = []
        starts = []
        for seq, c, n in zip(seqs, plan.num_computed_tokens, num_new):
            starts.append(len(input_ids))
            input_ids.extend(seq.tokens(c, c + n))
        meta = build_metadata(
            plan,
            starts,
            self.block_size,
            self.model.config.sliding_window,
            self.backend.device,
            self.decode_attention,
        )
        input_tensor = self.backend.tensor(input_ids, torch.long)
        hidden = self.model(input_tensor, meta, self.kv_caches, lora)
        rows = [starts[i] + num_new[i] - 1 for i in plan.sample_rows]
        extra = {
            i: self.model.compute_logits(hidden[starts[i] : starts[i] + num_new[i]])
            for i in prompt_rows
        }
        logits = self.backend.to_host(self.model.compute_logits(hidden[rows]))
        return logits, {i: self.backend.to_host(t) for i, t in extra.items()}
