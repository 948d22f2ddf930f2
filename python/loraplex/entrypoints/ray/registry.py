"""One adapter registry for a cluster: name -> (id, path, version), held by a named Ray actor
that every replica resolves through, so an id clash is refused cluster-wide and a name keeps
its id for as long as the cluster lives (removed and added again, it gets the same one).

``AdapterRegistry`` is the state and its rules, plain Python; ``cluster_registry()`` gets or
creates the cluster's actor around it (Ray is imported only there).
``LoRARequest.from_path`` ids, derived from the path, stay the coordination-free option.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

ACTOR_NAME = "loraplex-adapter-registry"
NAMESPACE = "loraplex"
REPORT_MAX_AGE_S = 10.0  # a replica silent this long is left out of the cluster view


@dataclass(frozen=True)
class Entry:
    name: str
    lora_int_id: int
    path: str
    version: int  # 1, then one more each time the name's weights are replaced


class RegistryError(ValueError):
    """A registration the registry refuses; the message names the adapter and why."""


class AdapterRegistry:
    """Also the cluster's view of its replicas: each replica reports what its engine holds
    (``report``), and ``replicas()`` answers which replica holds which adapter."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}  # registered now
        self._ids: dict[str, int] = {}  # every name ever registered -> its id, kept
        self._owner: dict[int, str] = {}  # id -> the name that holds it, forever
        self._next_id = 1
        self._reports: dict[str, tuple[float, dict]] = {}  # replica -> (when, report)
        self._epoch = 0  # one more at each unregistration

    def register(
        self, name: str, path: str, lora_int_id: int | None = None, replace: bool = False
    ) -> dict:
        """The entry for ``name`` (as a dict). The same name and path again: the same entry.
        Another path: refused, unless ``replace`` (the next version, the same id). An id
        already held by another name: refused."""
        self.check(name, path, lora_int_id, replace)
        entry = self._entries.get(name)
        if entry is not None:
            if entry.path == path:
                return asdict(entry)
            entry = Entry(name, entry.lora_int_id, path, entry.version + 1)
        else:
            entry = Entry(name, self._ids.get(name) or lora_int_id or self._new_id(), path, 1)
        self._entries[name] = entry
        self._ids[name] = entry.lora_int_id
        self._owner[entry.lora_int_id] = name
        return asdict(entry)

    def check(
        self, name: str, path: str, lora_int_id: int | None = None, replace: bool = False
    ) -> None:
        """Raises the ``RegistryError`` that ``register`` would, registering nothing: a
        replica asks before it reads new weights in place of the old ones."""
        if not name or not isinstance(name, str):
            raise RegistryError(f"adapter name must be a non-empty string, got {name!r}")
        if lora_int_id is not None and (not isinstance(lora_int_id, int) or lora_int_id < 1):
            raise RegistryError(f"adapter {name!r}: lora_int_id must be >= 1, got {lora_int_id!r}")
        known = self._ids.get(name)
        if lora_int_id is not None:
            owner = self._owner.get(lora_int_id)
            if owner is not None and owner != name:
                raise RegistryError(
                    f"adapter {name!r}: lora_int_id {lora_int_id} is already {owner!r}'s "
                    "in this cluster"
                )
            if known is not None and known != lora_int_id:
                raise RegistryError(
                    f"adapter {name!r} has lora_int_id {known} in this cluster, not {lora_int_id}"
                )
        entry = self._entries.get(name)
        if entry is not None and entry.path != path and not replace:
            raise RegistryError(
                f"adapter {name!r} is registered with path {entry.path!r}, not {path!r} "
                "(load it in place to replace its weights)"
            )

    def _new_id(self) -> int:
        while self._next_id in self._owner:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    def resolve(self, name: str) -> dict | None:
        entry = self._entries.get(name)
        return None if entry is None else asdict(entry)

    def unregister(self, name: str) -> int | None:
        """Forgets the name's path (its id stays reserved for it). Answers the epoch of
        this unregistration (see ``released``), or None if the name was not registered."""
        if self._entries.pop(name, None) is None:
            return None
        self._epoch += 1
        return self._epoch

    def entries(self) -> list[dict]:
        return [asdict(e) for e in sorted(self._entries.values(), key=lambda e: e.lora_int_id)]

    def report(self, replica_id: str, state: dict) -> tuple[dict[str, int], int]:
        """A replica's state (plain data: its engine's queues, KV blocks, adapters by tier,
        ``held``: the names its engine has, ``registry_epoch``: the last answer of this
        call it has acted on). Answers the registered names and their versions, so the
        replica can drop what was unregistered, and the epoch those names are as of."""
        self._reports[replica_id] = (time.monotonic(), dict(state, replica_id=replica_id))
        return {name: e.version for name, e in self._entries.items()}, self._epoch

    def released(self, name: str, epoch: int, max_age_s: float = REPORT_MAX_AGE_S) -> bool:
        """Whether every replica still reporting has acted on the unregistrations up to
        ``epoch`` (``unregister``'s answer) and holds no adapter named ``name``: a report
        taken before a replica dropped it does not count."""
        return all(
            r.get("registry_epoch", 0) >= epoch and name not in r.get("held", ())
            for r in self.replicas(max_age_s)
        )

    def forget_replica(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    def replicas(self, max_age_s: float = REPORT_MAX_AGE_S) -> list[dict]:
        """The replicas that reported within ``max_age_s`` (a dead one stops reporting),
        each report with its age in seconds, ordered by replica id."""
        now = time.monotonic()
        fresh = []
        for _, (when, state) in sorted(self._reports.items(), key=lambda kv: kv[0]):
            if now - when <= max_age_s:
                fresh.append(dict(state, age_s=round(now - when, 3)))
        return fresh


def cluster_registry():
    """The cluster's registry actor (created on first use, detached: it lives as long as the
    cluster). Needs ``ray.init`` (or a Serve replica) first."""
    import ray

    actor = ray.remote(num_cpus=0)(AdapterRegistry)
    return actor.options(
        name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
