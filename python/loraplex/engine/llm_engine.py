"""``LLMEngine``: requests in, one batch per ``step()``, ``RequestOutput`` s out."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loraplex._core import (
    DuplicateRequestError,
    LoRARequest,
    QueueFullError,
    Scheduler,
    UnknownAdapterError,
)
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.backend import select_backend
from loraplex.engine.input_processor import InputProcessor, Prompt, with_truncation
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.sequence import Request, Sequence
from loraplex.engine.stats import engine_stats
from loraplex.lora.adapter import ReadPolicy
from loraplex.lora.manager import LoRAManager
from loraplex.lora.sources import ObjectStoreCache
from loraplex.model.config import ModelConfig
from loraplex.model.loader import load_model, resolve_model_path
from loraplex.outputs import RequestOutput
from loraplex.sampler import Sampler, SampleRow
from loraplex.sampling_params import SamplingParams
from loraplex.structured_outputs import GrammarBackend
from loraplex.tokenizer import Tokenizer


@dataclass
class ModelFrontend:
    """What requests are checked and tokenized against, without the weights: the model's
    config, its context length, the tokenizer and the input processor. An engine has one; a
    front end that only forwards requests to engines (the Ray Serve ingress) builds its own."""

    folder: Path
    model_config: ModelConfig
    max_model_len: int
    tokenizer: Tokenizer
    processor: InputProcessor
    grammars: GrammarBackend

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> ModelFrontend:
        folder = resolve_model_path(args.model)
        cfg = ModelConfig.from_folder(folder)
        max_model_len = args.max_model_len or cfg.max_position_embeddings
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_model_len}) exceeds the model's "
                f"max_position_embeddings ({cfg.max_position_embeddings})"
            )
        cfg = replace(cfg, max_model_len=max_model_len, model=str(args.model))
        tok_folder = resolve_model_path(args.tokenizer) if args.tokenizer else folder
        tokenizer = Tokenizer(tok_folder, cfg.raw)
        processor = InputProcessor(tokenizer, cfg.vocab_size, max_model_len, args.max_logprobs)
        grammars = GrammarBackend(tokenizer, cfg.vocab_size, **args.structured_outputs_defaults())
        return cls(folder, cfg, max_model_len, tokenizer, processor, grammars)


#: The longest tenant name a request may carry (kept while its requests run).
MAX_TENANT_LEN = 256


def check_tenant(request_id: str, tenant: Any) -> None:
    """A request's tenant is a non-empty string of at most ``MAX_TENANT_LEN`` characters."""
    if tenant is None:
        return
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_TENANT_LEN:
        shown = tenant if not isinstance(tenant, str) else f"{len(tenant)} characters"
        raise ValueError(
            f"request {request_id!r}: tenant must be a non-empty string of at most "
            f"{MAX_TENANT_LEN} characters, got {shown!r}"
        )


def max_loading(args: EngineArgs) -> int:
    """Adapter reads in flight at once (validated weights waiting for a host slot count
    too): enough that the loader pool never idles between steps, and at most a quarter of
    the host tier's size in extra memory. Reads are handed out when a step is planned, so
    this caps the adapters a step can bring in: 1,000 adapters read on demand into 256
    slots ran 138 requests a step on average at 8 reads a thread, 185 at 32 (188 over 8
    adapters); at 2 a thread, a 64-slot run fell to 47 running."""
    threads = args.lora_loader_threads
    host = args.max_cpu_loras or args.max_loras
    return max(2 * threads, min(32 * threads, host // 4))


class LLMEngine:
    """Continuous batching over the Rust scheduler. ``add_request``, ``abort_request`` and the
    adapter methods may be called from any thread; ``step`` from one at a time."""

    def __init__(self, args: EngineArgs):
        args.verify()
        self.args = args
        self.frontend = front = ModelFrontend.from_engine_args(args)
        folder, self.model_config = front.folder, front.model_config
        cfg = self.model_config
        self.backend = backend = select_backend(args, cfg.dtype)
        self.dtype = backend.dtype
        self.max_model_len = front.max_model_len
        self.tokenizer, self.processor = front.tokenizer, front.processor
        self.grammars = front.grammars
        self.model = load_model(folder, cfg, backend, self.max_model_len)
        self.num_kv_blocks = num_blocks = backend.num_kv_blocks(cfg, self.max_model_len)
        budget = args.max_num_batched_tokens or max(2048, args.max_num_seqs)
        if args.enable_chunked_prefill is False:
            budget = max(budget, self.max_model_len)
        self.scheduler = Scheduler(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            block_size=args.block_size,
            num_blocks=num_blocks,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_skipped_steps=args.max_skipped_steps,
            max_loading=max_loading(args),
        )
        self.fair_weights = dict(args.fair_share_weights or {})
        if args.scheduling_policy == "fair":
            self.scheduler.set_fair_share(True)
            for client, weight in self.fair_weights.items():
                if isinstance(client, int):
                    self.scheduler.set_client_weight(client, float(weight))
                else:  # a name: an adapter's (set as it registers) or a tenant's
                    self.scheduler.set_tenant_weight(client, float(weight))
        self.runner = ModelRunner(self.model, num_blocks, args.block_size, backend)
        self.lora: LoRAManager | None = None
        if args.enable_lora:
            served = {args.model, str(folder), folder.name, str(folder.resolve())}
            names = args.served_model_name
            served |= {names} if isinstance(names, str) else set(names or [])
            self.lora = LoRAManager(
                cfg,
                self.scheduler,
                args.max_lora_rank,
                backend,
                served,
                args.lora_loader_threads,
                ReadPolicy(
                    roots=list(args.lora_root or []),
                    cache=ObjectStoreCache(args.lora_cache_dir, args.lora_cache_max_bytes),
                    timeout=args.lora_read_timeout,
                ),
            )
        self.sampler = Sampler(args.seed)
        # the constrained rows' masks, filled beside the forward (llguidance drops the GIL)
        self._masks = concurrent.futures.ThreadPoolExecutor(1, "loraplex-masks")
        self.output_processor = OutputProcessor(self.tokenizer)
        self._requests: dict[str, Request] = {}
        self._seqs: dict[int, Sequence] = {}
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._seq_ids = itertools.count()
        self.num_preemptions = 0
        self.prefix_caching = bool(args.enable_prefix_caching)
        # prompt tokens looked up in the prefix cache and found there, all and per adapter
        self.prefix_queries = self.prefix_hits = 0
        self.prefix_by_adapter: dict[str, list[int]] = {}

    @classmethod
    def from_engine_args(
        cls,
        engine_args: EngineArgs,
        usage_context: Any = None,
        stat_loggers: Any = None,
        enable_multiprocessing: bool = False,
    ) -> LLMEngine:
        """vLLM's constructor; its other arguments mean nothing here (one process, no
        usage reporting, no stat loggers)."""
        return cls(engine_args)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_model_config(self) -> ModelConfig:
        """The model's config with the engine's ``max_model_len``, as vLLM's."""
        return self.model_config

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        *,
        sampling_params: SamplingParams | None = None,
        tenant: str | None = None,
    ) -> None:
        """Queues a request (vLLM's signature; ``sampling_params=`` is accepted for
        ``params``). Every error (bad prompt or params, duplicate id, bad adapter) is raised
        here, to this caller, naming the culprit; the engine and its other requests are
        unaffected. loraplex's ``tenant``: under ``scheduling_policy="fair"``, the client
        whose share the request counts against (without one, its adapter's)."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if params is not None and sampling_params is not None:
            raise TypeError("pass params or sampling_params, not both")
        params = params or sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
            raise ValueError(f"priority must be a 32-bit int, got {priority!r}")
        if priority != 0 and self.args.scheduling_policy not in ("priority", "fair"):
            raise ValueError(
                f"request {request_id!r}: priority={priority} needs scheduling_policy='priority'"
            )
        check_tenant(request_id, tenant)
        text, ids = self.processor.tokenize(
            request_id, prompt, with_truncation(tokenization_kwargs, params)
        )
        self.processor.check_params(request_id, params)
        bad_words = self.processor.bad_word_ids(params.bad_words or [])
        grammar = None
        if params.structured_outputs is not None:  # compiled here, never in a step
            so = params.structured_outputs
            where = f"request {request_id!r}: SamplingParams.structured_outputs.{so.kind}"
            grammar = self.grammars.compile(where, so)
        key = self._adapter_key(lora_request)
        arrival = time.time() if arrival_time is None else arrival_time
        request = Request(
            request_id, text, ids, params.clone(), lora_request, arrival, priority, bad_words
        )
        request.tenant = tenant
        with self._lock:
            if request_id in self._requests:
                raise DuplicateRequestError(f"request id {request_id!r} is already running")
            for index in range(params.n):
                seed = params.generator_seed(index)
                generator = None if seed is None else torch.Generator().manual_seed(seed)
                detok = self.tokenizer.detokenizer(ids, params.skip_special_tokens)
                matcher = grammar.matcher() if grammar is not None else None
                seq_id = next(self._seq_ids)
                request.seqs.append(Sequence(seq_id, index, request, detok, generator, matcher))
            self._requests[request_id] = request
            for seq in request.seqs:
                self._seqs[seq.seq_id] = seq
        submitted = 0
        # in the prefix cache unless it is off; reading it, unless every prompt token's
        # logprobs are wanted (vLLM's rule: those are computed, not found)
        cached_ids = ids if self.prefix_caching else None
        read_cache = params.prompt_logprobs is None
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        try:
            for seq in request.seqs:
                self.scheduler.add_request(
                    seq.seq_id, len(ids), key, priority, cached_ids, read_cache, salt, tenant
                )
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

    def _adapter_key(self, lora_request: LoRARequest | None) -> int | None:
        """Registers the adapter (a new one is read and validated first); returns the
        scheduler's key for it."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(
                f"lora_request must be a LoRARequest, got {type(lora_request).__name__}"
            )
        key = self._require_lora(lora_request).register(lora_request)
        weight = self.fair_weights.get(lora_request.lora_name)
        if weight is not None:  # a weight named by the adapter's name
            self.scheduler.set_client_weight(lora_request.lora_int_id, float(weight))
        return key

    def _require_lora(self, lora_request: Any) -> LoRAManager:
        if self.lora is None:
            raise ValueError(f"got {lora_request!r} but LoRA is not enabled: pass enable_lora=True")
        return self.lora

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Reads, validates and caches an adapter ahead of use (least recently used unpinned
        adapters make room); ``False`` if it was cached already. With
        ``lora_request.load_inplace`` its weights are read again: requests already running
        finish on the old ones."""
        return self._require_lora(lora_request).add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Frees the adapter's slots and identity at once; ``False`` if unknown.
        ``AdapterInUseError`` while unfinished requests (queued ones included) use it."""
        if self.lora is None:
            return False
        names = [
            r.lora_name for r in self.scheduler.registered_adapters() if r.lora_int_id == lora_id
        ]
        removed = self.lora.remove(lora_id)
        for name in names if removed else []:
            self.prefix_by_adapter.pop(name, None)  # its metric series go with it
        return removed

    def list_loras(self) -> set[int]:
        """The adapters the engine's cache holds (a device slot or the host tier), as vLLM:
        adding past ``max_cpu_loras`` evicts the least recently used unpinned one."""
        return self.lora.list_ids() if self.lora else set()

    def pin_lora(self, lora_id: int) -> bool:
        """Keeps the adapter in a device slot and the host tier until removed
        (``NoFreeSlotError`` if every slot is pinned or busy, or pinning the last one would
        strand other adapters' waiting requests)."""
        if self.lora is None:
            raise UnknownAdapterError(f"unknown adapter id {lora_id}: LoRA is not enabled")
        self.lora.pin(lora_id)
        return True

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Aborts requests; each reports once more, with finish_reason 'abort'. Unknown ids
        are ignored; ids that are not strings raise ``TypeError``, as in ``add_request``."""
        if isinstance(request_id, str):
            ids = [request_id]
        elif isinstance(request_id, Iterable):
            ids = list(request_id)
        else:
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        for rid in ids:
            if not isinstance(rid, str):
                raise TypeError(f"request_id must be a str, got {type(rid).__name__}")
        with self._lock:
            for rid in ids:
                request = self._requests.get(rid)
                if request is None:
                    continue
                for seq in request.seqs:
                    self.scheduler.abort_request(seq.seq_id)

    def unfinished_requests(self) -> list[Request]:
        """The requests not yet finished (a copy of the list, taken under the lock)."""
        with self._lock:
            return list(self._requests.values())

    def lora_by_name(self, name: str) -> LoRARequest | None:
        """The adapter registered under ``name`` (the core's identity), or None."""
        return self.scheduler.adapter_by_name(name)

    def lora_version(self, lora_id: int) -> str | None:
        """The version of ``lora_id``'s weights as last read: the content digest of an
        object-store adapter, the commit of a hub one; None for a local folder."""
        return self.lora.versions.get(lora_id) if self.lora else None

    def registered_loras(self) -> list[LoRARequest]:
        """Every adapter registered in the core, by ascending id."""
        return self.scheduler.registered_adapters()

    def get_stats(self) -> dict[str, Any]:
        """Queues, KV blocks, preemptions and each adapter's residency, as plain data."""
        return engine_stats(self)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def step(self) -> list[RequestOutput]:
        """One step: the core's plan (one crossing), the model, the core told what finished
        (one crossing back)."""
        with self._step_lock:
            t0 = time.time()
            reads_done = self.lora.num_reads_done if self.lora else 0
            plan = self.scheduler.schedule()
            if self.lora is not None:
                self.lora.start(plan)
            with self._lock:
                seqs = [self._seqs[i] for i in plan.request_ids]
            self._count_prefix_hits(plan, seqs)
            t1 = time.time()
            try:
                sampled = self._run(plan, seqs)
            except Exception as e:  # the batch fails alone; the engine serves on
                sampled = self._fail_batch(seqs, e)
            self._record_times(seqs, t0, t1, time.time())
            outputs = self._postprocess(plan, sampled)
            if not seqs and self.lora is not None:  # nothing to run until an adapter loads
                self.lora.wait_for_reads(reads_done)
            return outputs

    def _count_prefix_hits(self, plan, seqs: list[Sequence]) -> None:
        """The prefix cache's lookups of the requests admitted this step; a request's
        ``num_cached_tokens`` is its first admission's (vLLM's). Only admissions that looked
        the cache up are visited (a request reading none keeps 0): not the whole batch."""
        queried_at = plan.num_queried_tokens
        for i in [i for i, q in enumerate(queried_at) if q]:
            request, queried, cached = seqs[i].request, queried_at[i], plan.num_cached_tokens[i]
            if request.num_cached_tokens is None:
                request.num_cached_tokens = cached
            self.prefix_queries += queried
            self.prefix_hits += cached
            lora = request.lora_request
            name = lora.lora_name if lora is not None else ""
            counts = self.prefix_by_adapter.setdefault(name, [0, 0])
            counts[0] += queried
            counts[1] += cached

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix (vLLM's): later requests compute theirs afresh;
        requests running keep the blocks they hold. Always succeeds."""
        self.scheduler.reset_prefix_cache()
        return True

    def _run(self, plan, seqs: list[Sequence]) -> list[Sequence]:
        if not seqs:
            return []
        sampling = [seqs[i] for i in plan.sample_rows]
        computed = plan.num_computed_tokens
        wants_prompt = [
            i
            for i, s in enumerate(seqs)
            if s.index == 0
            and s.request.prompt_logprobs is not None
            and computed[i] < len(s.request.prompt_token_ids)
        ]
        constrained = [s for s in sampling if s.matcher is not None and not s.is_finished]
        masks = None
        if constrained:
            masks = self._masks.submit(self.grammars.fill_masks, [s.matcher for s in constrained])
        lora = self.lora.context(plan.segments) if self.lora is not None else None
        logits, prompt_logits = self.runner.run(plan, seqs, lora, wants_prompt)
        banned = {}
        if masks is not None:
            banned = dict(zip((s.seq_id for s in constrained), masks.result()))
        for i, rows in prompt_logits.items():
            self.output_processor.record_prompt_logprobs(seqs[i].request, computed[i], rows)
        live = [i for i, s in enumerate(sampling) if not s.is_finished]
        sampled = [sampling[i] for i in live]
        if sampled:
            rows = logits if len(live) == len(sampling) else logits[live]  # no copy if all
            sampled_rows = self._rows(sampled, banned)
            self.output_processor.append(sampled, self.sampler(rows, sampled_rows))
        # aborted before sampling: the core ends them; a dead end in this step: it is told
        ran = set(live)
        return [s for i, s in enumerate(sampling) if i in ran or s.finish_reason != "abort"]

    def _fail_batch(self, seqs: list[Sequence], e: Exception) -> list[Sequence]:
        """Aborts every request of a batch whose step raised, with the error."""
        error = f"the engine step failed ({type(e).__name__}: {e}); its batch was aborted"
        failed = []
        with self._lock:
            for request in {s.request.request_id: s.request for s in seqs}.values():
                request.error = request.error or error
                for seq in request.seqs:
                    seq.finish("abort")
                    failed.append(seq)
        return failed

    def _rows(self, seqs: list[Sequence], banned: dict[int, torch.Tensor]) -> list[SampleRow]:
        """Each sequence's sampler row; ``banned``: what its grammar forbids this step, by
        ``seq_id``, for the constrained ones."""
        eos = self.tokenizer.eos_token_ids
        rows = []
        for s in seqs:
            p, r = s.request.params, s.request
            blocked = list(p.stop_token_ids or []) + ([] if p.ignore_eos else eos)
            rows.append(
                SampleRow(
                    p,
                    r.prompt_token_ids,
                    s.output_ids,
                    s.generator,
                    blocked,
                    r.bad_word_ids,
                    banned.get(s.seq_id),
                )
            )
        return rows

    @staticmethod
    def _record_times(seqs: list[Sequence], t0: float, t1: float, t2: float) -> None:
        for request in {s.request.request_id: s.request for s in seqs}.values():
            m = request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = t0
                m.time_in_queue = t0 - m.arrival_time
            m.scheduler_time += t1 - t0
            m.model_forward_time += t2 - t1
            m.model_execute_time += t2 - t1
            generated = sum(len(s.output_ids) for s in request.seqs)
            new = generated - request.num_generated
            if new > 0:
                if request.num_generated > 0:  # a sequence's first token is its TTFT's
                    request.token_gaps.extend([t2 - m.last_token_time] * new)
                request.num_generated = generated
                m.first_token_time = m.first_token_time or t2
                m.last_token_time = t2

    def _postprocess(self, plan, sampled: list[Sequence]) -> list[RequestOutput]:
        finished = [s.seq_id for s in sampled if s.is_finished]
        # the core keeps each cached request's tokens: the one each sampled this step
        tokens = [
            (s.seq_id, s.output_ids[-1]) for s in sampled if not s.is_finished and s.output_ids
        ]
        capped = self.scheduler.postprocess(finished, tokens if self.prefix_caching else [])
        touched = {s.request.request_id: s.request for s in sampled}
        self.num_preemptions += len(plan.preempted)
        with self._lock:
            for seq_id in capped:
                self._seqs[seq_id].finish("length")
            for seq_id, error in plan.ended:  # aborted, refused, or their adapter failed
                seq = self._seqs.get(seq_id)
                if seq is not None:
                    seq.finish("abort")
                    seq.request.error = seq.request.error or error
                    touched[seq.request.request_id] = seq.request
            outputs = [o for r in touched.values() if (o := r.output()) is not None]
            for r in touched.values():
                if r.is_finished:
                    self._requests.pop(r.request_id, None)
                    for s in r.seqs:
                        self._seqs.pop(s.seq_id, None)
        return outputs
