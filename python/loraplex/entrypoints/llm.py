"""``LLM``: offline batched generation and chat, vLLM's class and call shapes."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from loraplex._core import LoRARequest
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.input_processor import Prompt
from loraplex.engine.llm_engine import LLMEngine
from loraplex.lora.adapter import check_path
from loraplex.model.config import ModelConfig
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import RequestOutputKind, SamplingParams
from loraplex.tokenizer import Tokenizer

Conversation = list[dict[str, Any]]


class LLM:
    """Generates for a list of prompts with continuous batching; returns outputs in input
    order. Keyword arguments are ``EngineArgs`` fields (vLLM's names: see ``EngineArgs``)."""

    def __init__(self, model: str, **kwargs: Any):
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.get_tokenizer()

    @property
    def model_config(self) -> ModelConfig:
        """The model's config with the engine's ``max_model_len`` (vLLM's
        ``llm.llm_engine.model_config`` too)."""
        return self.llm_engine.model_config

    def reset_prefix_cache(self, device: Any = None) -> bool:
        """vLLM's: forgets every cached prefix (``device`` means nothing here)."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` use when given no sampling params (a fresh copy):
        ``SamplingParams()``'s defaults, not the checkpoint's generation_config.json."""
        return SamplingParams()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        *,
        tenant: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``generate``. loraplex's ``tenant`` (one for all prompts, or one per
        prompt): under ``scheduling_policy="fair"``, the client each request's share counts
        against (without, its adapter)."""
        prompt_list = _as_prompt_list(prompts)
        return self._generate(
            prompt_list,
            sampling_params,
            use_tqdm,
            lora_request,
            priority,
            tokenization_kwargs,
            tenant,
        )

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        *,
        tenant: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates a reply for each conversation, rendered with the model's chat template
        (or ``chat_template``) as transformers' ``apply_chat_template`` renders it, and
        tokenized without added special tokens (the template writes them). ``tenant``: as
        for ``generate``."""
        if mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs: loraplex serves text-only models")
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if one else list(messages)  # type: ignore[list-item]
        tokenizer = self.get_tokenizer()
        prompts: list[Prompt] = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                list(conversation),  # type: ignore[arg-type]
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                tokenize=True,
                **(chat_template_kwargs or {}),
            )
            prompts.append({"prompt_token_ids": ids})
        return self._generate(prompts, sampling_params, use_tqdm, lora_request, None, None, tenant)

    def _generate(
        self, prompt_list, sampling_params, use_tqdm, lora_request, priority, tok_kw, tenant=None
    ):
        n = len(prompt_list)
        params = _per_prompt(
            sampling_params or self.get_default_sampling_params(),
            SamplingParams,
            n,
            "sampling_params",
        )
        loras = _per_prompt(lora_request, LoRARequest, n, "lora_request")
        priorities = list(priority) if priority is not None else [0] * n
        if len(priorities) != n:
            raise ValueError(f"priority has {len(priorities)} entries for {n} prompts")
        tenants = [tenant] * n if tenant is None or isinstance(tenant, str) else list(tenant)
        if len(tenants) != n:
            raise ValueError(f"tenant has {len(tenants)} entries for {n} prompts")
        engine = self.llm_engine
        if engine.lora is not None:
            # adapters first seen here are read in the background, ahead of need; a bad one
            # ends its requests with the error (engine.add_request would raise it instead)
            new = list(dict.fromkeys(x for x in loras if isinstance(x, LoRARequest)))
            for lora in new:  # a local path that cannot be read: raised before any is queued
                check_path(lora)
            for lora in new:  # each reload (load_inplace) once for the call, not per prompt
                engine.lora.register(lora, validate=False)
            loras = [_read_once(x) for x in loras]
        ids = []
        try:
            for prompt, p, lora, prio, who in zip(prompt_list, params, loras, priorities, tenants):
                p = p.clone()
                p.output_kind = RequestOutputKind.FINAL_ONLY  # as vLLM's LLM does
                rid = str(next(self._counter))
                engine.add_request(
                    rid,
                    prompt,
                    p,
                    lora_request=lora,
                    priority=prio,
                    tokenization_kwargs=tok_kw,
                    tenant=who,
                )
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
    if not isinstance(prompts, Sequence):
        raise TypeError(
            "prompts must be a prompt (str, token ids or a dict) or a list of them, "
            f"got {type(prompts).__name__}"
        )
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


def _read_once(lora: Any) -> Any:
    """``lora`` without ``load_inplace`` (its reload is done): the call's prompts share it."""
    if not isinstance(lora, LoRARequest) or not lora.load_inplace:
        return lora
    return LoRARequest(
        lora.lora_name,
        lora.lora_int_id,
        lora.lora_path,
        long_lora_max_len=lora.long_lora_max_len,
        base_model_name=lora.base_model_name,
        tensorizer_config_dict=lora.tensorizer_config_dict,
    )
