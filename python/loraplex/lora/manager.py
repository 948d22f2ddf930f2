"""The adapters of one engine: identity (the Rust registry), validated weights in the host tier
and the device slots. The Rust scheduler owns both tiers' LRUs and pins and decides every
load; this keeps the tensors by slot and performs the loads.

The scheduler knows adapters by *key*: an adapter's first weights use its ``lora_int_id``; a
``load_inplace`` reload gets a fresh key, so requests already running finish on the weights
they started with while new ones use the new weights. A replaced key is dropped from the tiers
once no request uses it.
"""

from __future__ import annotations

import itertools
import threading

import torch

from loraplex._core import AdapterRegistry, LoRARequest, Scheduler, SchedulerOutput
from loraplex.errors import InvalidAdapterError
from loraplex.lora.adapter import LoRAAdapter, adapter_error, load_adapter
from loraplex.lora.slots import LoRAContext, LoRASlots
from loraplex.model.config import ModelConfig

# keys of reloaded weights: far above any id a user picks in practice, checked anyway
_RELOAD_KEYS = itertools.count(1 << 62)


class LoRAManager:
    def __init__(
        self,
        cfg: ModelConfig,
        scheduler: Scheduler,
        max_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        served_names: set[str],
    ):
        self.cfg = cfg
        self.scheduler = scheduler
        self.max_lora_rank = max_lora_rank
        self.served_names = served_names
        # held from reading a tier's contents to using them: a step's schedule() and its
        # loads, an add's caching; reentrant for the engine's failure paths
        self.lock = threading.RLock()
        self.registry = AdapterRegistry()
        self.slots = LoRASlots(cfg, max_loras, max_lora_rank, dtype)
        self.key_of: dict[int, int] = {}  # lora_int_id -> key of its current weights
        self.request_of: dict[int, LoRARequest] = {}  # key -> the request that loads it
        self.retired: set[int] = set()  # keys replaced by a reload, dropped once unused
        self.host: dict[int, tuple[int, LoRAAdapter]] = {}  # host slot -> (key, weights)
        self.staged: dict[int, LoRAAdapter] = {}  # read for the next step, no host slot free

    def add(self, request: LoRARequest, recache: bool = True) -> bool:
        """Registers, reads and validates ``request``'s adapter (errors raised to the caller,
        nothing half-registered) and caches it in the host tier. ``False`` if it was
        already registered and cached (or registered, without ``recache``: a request's
        adapter is read again when the scheduler needs it); ``load_inplace`` reads it again
        regardless."""
        lora_id = request.lora_int_id
        known = self.registry.get(lora_id)
        if known is not None and request.load_inplace:
            return self._reload(known, request)
        if not self.registry.register(request):  # identical one registered
            key = self.key_of[lora_id]
            if not recache:
                return False
            with self.lock:
                if self._is_cached(key):
                    self.scheduler.cache_adapter(key)  # marks it used
                    return False
            adapter = self.load(request)
            with self.lock:
                self._cache(key, adapter)
            return True
        try:
            adapter = self.load(request)
        except Exception:
            self.registry.unregister(lora_id)
            raise
        with self.lock:
            self.key_of[lora_id] = lora_id
            self.request_of[lora_id] = request
            self._cache(lora_id, adapter)
        return True

    def _reload(self, known: LoRARequest, request: LoRARequest) -> bool:
        if known.lora_name != request.lora_name:
            self.registry.register(request)  # raises the conflict, naming both
        adapter = self.load(request)
        key = next(_RELOAD_KEYS)
        while self.registry.get(key) is not None:
            key = next(_RELOAD_KEYS)
        with self.lock:
            self.registry.unregister(request.lora_int_id)
            self.registry.register(request)
            old = self.key_of[request.lora_int_id]
            pinned = self.scheduler.unpin_adapter(old)
            self.key_of[request.lora_int_id] = key
            self.request_of[key] = request
            self.retired.add(old)
            self._cache(key, adapter)
            self.drop_retired()
            if pinned:
                self.scheduler.pin_adapter(key)
        return True

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """Reads and validates; any failure at all is an ``InvalidAdapterError`` naming it."""
        try:
            return load_adapter(request, self.cfg, self.max_lora_rank, self.served_names)
        except InvalidAdapterError:
            raise
        except Exception as e:  # RecursionError, re.error, OSError, ...: still its own failure
            raise adapter_error(request, f"cannot be loaded ({type(e).__name__}: {e})") from e

    def _is_cached(self, key: int) -> bool:
        return any(k == key for k, _ in self.host.values())

    def _cache(self, key: int, adapter: LoRAAdapter) -> None:
        placed = self.scheduler.cache_adapter(key)
        if placed is None:  # every host slot pinned: keep it for the next step only
            self.staged[key] = adapter
            return
        self.host[placed[0]] = (key, adapter)

    def user_id(self, key: int) -> int | None:
        request = self.request_of.get(key)
        return None if request is None else request.lora_int_id

    def list_ids(self) -> set[int]:
        """The adapters the engine's cache holds (a device slot or the host tier)."""
        with self.lock:
            keys = self.scheduler.resident_adapters()
            return {i for k in keys if (i := self.user_id(k)) is not None}

    def drop_retired(self) -> None:
        """Drops replaced weights that no request uses any more."""
        for key in list(self.retired):
            try:
                self.scheduler.remove_adapter(key)
            except RuntimeError:
                continue  # still in use
            self.retired.discard(key)
            self._forget_key(key)

    def prefetch(self, keys: list[int]) -> dict[int, str]:
        """Reads and validates the adapters the next step may read from disk (the scheduler's
        ``upcoming_reads``) into the host tier, before the scheduler can evict anything for
        them. Returns the keys that failed, with why."""
        failed: dict[int, str] = {}
        for key in keys:
            request = self.request_of.get(key)
            if request is None or key in self.staged:
                continue  # (the core names only adapters that no tier holds)
            try:
                self._cache(key, self.load(request))
            except InvalidAdapterError as e:
                failed[key] = str(e)
        return failed

    def forget(self, key: int) -> None:
        """Forgets a key's weights, and the adapter's identity if they are its current ones."""
        request = self.request_of.get(key)
        if request is not None and self.key_of.get(request.lora_int_id) == key:
            del self.key_of[request.lora_int_id]
            if self.registry.get(request.lora_int_id) is not None:
                self.registry.unregister(request.lora_int_id)
        self.retired.discard(key)
        self._forget_key(key)

    def _forget_key(self, key: int) -> None:
        self.request_of.pop(key, None)
        self.staged.pop(key, None)
        for slot, (k, _) in list(self.host.items()):
            if k == key:
                del self.host[slot]

    def prepare(self, batch: SchedulerOutput) -> tuple[LoRAContext, dict[int, str]]:
        """Performs the step's slot loads, in order. Returns the step's routing and, for
        adapters that failed to load, the error (their slot is cleared)."""
        failed: dict[int, str] = {}
        for slot, key, host_slot, from_host in batch.loads:
            try:
                adapter = self._fetch(key, host_slot, from_host)
                self.slots.load(slot, adapter)
            except Exception as e:
                request = self.request_of.get(key)
                if isinstance(e, InvalidAdapterError) or request is None:
                    failed[key] = str(e)
                else:
                    failed[key] = str(adapter_error(request, f"{type(e).__name__}: {e}"))
                self.slots.clear(slot)
                if host_slot is not None:  # the core gave it to this key: no stale entry
                    self.host.pop(host_slot, None)
        self.staged.clear()
        return LoRAContext(self.slots, batch.segments), failed

    def _fetch(self, key: int, host_slot: int | None, from_host: bool) -> LoRAAdapter:
        held = self.host.get(host_slot) if host_slot is not None else None
        if from_host and held is not None and held[0] == key:
            return held[1]
        adapter = self.staged.pop(key, None)
        if adapter is None:
            request = self.request_of.get(key)
            if request is None:
                raise InvalidAdapterError(f"adapter key {key} was removed while requests used it")
            adapter = self.load(request)
        if host_slot is not None:
            self.host[host_slot] = (key, adapter)
        return adapter
