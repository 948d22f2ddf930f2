"""``loraplex serve MODEL --replicas N``: the OpenAI server's routes (``api_server.build_app``,
the same app) as the ingress of a Ray Serve application whose engines are
``LoraplexReplica`` s (``deployment.py``).

The ingress parses a request, tokenizes it, resolves its ``model`` through the cluster's
registry (or finds it in a ``--lora-root`` and registers it), and streams it from an engine
replica through a handle whose multiplexed model id is the adapter, so that
``AdapterAffinityRouter`` sends it where the adapter is held. Each response names the
replica that served it (``x-loraplex-replica``). ``GET /v1/replicas`` is the cluster view
(which replica holds which adapter, its queues and KV blocks), from what replicas report to
the registry; ``/metrics`` shows the same per replica.

    app = cluster_app(args)            # the ingress bound to the engine deployment
    serve.run(app, name="loraplex", route_prefix="/")
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from loraplex._core import LoraplexError
from loraplex.engine.arg_utils import AsyncEngineArgs
from loraplex.engine.async_llm import EngineDeadError
from loraplex.engine.llm_engine import ModelFrontend
from loraplex.entrypoints.openai.api_server import build_app, parse_lora_modules, serve_options
from loraplex.entrypoints.openai.cli_args import check_args
from loraplex.entrypoints.openai.engine_client import REPLICA_HEADER, EngineClient
from loraplex.entrypoints.openai.errors import APIError
from loraplex.entrypoints.openai.metrics import Metrics
from loraplex.entrypoints.openai.middleware import BodyLimit
from loraplex.entrypoints.openai.server_logs import setup_logging
from loraplex.entrypoints.openai.serving_engine import ServingContext
from loraplex.entrypoints.openai.serving_models import load_named
from loraplex.entrypoints.ray.deployment import REPORT_PERIOD_S, engine_deployment
from loraplex.entrypoints.ray.registry import REPORT_MAX_AGE_S, cluster_registry
from loraplex.errors import InvalidAdapterError

APP_NAME = "loraplex"
logger = logging.getLogger("ray.serve")  # user code's logger in Serve: the replica's log
START_ATTEMPTS = 2  # a request whose replica is lost before its first output is sent again
# unload answers once no replica holds the adapter, or after this: longer than the reports'
# max age, so a replica lost meanwhile leaves the cluster view first
UNLOAD_WAIT_S = REPORT_MAX_AGE_S + 5.0
INGRESS_MAX_ONGOING = 4096  # the ingress only forwards: its own limit is not the bound


@dataclasses.dataclass(frozen=True)
class ClusterAdapter:
    """A request's adapter as the registry has it (``lora_name`` as on ``LoRARequest``)."""

    entry: dict[str, Any]

    @property
    def lora_name(self) -> str:
        return self.entry["name"]

    @property
    def lora_int_id(self) -> int:
        return self.entry["lora_int_id"]

    @property
    def lora_path(self) -> str:
        return self.entry["path"]


def _lost(e: BaseException) -> bool:
    """The replica (or every replica) could not be reached: the request may go elsewhere."""
    return isinstance(e, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError))


def api_error(e: BaseException) -> APIError:
    """An error from an engine replica as the HTTP answer: the request's own fault is a 400,
    a lost replica or an engine that stopped a 503, anything else a 500; the message is the
    cause's (Ray's wrapper and remote traceback left out)."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, APIError):
        return cause
    if _lost(e) or _lost(cause):
        return APIError(503, f"the engine replica serving this request was lost ({cause})")
    if isinstance(cause, (EngineDeadError, BackPressureError)):
        return APIError(503, str(cause))
    if isinstance(cause, (ValueError, TypeError, LoraplexError, InvalidAdapterError)):
        return APIError(400, str(cause))
    return APIError(500, f"{type(cause).__name__}: {cause}")


class RemoteStream:
    """One request's outputs from an engine replica, as ``RequestStream``: ``async for``,
    ``close()`` (cancels it there, which aborts it). ``start()`` waits for the first output
    (so errors in the request are raised before anything is answered, and ``replica`` is
    known for the response header); a request whose replica is lost before that is sent
    again. A replica lost later ends the stream with a 503 ``APIError``."""

    def __init__(self, call: Callable[[], Any], on_close: Callable[[], None]):
        self._call, self._on_close = call, on_close
        self._gen: Any = None
        self._first: Any = None
        self.replica: str | None = None
        self.finished = False
        self._closed = False
        self._interrupt: BaseException | None = None

    def interrupt(self, error: BaseException) -> None:
        """Ends the stream with ``error`` (raised to its consumer), cancelling the request
        on its replica."""
        if not self._closed and not self.finished:
            self._interrupt = error
            if self._gen is not None:
                self._gen.cancel()

    async def start(self) -> None:
        for attempt in range(START_ATTEMPTS):
            self._gen = self._call()
            try:
                self.replica, self._first = await self._gen.__anext__()
                return
            except StopAsyncIteration:
                self.close()
                raise APIError(500, "the engine replica answered nothing") from None
            except Exception as e:  # noqa: BLE001 - each kind is answered by api_error
                if _lost(e) and attempt + 1 < START_ATTEMPTS:
                    continue
                self.close()
                raise api_error(e) from None
            except BaseException:  # cancelled (the client left): cancel it there too
                self.close()
                raise

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self):
        if self._first is not None:
            out, self._first = self._first, None
        else:
            if self._interrupt is not None:
                self.close()
                raise self._interrupt
            if self.finished or self._closed:
                raise StopAsyncIteration
            try:
                self.replica, out = await self._gen.__anext__()
            except StopAsyncIteration:
                self.close()
                if self._interrupt is not None:
                    raise self._interrupt from None
                raise
            except Exception as e:  # noqa: BLE001
                self.close()
                raise (self._interrupt or api_error(e)) from None
            if self._interrupt is not None:
                self.close()
                raise self._interrupt
        if out.finished:
            self.finished = True
            self.close()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gen is not None and not self.finished:
            self._gen.cancel()
        self._on_close()


class RayEngineClient(EngineClient):
    """The engine deployment's replicas (``engines``, a handle) behind the door; adapters
    are the cluster registry's."""

    def __init__(self, args: argparse.Namespace, engines: Any, registry: Any):
        engine_args = AsyncEngineArgs.from_cli_args(args)
        engine_args.verify()
        self.frontend = ModelFrontend.from_engine_args(engine_args)
        self.max_num_seqs = engine_args.max_num_seqs
        self.engines, self.registry = engines, registry
        self.in_flight: Counter[str] = Counter()  # adapter -> requests this ingress runs
        self.ready = False  # healthy once the startup adapters are loaded

    async def generate(self, request_id, prompt, params, adapter, priority=0, tenant=None):
        name = adapter.lora_name if adapter is not None else ""
        entry = adapter.entry if adapter is not None else None
        handle = self.engines.options(stream=True, multiplexed_model_id=name)
        self.in_flight[name] += 1

        def done() -> None:
            self.in_flight[name] -= 1

        def call():
            return handle.generate.remote(prompt, params, request_id, priority, entry, tenant)

        stream = RemoteStream(call, done)
        await stream.start()
        return stream

    async def resolve_adapter(self, name: str) -> ClusterAdapter | None:
        entry = await self.registry.resolve.remote(name)
        return None if entry is None else ClusterAdapter(entry)

    async def list_adapters(self) -> list[ClusterAdapter]:
        return [ClusterAdapter(e) for e in await self.registry.entries.remote()]

    async def load_adapter(self, name, path, inplace, lora_int_id):
        """Registers the adapter and loads it on the replica its requests will be routed
        to (through this ingress's router, which so learns where it is); refused
        cluster-wide if it clashes (400, naming the replica that refused)."""
        async with self._adapter_lock():
            old = await self.registry.resolve.remote(name)
            if old is not None and not inplace:
                raise APIError(
                    400, f"The lora adapter '{name}' has already been loaded.", "lora_name"
                )
            handle = self.engines.options(multiplexed_model_id=name)
            try:
                entry = await handle.load_adapter.remote(name, str(path), inplace, lora_int_id)
            except Exception as e:  # noqa: BLE001 - a lost replica, answered by kind
                raise api_error(e) from None
        if "error" in entry:
            raise APIError(
                400,
                f"cannot load adapter '{name}': {entry['error']}",
                "lora_path",
                {REPLICA_HEADER: entry["replica_id"]},
            )
        return ClusterAdapter(entry), entry["replica_id"]

    async def unload_adapter(self, name: str) -> None:
        """Refuses (409) while this ingress runs requests for it; otherwise unregisters it
        and waits (bounded) until every replica has reported since dropping it."""
        async with self._adapter_lock():
            if self.in_flight[name] > 0:
                raise APIError(
                    409,
                    f"adapter '{name}' is in use: {self.in_flight[name]} request(s) running",
                    "lora_name",
                )
            epoch = await self.registry.unregister.remote(name)
            if epoch is None:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while not await self.registry.released.remote(name, epoch):
            if time.monotonic() > deadline:  # a replica still finishing a request with it
                logger.warning("adapter %r is unregistered; a replica still holds it", name)
                return
            await asyncio.sleep(REPORT_PERIOD_S)

    async def check_health(self) -> None:
        if not self.ready:
            raise EngineDeadError("starting: the --lora-modules are not loaded yet")
        if not await self.registry.replicas.remote():
            raise EngineDeadError("no engine replica has reported to the cluster registry")

    async def stats(self) -> dict[str | None, dict[str, Any]]:
        return {r["replica_id"]: r for r in await self.registry.replicas.remote()}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress()
class LoraplexIngress:
    """The OpenAI routes in front of the engine replicas."""

    def __init__(self, engines: Any, args: argparse.Namespace):
        self.client = RayEngineClient(args, engines, cluster_registry())
        options = serve_options(args, self.client.frontend.folder)
        metrics = Metrics(options.base, self.client.frontend.max_model_len)
        self.ctx = ServingContext(self.client, options, metrics)
        self.args = args

    def __serve_build_asgi_app__(self):
        return BodyLimit(build_app(self.ctx, self.args), self.ctx.options.max_body_bytes)

    async def cut_streams_after(self, seconds: float) -> None:
        """At shutdown: the streams still open ``seconds`` from now are ended (an error
        event, then ``[DONE]``) before Serve stops this replica."""
        asyncio.get_running_loop().call_later(seconds, self.ctx.cut_all)

    async def load_modules(self, modules: list[tuple[str, str]]) -> str | None:
        """Loads ``--lora-modules`` (each on the replica its requests will go to); the
        first refusal, naming the adapter, or None."""
        for name, path in modules:
            try:
                await load_named(self.ctx, name, path, False, None, "startup")
            except APIError as e:
                return e.message
        self.client.ready = True
        return None


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's arguments among the command's, as keywords (for each replica)."""
    return dataclasses.asdict(AsyncEngineArgs.from_cli_args(args))


def cluster_app(args: argparse.Namespace, threads: int | None = None):
    """The application: the ingress bound to ``args.replicas`` engine replicas, each with
    ``threads`` torch threads."""
    engines = engine_deployment(
        engine_kwargs(args),
        num_replicas=args.replicas,
        lora_roots=args.lora_root,
        graceful_shutdown_timeout_s=args.shutdown_timeout,
        threads=threads,
    )
    ingress = LoraplexIngress.options(graceful_shutdown_timeout_s=args.shutdown_timeout)
    return ingress.bind(engines.bind(), args)


def run_cluster(args: argparse.Namespace) -> int:
    """Starts (or joins, ``--ray-address``) a Ray cluster, runs the app with Serve's HTTP
    proxy on ``--host:--port``, loads ``--lora-modules``, and serves until SIGTERM/SIGINT."""
    import ray

    setup_logging(args)
    check_args(args)
    if args.replicas < 1:
        raise SystemExit(f"loraplex serve: --replicas must be >= 1, got {args.replicas}")
    modules = parse_lora_modules(args.lora_modules)
    if modules and not args.enable_lora:
        raise SystemExit("loraplex serve: --lora-modules needs --enable-lora")
    args.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    args.lora_root = [str(Path(r).resolve()) for r in args.lora_root]
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        # replicas reserve no CPU (so any number can be placed), and Ray then gives such an
        # actor one thread; a CPU engine wants its share of the cluster's cores instead
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = max(1, cpus // args.replicas)
        ingress = serve.run(cluster_app(args, threads), name=APP_NAME, route_prefix="/")
        modules = [(name, str(Path(path).resolve())) for name, path in modules]
        why = ingress.load_modules.remote(modules).result()
        if why:  # a bad one stops the start, naming it
            raise SystemExit(f"loraplex serve: --lora-modules: {why}")
        gcs = ray.get_runtime_context().gcs_address
        print(
            f"loraplex: {args.replicas} replica(s) serving on http://{args.host}:{args.port} "
            f"(Ray cluster at {gcs})",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        # streams still open once the drain time is up end with an error event and [DONE]
        ingress.cut_streams_after.remote(max(0.0, args.shutdown_timeout - 1.0)).result()
    finally:
        try:
            serve.delete(APP_NAME)
            if args.ray_address is None:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
