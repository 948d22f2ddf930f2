"""The adapters of one engine, torch side: the host tier's weights, by slot, and the loader
pool that fills it. The Rust core decides everything else (identity, which tier holds what,
pins, what to read next and into which slot); this performs its reads, off the step thread,
and reports each back.

The CPU backend runs the LoRA kernels on the host slots directly: a device slot is not a
second copy there. The core still counts device slots (``max_loras``: the most distinct
adapters in one batch) and names the host slot of every segment.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from loraplex._core import (
    AdapterNotLoadedError,
    LoRARequest,
    NoFreeSlotError,
    Scheduler,
    UnknownAdapterError,
)
from loraplex.engine.backend import LORA_CPP, Backend
from loraplex.errors import InvalidAdapterError
from loraplex.lora.adapter import (
    LoRAAdapter,
    ReadPolicy,
    adapter_error,
    check_request,
    load_adapter,
)
from loraplex.lora.slots import LoRAContext, LoRASlots, slot_numel
from loraplex.model.config import ModelConfig


class LoRAManager:
    def __init__(
        self,
        cfg: ModelConfig,
        core: Scheduler,
        max_lora_rank: int,
        backend: Backend,
        served_names: set[str],
        num_loader_threads: int = 2,
        policy: ReadPolicy | None = None,
    ):
        self.cfg = cfg
        self.core = core
        self.max_lora_rank = max_lora_rank
        self.served_names = served_names
        self.policy = policy or ReadPolicy()  # roots, the object-store cache, the read timeout
        self.versions: dict[int, str] = {}  # lora_int_id -> the version its last read found
        # the host tier, in lora_dtype; the backend picks the kernel that reads the slots
        # the step runs on: the host tier's, or device slots of their own (a GPU's)
        self.backend = backend
        dtype = backend.lora_dtype
        kernel = backend.lora_kernel(dtype, max_lora_rank)
        try:
            self.host = LoRASlots(
                cfg,
                core.max_cpu_loras,
                max_lora_rank,
                dtype,
                kernel,
                pin_memory=backend.pin_host_tier,
            )
        except MemoryError as e:  # (committed when made: a tier too big fails here)
            n, packed = core.max_cpu_loras, kernel == LORA_CPP  # (as LoRASlots lays them out)
            per_slot = slot_numel(cfg, max_lora_rank, packed) * dtype.itemsize
            raise MemoryError(
                f"the adapters' host tier does not fit in memory: max_cpu_loras={n} slots of "
                f"{per_slot / (1 << 20):.1f} MiB (max_lora_rank={max_lora_rank}, {dtype}, "
                f"every projection), {n * per_slot / (1 << 30):.2f} GiB in all; lower "
                f"max_cpu_loras or max_lora_rank ({e})"
            ) from None
        self.device_slots: LoRASlots | None = None
        if backend.separate_device_slots:
            self.device_slots = LoRASlots(
                cfg, core.max_loras, max_lora_rank, dtype, kernel, device=backend.device
            )
        self.pool = ThreadPoolExecutor(num_loader_threads, thread_name_prefix="loraplex-loader")
        # guards the counters below; notified whenever a read ends
        self.progress = threading.Condition()
        self.num_reads_done = 0
        self.failures: dict[int, str] = {}  # key -> why its read failed (keys are never reused)
        # validated weights waiting for a host slot (at most max_loading); the core names the
        # slot in a later plan's commits, or the key in its unheld
        self.held: dict[int, LoRAAdapter] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- registration (any thread) --

    def register(self, request: LoRARequest, validate: bool = True) -> int:
        """Registers ``request``'s adapter for a request and returns its key. With
        ``validate``, a new adapter is read and validated first (errors raised here, nothing
        left registered); otherwise it is read ahead of need like any other, and a failure
        ends its requests with the error."""
        check_request(request)
        if request.load_inplace and self.core.adapter_key(request.lora_int_id) is not None:
            return self._reload(request, validate)  # vLLM: the request reloads the weights
        key, new = self.core.register_adapter(request)
        if new and validate:
            self._stage_and_wait(key)
        return key

    def _reload(self, request: LoRARequest, wait: bool) -> int:
        """Reads a registered adapter's weights again (``load_inplace``): requests already
        running finish on the old ones, later ones get the new; a pin is kept."""
        key, was_pinned = self.core.reload_adapter(request)
        if wait:
            self._stage_and_wait(key)
        if was_pinned:
            self.pin(request.lora_int_id)
        return key

    def add(self, request: LoRARequest) -> bool:
        """``add_lora``: registers, reads and validates the adapter into the host tier (least
        recently used adapters that nothing uses make room). ``False`` if it was held already;
        ``load_inplace`` reads it again (requests already running finish on the old
        weights)."""
        check_request(request)
        if request.load_inplace and self.core.adapter_key(request.lora_int_id) is not None:
            self._reload(request, True)
            return True
        key, _ = self.core.register_adapter(request)
        return self._stage_and_wait(key) != "ready"  # "ready": held already, now marked used

    def pin(self, lora_id: int) -> None:
        key = self.core.adapter_key(lora_id)
        if key is None:
            raise UnknownAdapterError(f"unknown adapter id {lora_id}: add_lora it first")
        for _ in range(3):  # its host copy can be evicted between the read and the pin
            try:
                return self.core.pin_adapter(key)
            except AdapterNotLoadedError:
                self._stage_and_wait(key)
                if self.core.adapter_state(key) != "ready":
                    raise NoFreeSlotError(
                        f"no free adapter slot: all {self.core.max_cpu_loras} host slots are "
                        f"pinned or in use (adapter {lora_id})"
                    ) from None
        return self.core.pin_adapter(key)

    def remove(self, lora_id: int) -> bool:
        try:
            self.core.remove_adapter(lora_id)
        except UnknownAdapterError:
            return False
        self.versions.pop(lora_id, None)
        return True

    def list_ids(self) -> set[int]:
        """The adapters whose weights the engine holds (a device slot or the host tier)."""
        return set(self.core.resident_adapters())

    def _stage_and_wait(self, key: int) -> str:
        """Reads ``key``'s weights into the host tier (or joins the read in flight) and waits;
        raises why the read failed. Returns what the core answered first ("ready": held)."""
        status, job = self.core.stage_adapter(key)
        if status == "read":
            self.pool.submit(self._read, *job, True).result()
        with self.progress:
            while self.core.adapter_state(key) == "loading" and key not in self.held:
                self.progress.wait()
        if self.core.adapter_state(key) == "gone":
            if key in self.failures:
                raise InvalidAdapterError(self.failures[key])
            raise UnknownAdapterError("the adapter was removed (remove_lora) while it was read")
        return status

    # -- reads (the loader pool) --

    def start(self, plan) -> None:
        """Copies the plan's loads into device slots (where the backend has its own), and
        starts the reads and host copies it hands out (off the step thread)."""
        if self.device_slots is not None and plan.loads:
            loads = [(slot, host_slot) for slot, _, host_slot in plan.loads]
            self.backend.copy_slots(self.device_slots, self.host, loads)
        for key in plan.unheld:
            self.held.pop(key, None)
        for key, host_slot in plan.commits:
            adapter = self.held.pop(key, None)
            if adapter is not None:
                self.pool.submit(self._fill, key, host_slot, adapter)
        for key, request in plan.reads:
            self.pool.submit(self._read, key, request, False)

    def _read(self, key: int, request: LoRARequest, explicit: bool) -> None:
        """Reads and validates; copies into the host slot the core gives, or holds the
        weights until it gives one (a read ahead of need never evicts what is wanted sooner);
        an ``explicit`` read (``add_lora``) with no slot to have only validates."""
        try:
            adapter = self.load(request)
        except Exception as e:  # RecursionError, re.error, OSError, ...: its requests only
            if not isinstance(e, InvalidAdapterError):
                e = adapter_error(request, f"cannot be loaded ({type(e).__name__}: {e})")
            return self._failed(key, str(e))
        status, host_slot = self.core.adapter_validated(key, explicit)
        if status == "slot":
            return self._fill(key, host_slot, adapter)
        if status == "wait" and not explicit:
            self.held[key] = adapter
        self._done()

    def _fill(self, key: int, host_slot: int, adapter: LoRAAdapter) -> None:
        try:
            self.backend.before_host_write()
            self.host.load(host_slot, adapter)
        except Exception as e:  # (a copy into preallocated memory: not expected to fail)
            return self._failed(key, f"{type(e).__name__}: {e}")
        self.core.adapter_loaded(key, host_slot)
        self._done()

    def _failed(self, key: int, message: str) -> None:
        with self.progress:
            self.failures[key] = message
        self.core.adapter_failed(key, message)
        self._done()

    def _done(self) -> None:
        with self.progress:
            self.num_reads_done += 1
            self.progress.notify_all()

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """Reads and validates (``_read`` makes any failure this adapter's own)."""
        adapter = load_adapter(
            request, self.cfg, self.max_lora_rank, self.served_names, self.policy
        )
        if adapter.version is not None:
            self.versions[request.lora_int_id] = adapter.version
        dtype = self.host.dtype
        if dtype == torch.float16:  # (bfloat16 has float32's range)
            limit = torch.finfo(dtype).max
            if max(adapter.maxes) * max(1.0, adapter.layout.max_scale) <= limit:
                return adapter  # (a bound over every module; each is looked at if it fails)
            for (layer, module), m in adapter.modules.items():
                if max(m.a_max, m.b_max) > limit:
                    raise adapter_error(
                        request,
                        f"layer {layer} {module}: weights beyond {dtype}'s range "
                        f"(lora_dtype; at most {limit})",
                    )
        return adapter

    def wait_for_reads(self, num_done_before: int) -> None:
        """For a step that found nothing to run while adapters load: blocks until a read or
        copy ends after ``num_done_before`` had (or a short while passes, so a caller's loop
        looks again; correctness never depends on it)."""
        with self.progress:
            if self.num_reads_done == num_done_before and self.core.num_loading > len(self.held):
                self.progress.wait(timeout=0.1)

    def context(self, segments: list[tuple[int, int, int, int]]) -> LoRAContext:
        """The step's routing: each segment's device slot, or its host slot where the
        kernels read the host tier (the CPU backend)."""
        if self.device_slots is not None:
            return LoRAContext(
                self.device_slots, [(start, n, slot) for start, n, slot, _ in segments]
            )
        return LoRAContext(self.host, [(start, n, host) for start, n, _, host in segments])
