"""The adapters of one engine: identity (the Rust registry), validated copies on the host,
and the device slots. The Rust scheduler decides which adapter goes to which slot; this
performs its loads, and reports adapters that turn out unloadable."""

from __future__ import annotations

from collections import OrderedDict

import torch

from loraplex._core import AdapterRegistry, LoRARequest, SchedulerOutput
from loraplex.errors import InvalidAdapterError
from loraplex.lora.adapter import LoRAAdapter, load_adapter
from loraplex.lora.slots import LoRAContext, LoRASlots
from loraplex.model.config import ModelConfig


class LoRAManager:
    def __init__(
        self,
        cfg: ModelConfig,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        served_names: set[str],
    ):
        self.cfg = cfg
        self.max_lora_rank = max_lora_rank
        self.served_names = served_names
        self.registry = AdapterRegistry()
        self.slots = LoRASlots(cfg, max_loras, max_lora_rank, dtype)
        self.host: dict[int, LoRAAdapter] = {}  # host-tier slot -> adapter (Rust decides)
        # validated at add time, kept until the first load puts them in the host tier
        self.staged: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.max_staged = max_cpu_loras

    def add(self, request: LoRARequest) -> bool:
        """Registers and validates ``request``'s adapter (raising to the caller); ``False`` if
        the identical adapter was already registered."""
        if not self.registry.register(request):
            return False
        try:
            adapter = self._load(request)
        except Exception:
            self.registry.unregister(request.lora_int_id)
            raise
        self._stage(request.lora_int_id, adapter)
        return True

    def prefetch(self, lora_ids: list[int]) -> dict[int, str]:
        """Reads and validates the adapters the next step may read from disk (the scheduler's
        ``upcoming_reads``) into the staged copies, before the scheduler can evict anything
        for them. Returns the ones that failed, with why."""
        failed: dict[int, str] = {}
        for lora_id in lora_ids:
            if lora_id in self.staged:
                self.staged.move_to_end(lora_id)
                continue
            request = self.registry.get(lora_id)
            if request is None:
                continue  # removed meanwhile: the scheduler no longer holds its requests
            try:
                self._stage(lora_id, self._load(request))
            except InvalidAdapterError as e:
                failed[lora_id] = str(e)
        return failed

    def _stage(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.staged[lora_id] = adapter
        while len(self.staged) > self.max_staged:
            self.staged.popitem(last=False)

    def _load(self, request: LoRARequest) -> LoRAAdapter:
        return load_adapter(request, self.cfg, self.max_lora_rank, self.served_names)

    def forget(self, lora_int_id: int) -> None:
        self.registry.unregister(lora_int_id)
        self.staged.pop(lora_int_id, None)
        for slot, adapter in list(self.host.items()):
            if adapter.request.lora_int_id == lora_int_id:
                del self.host[slot]

    def prepare(self, batch: SchedulerOutput) -> tuple[LoRAContext, dict[int, str]]:
        """Performs the step's slot loads, in order. Returns the step's routing and, for
        adapters that failed to load, the error (their slot is cleared)."""
        failed: dict[int, str] = {}
        for slot, lora_id, host_slot, from_host in batch.loads:
            try:
                adapter = self._fetch(lora_id, host_slot, from_host)
                self.slots.load(slot, adapter)
            except InvalidAdapterError as e:
                failed[lora_id] = str(e)
                self.slots.clear(slot)
        return LoRAContext(self.slots, batch.segments), failed

    def _fetch(self, lora_id: int, host_slot: int | None, from_host: bool) -> LoRAAdapter:
        held = self.host.get(host_slot) if host_slot is not None else None
        if from_host and held is not None and held.request.lora_int_id == lora_id:
            return held
        adapter = self.staged.pop(lora_id, None)
        if adapter is None:
            request = self.registry.get(lora_id)
            if request is None:
                raise InvalidAdapterError(
                    f"adapter id {lora_id} was removed while requests used it"
                )
            adapter = self._load(request)
        if host_slot is not None:
            self.host[host_slot] = adapter
        return adapter
