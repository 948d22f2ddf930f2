"""``LLMEngine``: requests in, one batch per ``step()``, ``RequestOutput`` s out."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable
from typing import Any

import torch

from loraplex._core import (
    DuplicateRequestError,
    LoRARequest,
    QueueFullError,
    Scheduler,
    UnknownAdapterError,
)
from loraplex.engine.args import DEFAULT_KV_CACHE_BYTES, EngineArgs
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.sequence import Request, Sequence
from loraplex.lora.manager import LoRAManager
from loraplex.model.config import ModelConfig
from loraplex.model.loader import load_model, resolve_model_path
from loraplex.outputs import RequestOutput
from loraplex.sampler import Sampler, SampleRow
from loraplex.sampling_params import SamplingParams
from loraplex.tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]


class LLMEngine:
    """Continuous batching over the Rust scheduler. ``add_request`` and ``abort_request`` may
    be called from any thread; ``step`` from one."""

    def __init__(self, args: EngineArgs):
        args.verify()
        self.args = args
        folder = resolve_model_path(args.model)
        self.model_config = cfg = ModelConfig.from_folder(folder)
        self.dtype = args.torch_dtype()
        self.max_model_len = args.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({cfg.max_position_embeddings})"
            )
        tok_folder = resolve_model_path(args.tokenizer) if args.tokenizer else folder
        self.tokenizer = Tokenizer(tok_folder, cfg.raw)
        self.model = load_model(folder, cfg, self.dtype, self.max_model_len)
        num_blocks = self._num_kv_blocks(cfg)
        self.scheduler = Scheduler(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens or max(2048, args.max_num_seqs),
            max_model_len=self.max_model_len,
            block_size=args.block_size,
            num_blocks=num_blocks,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_skipped_steps=args.max_skipped_steps,
        )
        self.runner = ModelRunner(self.model, num_blocks, args.block_size, self.dtype)
        self.lora: LoRAManager | None = None
        if args.enable_lora:
            served = {args.model, str(folder), folder.name, str(folder.resolve())}
            max_cpu = args.max_cpu_loras or args.max_loras
            self.lora = LoRAManager(
                cfg, args.max_loras, max_cpu, args.max_lora_rank, self.dtype, served
            )
        self.sampler = Sampler(args.seed)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._requests: dict[str, Request] = {}
        self._seqs: dict[int, Sequence] = {}
        self._lock = threading.Lock()
        self._seq_ids = itertools.count()
        self.num_preemptions = 0

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args)

    def _num_kv_blocks(self, cfg: ModelConfig) -> int:
        if self.args.num_gpu_blocks_override is not None:
            return self.args.num_gpu_blocks_override
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
        per_token *= torch.finfo(self.dtype).bits // 8
        budget = self.args.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
        needed = self.args.max_num_seqs * self.max_model_len
        tokens = min(needed, budget // per_token)
        return max(1, math.ceil(tokens / self.args.block_size))

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> None:
        """Queues a request. Errors (bad prompt, duplicate id, LoRA not enabled) are raised
        here, to this caller; the engine and its other requests are unaffected."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(request_id, prompt)
        self._check_lora(lora_request)
        request = Request(str(request_id), text, ids, params, lora_request)
        with self._lock:
            if request.request_id in self._requests:
                raise DuplicateRequestError(f"request id {request_id!r} is already running")
            for index in range(params.n):
                seq_id = next(self._seq_ids)
                seed = None if params.seed is None else params.seed + index
                generator = None if seed is None else torch.Generator().manual_seed(seed)
                detok = self.tokenizer.detokenizer(ids, params.skip_special_tokens)
                seq = Sequence(seq_id, index, request, detok, generator)
                request.seqs.append(seq)
            self._requests[request.request_id] = request
            for seq in request.seqs:
                self._seqs[seq.seq_id] = seq
        lora_id = lora_request.lora_int_id if lora_request else None
        submitted = 0
        try:
            for seq in request.seqs:
                self.scheduler.add_request(seq.seq_id, len(ids), lora_id, priority)
                submitted += 1
        except Exception:
            self._withdraw(request, submitted)
            raise

    def _withdraw(self, request: Request, submitted: int) -> None:
        """Undoes a half-made submission (e.g. a full queue) so nothing waits for it."""
        with self._lock:
            for seq in request.seqs[submitted:]:
                self._seqs.pop(seq.seq_id, None)
            request.seqs = request.seqs[:submitted]
            if not request.seqs:
                self._requests.pop(request.request_id, None)
        for seq in request.seqs:  # reported, with 'abort', when the scheduler drains it
            try:
                self.scheduler.abort_request(seq.seq_id)
            except QueueFullError:
                pass  # no room for the abort either: it runs to its end, output and all

    def _check_lora(self, lora_request: LoRARequest | None) -> None:
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(
                f"lora_request must be a LoRARequest, got {type(lora_request).__name__}"
            )
        if self.lora is None:
            raise ValueError(f"got {lora_request!r} but LoRA is not enabled: pass enable_lora=True")
        self.lora.add(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Registers and validates an adapter ahead of use; ``False`` if already registered."""
        if self.lora is None:
            raise ValueError(f"got {lora_request!r} but LoRA is not enabled: pass enable_lora=True")
        return self.lora.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Frees the adapter's device slot and host copy at once; ``False`` if unknown.
        ``AdapterInUseError`` while unfinished requests use it."""
        if self.lora is None or lora_int_id not in self.lora.registry:
            return False
        self.scheduler.remove_adapter(lora_int_id)
        self.lora.forget(lora_int_id)
        return True

    def list_loras(self) -> set[int]:
        return set(self.lora.registry.ids()) if self.lora else set()

    def pin_lora(self, lora_int_id: int) -> bool:
        """Keeps the adapter in a device slot until removed (``NoFreeSlotError`` if every
        slot is pinned or busy)."""
        if self.lora is None or lora_int_id not in self.lora.registry:
            raise UnknownAdapterError(f"unknown adapter id {lora_int_id}: add_lora it first")
        self.scheduler.pin_adapter(lora_int_id)
        return True

    def _tokenize(self, request_id: str, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            else:
                raise ValueError(
                    f"request {request_id!r}: a prompt dict needs 'prompt' or 'prompt_token_ids'"
                )
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            text, ids = None, list(prompt)
        else:
            raise TypeError(
                f"request {request_id!r}: prompt must be str, token ids or a dict, "
                f"got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"request {request_id!r}: token ids {bad[:5]} are outside the vocabulary "
                f"(size {vocab})"
            )
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: the prompt ({len(ids)} tokens) is longer than "
                f"max_model_len ({self.max_model_len})"
            )
        return text, ids

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Aborts requests; each reports once more, with finish_reason 'abort'."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            for rid in ids:
                request = self._requests.get(rid)
                if request is None:
                    continue
                for seq in request.seqs:
                    self.scheduler.abort_request(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def step(self) -> list[RequestOutput]:
        aborted: set[Sequence] = set()
        if self.lora is not None:
            # adapters this step may read from disk are read and validated first: one that
            # fails is dropped before the scheduler can evict anything for it
            upcoming = self.scheduler.upcoming_reads(self.args.max_loras)
            aborted = self._fail_adapters(self.lora.prefetch(upcoming))
        batch = self.scheduler.schedule()
        lora, failed = self.lora.prepare(batch) if self.lora else (None, {})
        aborted |= self._fail_adapters(failed)
        with self._lock:
            seqs = [self._seqs[i] for i in batch.request_ids]
        sampling = [s for s, smp in zip(seqs, batch.samples) if smp]
        if seqs:  # a prefill chunk that samples nothing still fills the KV cache
            logits = self.runner.run(batch, seqs, lora)
            live = [i for i, s in enumerate(sampling) if not s.is_finished]
            sampled = [sampling[i] for i in live]
            if sampled:
                self.output_processor.append(
                    sampled, self.sampler(logits[live], self._rows(sampled))
                )
        return self._postprocess(batch, [s for s in sampling if s not in aborted], aborted)

    def _fail_adapters(self, failed: dict[int, str]) -> set[Sequence]:
        """An adapter that failed to load fails only the requests naming it."""
        hit: set[Sequence] = set()
        for lora_id, error in failed.items():
            seq_ids = self.scheduler.remove_adapter(lora_id, force=True)
            assert self.lora is not None
            self.lora.forget(lora_id)
            with self._lock:
                for seq_id in seq_ids:
                    seq = self._seqs[seq_id]
                    seq.finish("abort")
                    seq.request.error = error
                    hit.add(seq)
        return hit

    def _rows(self, seqs: list[Sequence]) -> list[SampleRow]:
        eos = self.tokenizer.eos_token_ids
        rows = []
        for s in seqs:
            p = s.request.params
            blocked = list(p.stop_token_ids or []) + ([] if p.ignore_eos else eos)
            rows.append(
                SampleRow(p, s.request.prompt_token_ids, s.output_ids, s.generator, blocked)
            )
        return rows

    def _postprocess(self, batch, sampled: list[Sequence], aborted) -> list[RequestOutput]:
        finished = [s.seq_id for s in sampled if s.is_finished]
        capped = self.scheduler.postprocess(finished)
        touched = {s.request.request_id: s.request for s in [*sampled, *aborted]}
        self.num_preemptions += len(batch.preempted)
        with self._lock:
            for seq_id in capped:
                self._seqs[seq_id].finish("length")
            for seq_id in batch.aborted:
                seq = self._seqs.get(seq_id)
                if seq is not None:
                    seq.finish("abort")
                    touched[seq.request.request_id] = seq.request
            outputs = [r.output() for r in touched.values()]
            for r in touched.values():
                if r.is_finished:
                    self._requests.pop(r.request_id, None)
                    for s in r.seqs:
                        self._seqs.pop(s.seq_id, None)
        return outputs
