"""Type stubs for the Rust core. Checked against the built module by ``mypy.stubtest``."""

import os
from typing import Any, final

__all__ = [
    "AdapterConflictError",
    "AdapterFile",
    "AdapterInUseError",
    "AdapterNotLoadedError",
    "AdapterRegistry",
    "DuplicateRequestError",
    "InvalidConfigError",
    "InvalidLoRARequestError",
    "InvalidRequestError",
    "LoRARequest",
    "LoraplexError",
    "ModulePatterns",
    "NoFreeSlotError",
    "QueueFullError",
    "Scheduler",
    "StepPlan",
    "UnknownAdapterError",
    "_restore_lora_request",
    "open_beneath",
]

class LoraplexError(Exception):
    """Root of every loraplex error."""

class InvalidLoRARequestError(LoraplexError, ValueError):
    """A LoRARequest with an invalid id, name or path."""

class AdapterConflictError(LoraplexError, ValueError):
    """An adapter whose id, name or path clashes with a registered one."""

class UnknownAdapterError(LoraplexError, LookupError):
    """An adapter id that is not registered."""

class NoFreeSlotError(LoraplexError, RuntimeError):
    """Every adapter slot is pinned or in use."""

class AdapterNotLoadedError(LoraplexError, RuntimeError):
    """An adapter whose weights are not in the host tier yet."""

class AdapterInUseError(LoraplexError, RuntimeError):
    """An adapter that unfinished requests still use."""

class QueueFullError(LoraplexError, RuntimeError):
    """The submission queue is full; retry after the engine steps."""

class DuplicateRequestError(LoraplexError, ValueError):
    """A request id that is already waiting or running."""

class InvalidRequestError(LoraplexError, ValueError):
    """A request that cannot be scheduled as given."""

class InvalidConfigError(LoraplexError, ValueError):
    """Engine limits that cannot work together."""

@final
class LoRARequest:
    """Which LoRA adapter a request uses; vLLM's ``LoRARequest``, validated on construction.

    Equality and hash are by ``lora_name`` (as in vLLM), so requests work as dict keys and in
    sets. Fields are read-only. Pickles, with every field.

    Raises ``InvalidLoRARequestError`` (a ``ValueError``): ``id must be > 0, got <id>`` when
    ``lora_int_id < 1``; ``lora_path cannot be empty`` when no path is given; and for an empty
    name. ``lora_local_path`` is deprecated: it warns (``DeprecationWarning``) and fills
    ``lora_path`` when that is empty.
    """

    def __new__(
        cls,
        lora_name: str,
        lora_int_id: int,
        lora_path: str | os.PathLike[str] | None = None,
        lora_local_path: str | os.PathLike[str] | None = None,
        long_lora_max_len: int | None = None,
        base_model_name: str | None = None,
        tensorizer_config_dict: dict[str, Any] | None = None,
        load_inplace: bool = False,
    ) -> LoRARequest: ...
    @staticmethod
    def from_path(path: str | os.PathLike[str], name: str | None = None) -> LoRARequest:
        """A request whose id is derived from the adapter's location.

        The location is the canonical absolute path when ``path`` exists on this machine,
        else ``path`` itself (a hub repo id) without trailing slashes. The id is FNV-1a 64
        of that string reduced into ``1..2**31-1``, so every process naming the same adapter
        agrees on its id. Two locations share an id with probability about 1 in 2**31 per
        pair; ``AdapterRegistry`` rejects such a clash. ``name`` defaults to the folder's name
        (local path) or the repo id.
        """
    @property
    def lora_name(self) -> str: ...
    @property
    def lora_int_id(self) -> int: ...
    @property
    def lora_path(self) -> str: ...
    @property
    def lora_local_path(self) -> str | None: ...
    @property
    def long_lora_max_len(self) -> int | None: ...
    @property
    def base_model_name(self) -> str | None: ...
    @property
    def tensorizer_config_dict(self) -> dict[str, Any] | None: ...
    @property
    def load_inplace(self) -> bool:
        """Read the adapter's weights again even if the engine holds it (vLLM's hot swap):
        requests already running finish on the weights they started with."""
    @property
    def adapter_id(self) -> int:
        """Alias of ``lora_int_id``."""
    @property
    def name(self) -> str:
        """Alias of ``lora_name``."""
    @property
    def path(self) -> str:
        """Alias of ``lora_path``."""
    @property
    def local_path(self) -> str:
        """Deprecated alias of ``lora_path``; warns."""
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]: ...

def _restore_lora_request(
    lora_name: str,
    lora_int_id: int,
    lora_path: str,
    lora_local_path: str | None,
    long_lora_max_len: int | None,
    base_model_name: str | None,
    tensorizer_config_dict: dict[str, Any] | None,
    load_inplace: bool,
) -> LoRARequest:
    """Unpickling helper: rebuilds a LoRARequest without repeating the deprecation warning."""

@final
class AdapterRegistry:
    """Adapter identity (id, name, path), with uniqueness enforced; safe across threads.

    ``register`` raises ``AdapterConflictError`` naming both adapters when the id is held by
    another name, the name by another id, or the (name, id) pair by another path.
    """

    def __new__(cls) -> AdapterRegistry: ...
    def register(self, request: LoRARequest) -> bool:
        """Register; ``True`` if new, ``False`` if the identical adapter was registered."""
    def unregister(self, lora_int_id: int) -> LoRARequest:
        """Remove and return; frees the id and name. ``UnknownAdapterError`` if absent."""
    def get(self, lora_int_id: int) -> LoRARequest | None: ...
    def get_by_name(self, lora_name: str) -> LoRARequest | None: ...
    def ids(self) -> list[int]:
        """Registered ids, ascending."""
    def __len__(self) -> int: ...
    def __contains__(self, key: int, /) -> bool: ...

@final
class StepPlan:
    """One step's plan, converted once. Per-request lists are in batch order: grouped by
    adapter slot (base model, slot -1, first), arrival order kept within a slot; per-token
    lists cover the flat batch in the same order."""

    @property
    def request_ids(self) -> list[int]: ...
    @property
    def num_computed_tokens(self) -> list[int]:
        """Tokens already cached per request: the position of its first token this step."""
    @property
    def num_new_tokens(self) -> list[int]:
        """Tokens computed this step per request (a prefill chunk, or 1 for decode)."""
    @property
    def sample_rows(self) -> list[int]:
        """Batch indices of the requests that sample a token this step."""
    @property
    def block_tables(self) -> list[list[int]]: ...
    @property
    def positions(self) -> list[int]:
        """Each batched token's position in its sequence."""
    @property
    def slot_mapping(self) -> list[int]:
        """Each batched token's KV cache slot (block * block_size + offset)."""
    @property
    def segments(self) -> list[tuple[int, int, int, int]]:
        """``(start, length, slot, host_slot)`` runs of the flat batch, one per adapter; slot
        and host slot -1 for the base model."""
    @property
    def loads(self) -> list[tuple[int, int, int]]:
        """``(slot, key, host_slot)``: copy host slot to device slot before running."""
    @property
    def reads(self) -> list[tuple[int, LoRARequest]]:
        """``(key, adapter)``: reads to start off the step thread; each validated one asks
        ``adapter_validated`` for a host slot, or fails with ``adapter_failed``."""
    @property
    def commits(self) -> list[tuple[int, int]]:
        """``(key, host_slot)``: validated weights that waited for a slot; copy them there,
        then ``adapter_loaded``."""
    @property
    def unheld(self) -> list[int]:
        """Keys of validated weights, waiting for a slot, whose adapter was forgotten."""
    @property
    def preempted(self) -> list[int]: ...
    @property
    def ended(self) -> list[tuple[int, str | None]]:
        """Requests that ended in the core: aborted (``None``), or refused or failed with the
        reason."""
    @property
    def num_queried_tokens(self) -> list[int]:
        """Per request admitted this step, the tokens it looked up in the prefix cache (0
        otherwise, and for a request that reads none)."""
    @property
    def num_cached_tokens(self) -> list[int]:
        """Per request admitted this step, the tokens found in the prefix cache (its first
        ``num_computed_tokens``; 0 otherwise)."""
    @property
    def num_batched_tokens(self) -> int: ...
    def __len__(self) -> int: ...

@final
class Scheduler:
    """The engine's core: continuous batching with adapter tiers and paged KV blocks.

    ``add_request`` / ``abort_request`` may be called from any thread (a lock-free queue; the
    GIL is released); ``schedule`` then ``postprocess`` once per engine step; the adapter
    methods and the loader's reports from any thread (a lock). Adapters are known by *key*
    (``register_adapter``): one per set of weights, so a reload gets a new key.
    Raises ``InvalidConfigError`` for limits that cannot work together.
    """

    def __new__(
        cls,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 2048,
        block_size: int = 16,
        num_blocks: int = 1024,
        max_loras: int = 1,
        max_cpu_loras: int | None = None,
        max_skipped_steps: int = 32,
        queue_capacity: int = 65536,
        max_loading: int = 4,
    ) -> Scheduler: ...
    def add_request(
        self,
        request_id: int,
        num_prompt_tokens: int,
        adapter_key: int | None = None,
        priority: int = 0,
        prompt_token_ids: list[int] | None = None,
        read_cache: bool = True,
        cache_salt: str | None = None,
        tenant: str | None = None,
    ) -> None:
        """Submit. Under fair share, ``tenant`` names the client the request counts against
        (without, its adapter). With ``prompt_token_ids`` the request takes part in the
        prefix cache: its full blocks are cached as they are computed, keyed by the tokens
        and the adapter key (the weights version), and with ``read_cache`` it is admitted
        from the cached blocks its prompt starts with; only requests with the same
        ``cache_salt`` share blocks.
        ``InvalidRequestError`` for an empty or too long prompt,
        ``QueueFullError`` when the queue is full (nothing is submitted). A key removed by
        the time the request is drained refuses it (reported in ``ended``)."""
    def abort_request(self, request_id: int) -> None: ...
    def schedule(self) -> StepPlan:
        """Form the next batch; call ``postprocess`` after running it."""
    def postprocess(self, finished: list[int], sampled: list[tuple[int, int]] = ...) -> list[int]:
        """Apply the step (one sampled token per request that sampled: ``sampled`` gives its
        id for requests in the prefix cache) and free ``finished``. Returns requests the
        scheduler finished itself for reaching ``max_model_len``."""
    def set_fair_share(self, on: bool) -> None:
        """Fair share across clients (an adapter's ``lora_int_id``, 0 the base, or the
        tenant a request names): admission takes the backlogged client with the least
        weighted service (VTC)."""
    def set_client_weight(self, client: int, weight: float) -> None: ...
    def set_tenant_weight(self, name: str, weight: float) -> None: ...
    def tenant_service(self) -> list[tuple[str, float, int]]:
        """The tenants known now: ``(name, weighted service, unfinished requests)``, by
        name; an idle tenant whose service the least backlogged client's has passed is
        forgotten (back, it would start there)."""
    def client_service(self, client: int) -> float:
        """A client's weighted service so far: prompt tokens x 1 plus generated x 2, over
        its weight (lifted to the least backlogged on return from idling)."""
    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many blocks were cached."""
    def register_adapter(self, request: LoRARequest) -> tuple[int, bool]:
        """``(key, is_new)``; ``AdapterConflictError`` naming both adapters on a clash."""
    def reload_adapter(self, request: LoRARequest) -> tuple[int, bool]:
        """New weights for a registered adapter: ``(key, old_was_pinned)``; the old key is
        unpinned and dropped once no request uses it."""
    def adapter_key(self, lora_int_id: int) -> int | None: ...
    def adapter_state(self, key: int) -> str:
        """``"absent"``, ``"loading"``, ``"ready"`` or ``"gone"``."""
    def adapter_request(self, key: int) -> LoRARequest | None: ...
    def adapter_by_name(self, name: str) -> LoRARequest | None:
        """The adapter registered under ``name`` (id, name, current path); None if none."""
    def registered_adapters(self) -> list[LoRARequest]:
        """Every registered adapter, by ascending id."""
    def stage_adapter(self, key: int) -> tuple[str, tuple[int, LoRARequest] | None]:
        """Ask for the weights in the host tier now: ``("ready", None)`` (marked used),
        ``("loading", None)``, or ``("read", job)`` to perform."""
    def adapter_validated(self, key: int, explicit: bool = False) -> tuple[str, int | None]:
        """A read proved valid: ``("slot", host_slot)`` to copy into, ``("wait", None)``
        (hold the weights until a plan's ``commits`` names a slot; for ``explicit``, no slot
        could be had and nothing is held), or ``("gone", None)``."""
    def adapter_loaded(self, key: int, host_slot: int) -> None: ...
    def adapter_failed(self, key: int, message: str) -> None:
        """Forget the adapter; its requests end with ``message``."""
    def pin_adapter(self, key: int) -> None:
        """Keep the weights in a device slot and the host tier; ``AdapterNotLoadedError``
        unless they are in the host tier, ``NoFreeSlotError`` if no slot can be given, or if
        pinning the last one would strand waiting requests of other adapters."""
    def unpin_adapter(self, key: int) -> bool: ...
    def remove_adapter(self, lora_int_id: int, force: bool = False) -> list[int]:
        """Forget an adapter (all its weights) from both tiers and the registry; requests
        still in the submission queue count as users. With ``force``, abort the requests that
        use it and return their ids; else ``AdapterInUseError`` while any do;
        ``UnknownAdapterError`` if it is not registered."""
    def resident_adapters(self) -> list[int]:
        """Ids of the adapters held ready in the host tier (and maybe a device slot)."""
    def adapter_residency(self, lora_int_id: int) -> tuple[bool, bool, bool] | None:
        """``(on_device, in_host, pinned)`` for the adapter's current weights; None if
        unknown."""
    def has_unfinished_requests(self) -> bool: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_loading(self) -> int: ...
    @property
    def num_free_blocks(self) -> int:
        """Blocks a request may be given: free ones and cached ones nobody holds."""
    @property
    def num_cached_blocks(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_num_batched_tokens(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def max_loras(self) -> int: ...
    @property
    def max_cpu_loras(self) -> int: ...
    @property
    def max_loading(self) -> int: ...

@final
class ModulePatterns:
    """PEFT module patterns (``rank_pattern``, ``alpha_pattern``) matched in linear time by
    Rust's ``regex`` crate: a pattern that would backtrack under ``re`` cannot freeze a load."""

    def __new__(cls, patterns: list[str]) -> ModulePatterns:
        """``ValueError`` naming the first pattern that does not compile (look-around and
        back-references are not read; a pattern's compiled size is bounded)."""

    def first_match(self, key: str) -> int | None:
        """The first pattern matching ``key``'s tail: ``re.match(rf"(.*\\.)?({p})$", key)``."""

def open_beneath(
    root: str | os.PathLike[str], path: str | os.PathLike[str], walk: bool = False
) -> int:
    """``path`` (relative) opened read-only and non-blocking beneath the folder ``root``,
    never following a link out of it (``openat2`` with ``RESOLVE_BENEATH``, or the walk): a
    raw descriptor the caller owns. ``OSError`` with the kernel's errno (``EXDEV``: it leads
    outside the root) and words for it."""

@final
class AdapterFile:
    """An adapter's safetensors file read into memory; the loader validates the adapter from
    ``tensors()`` and fills slots from it."""

    @staticmethod
    def read(
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        walk: bool = False,
    ) -> AdapterFile:
        """Reads and parses ``path`` (without the GIL); ``OSError`` if it cannot be read,
        ``ValueError`` if it is not a safetensors file. With ``root``, ``path`` is relative
        to it and opened beneath it, never following a link out (``PermissionError``;
        ``walk`` forces the component walk over ``openat2``)."""

    @staticmethod
    def from_bytes(data: bytes) -> AdapterFile:
        """Parses a safetensors file held in memory."""

    def tensors(self) -> list[tuple[str, str, list[int], float | None]]:
        """``[(name, dtype, shape, max_abs)]`` in file order: dtype as safetensors names it
        ("F32", "BF16", ...), max_abs the largest magnitude as float32 (NaN if any value is
        NaN), None for a dtype that is not a float."""

    def header(self) -> bytes:
        """The header's JSON: files that share it have the same names, dtypes, shapes and
        offsets."""

    def max_abs(self) -> list[float | None]:
        """Each tensor's max_abs, in file order (see ``tensors``)."""

    def to_bytes(self) -> bytes:
        """The file's bytes."""

    def fill(
        self,
        dsts: list[tuple[int, int]],
        dtype: str,
        copies: list[tuple[int, int, int, int, bool, float]],
    ) -> None:
        """Copies weights into slot memory, without the GIL. ``dsts``: (address, bytes) of
        each destination region, which the caller owns and nothing else reads or writes
        during the call (one slot of a stacked tensor); ``dtype``: "float32", "bfloat16" or
        "float16"; ``copies``: (tensor index, destination index, offset, stride, transpose,
        scale). Every copy is bounds-checked before anything is written."""
