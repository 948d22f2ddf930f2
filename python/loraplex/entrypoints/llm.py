"""``LLM``: offline batched generation, vLLM's class and call shape."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from loraplex._core import LoRARequest
from loraplex.engine.args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine, Prompt
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.tokenizer import Tokenizer


class LLM:
    """Generates for a list of prompts with continuous batching; returns outputs in input
    order. Keyword arguments are ``EngineArgs`` fields."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: Any = "auto",
        seed: int = 0,
        **kwargs: Any,
    ):
        args = EngineArgs(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(args)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.get_tokenizer()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        n = len(prompt_list)
        params = _per_prompt(
            sampling_params or SamplingParams(), SamplingParams, n, "sampling_params"
        )
        loras = _per_prompt(lora_request, LoRARequest, n, "lora_request")
        priorities = list(priority) if priority is not None else [0] * n
        if len(priorities) != n:
            raise ValueError(f"priority has {len(priorities)} entries for {n} prompts")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p, lora, prio in zip(prompt_list, params, loras, priorities):
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, p, lora_request=lora, priority=prio)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                for out in self.llm_engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(value: Any, kind: type, n: int, name: str) -> list[Any]:
    """One value for all prompts, or a list with one per prompt."""
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} prompts")
    return values
