"""The engine core in a process of its own, as vLLM V1 runs it (``EngineCoreProc`` beside
an ``MPClient``): the server's event loop and the engine's step loop then share no GIL, so
HTTP work (a probe polling ``/health``, many streams, request parsing) does not stall the
step between two kernels. ``CoreClient`` is the server's side; ``run_core`` the child's.

The wire is one ``multiprocessing`` pipe of pickled tuples:

- server to core: ``("call", call_id, method, args, kwargs)`` (``call_id`` None: no reply
  wanted) and ``("stop",)``;
- core to server: ``("ready", info)`` or ``("failed", error)`` once, then ``("reply", call_id,
  ok, value)``, ``("outputs", [RequestOutput, ...])`` (one message a step) and ``("dead",
  message)`` when the step loop fails.

The core's input thread answers calls as they come, between or during steps (the engine's
methods are safe beside ``step``, as for ``AsyncLLM``); work that grows with the request or
blocks (an adapter's read, tokenizing, a grammar's compile) runs on a small pool there, so
neither the step loop nor other calls wait for it."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
from typing import Any

from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.async_llm import (
    EngineDeadError,
    RequestStream,
    _Stream,
    dispatch,
    submission_grows,
)
from loraplex.engine.llm_engine import LLMEngine, ModelFrontend
from loraplex.gc_utils import freeze_startup_heap

logger = logging.getLogger("loraplex.engine")

#: the calls answered on the core's input thread (``add_request`` too, unless it grows)
QUICK = frozenset(
    {"abort_request", "remove_lora", "lora_by_name", "registered_loras", "get_stats"}
    | {"reset_prefix_cache", "add_request"}
)
#: calls that read files or grow with their input: run on the core's pool
SLOW = frozenset({"add_lora", "pin_lora"})
STOP_WAIT_S = 30.0  # how long shutdown waits for the core to finish its step and exit


def enabled() -> bool:
    """vLLM's switch, ``VLLM_ENABLE_V1_MULTIPROCESSING`` (default on): the server runs its
    engine in a process of its own."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip().lower() not in {
        "0",
        "false",
        "no",
        "off",
    }


def portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling, else the nearest built-in kind with its message (a
    reply that cannot be read would end the server's reader)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any failure to round-trip
        kind = next(
            (k for k in type(e).__mro__ if k.__module__ == "builtins" and k is not object),
            RuntimeError,
        )
        try:
            return kind(str(e))
        except Exception:  # noqa: BLE001
            return RuntimeError(f"{type(e).__name__}: {e}")


# -- the core's process --


def run_core(engine_args: EngineArgs, conn: Any, log_level: int) -> None:
    """The child's main: builds the engine, then serves calls and steps until told to stop
    or until the server's end of the pipe closes (the server died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server stops us; its exit closes the pipe
    root = logging.getLogger("loraplex")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        root.addHandler(handler)
    root.setLevel(log_level)
    try:
        from loraplex.plugins import load_general_plugins

        load_general_plugins()  # in every process, as vLLM
        engine = LLMEngine(engine_args)
    except BaseException as e:  # noqa: BLE001 - the server re-raises it
        conn.send(("failed", portable(e)))
        return
    freeze_startup_heap("engine core")
    _Core(engine, conn).serve()


class _Core:
    def __init__(self, engine: LLMEngine, conn: Any):
        self.engine, self.conn = engine, conn
        self.send_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = False
        self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="lp-core")

    def send(self, msg: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(msg)
        except (OSError, EOFError):  # the server is gone
            self.stopped = True
            self.wake.set()

    def serve(self) -> None:
        self.send(("ready", {"max_num_seqs": self.engine.args.max_num_seqs}))
        threading.Thread(target=self.read, name="loraplex-core-input", daemon=True).start()
        try:
            self.step_loop()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            if self.engine.lora is not None:
                self.engine.lora.close()

    def step_loop(self) -> None:
        engine = self.engine
        try:
            while not self.stopped:
                self.wake.wait()
                self.wake.clear()  # before looking for work: a later call sets it again
                while not self.stopped and engine.has_unfinished_requests():
                    outputs = engine.step()
                    if outputs:
                        self.send(("outputs", outputs))
        except BaseException as e:  # noqa: BLE001 - every stream must hear of it
            self.send(("dead", f"{type(e).__name__}: {e}"))

    def read(self) -> None:
        try:
            while not self.stopped:
                msg = self.conn.recv()
                if msg[0] == "stop":
                    break
                _, call_id, method, args, kwargs = msg
                slow = method in SLOW or (
                    method == "add_request"
                    and submission_grows(self.engine, args[1], args[2], args[4])
                )
                if slow:
                    self.pool.submit(self.call, call_id, method, args, kwargs)
                else:
                    self.call(call_id, method, args, kwargs)
        except (EOFError, OSError):
            pass  # the server closed its end
        finally:
            self.stopped = True
            self.wake.set()

    def call(self, call_id: int | None, method: str, args: tuple, kwargs: dict) -> None:
        try:
            if method not in QUICK and method not in SLOW:
                raise AttributeError(f"the engine core has no call {method!r}")
            reply = ("reply", call_id, True, getattr(self.engine, method)(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - the caller's to raise
            reply = ("reply", call_id, False, portable(e))
        if method in ("add_request", "abort_request"):
            self.wake.set()
        if call_id is not None:
            try:
                self.send(reply)
            except Exception as e:  # noqa: BLE001 - an answer that cannot be pickled
                self.send(("reply", call_id, False, RuntimeError(f"{method}: {e}")))


# -- the server's side --


class CoreClient:
    """The engine of a child process, as the door uses it: ``add_request`` gives the same
    ``RequestStream`` as ``AsyncLLM``'s (closing it early aborts the request), the adapter
    and state calls are awaited replies. ``frontend`` is built here from the same arguments
    (the tokenizer and templates the door needs, without the weights)."""

    def __init__(self, engine_args: EngineArgs):
        ctx = multiprocessing.get_context("spawn")  # fork after torch's threads is unsafe
        self._conn, child = ctx.Pipe()
        level = logging.getLogger("loraplex").getEffectiveLevel()
        self.proc = ctx.Process(
            target=run_core, args=(engine_args, child, level), name="loraplex-engine-core"
        )
        self.proc.start()
        child.close()  # ours closed: the child's exit is an EOF here
        self._stopped = False
        atexit.register(self.shutdown)
        try:
            self.frontend = ModelFrontend.from_engine_args(engine_args)
            msg = self._conn.recv()
        except EOFError:
            self.shutdown()
            code = self.proc.exitcode
            raise RuntimeError(f"the engine process exited (code {code}) as it started") from None
        except BaseException:
            self.shutdown()
            raise
        if msg[0] != "ready":
            self.shutdown()
            raise msg[1]
        self.max_num_seqs = msg[1]["max_num_seqs"]
        self.dead_error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name="loraplex-core-output", daemon=True).start()
        threading.Thread(target=self._write, name="loraplex-core-send", daemon=True).start()

    # -- threads --

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._conn.send(msg)
            except (OSError, EOFError, ValueError):
                self._die("the engine process is gone")
                return

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "outputs":
                    dispatch(msg[1], self._streams, self._lock)
                elif msg[0] == "reply":
                    with self._lock:
                        fut = self._calls.pop(msg[1], None)
                    if fut is not None and not fut.done():
                        if msg[2]:
                            fut.set_result(msg[3])
                        else:
                            fut.set_exception(msg[3])
                elif msg[0] == "dead":
                    self._die(f"the engine loop failed: {msg[1]}")
                    return
        except (EOFError, OSError):
            pass
        self._die(f"the engine process exited (code {self.proc.exitcode})")

    def _die(self, message: str) -> None:
        with self._lock:
            if self.dead_error is not None:
                return
            if self._stopped:
                message = "the engine was shut down"
            self.dead_error = EngineDeadError(message)
            streams, calls = list(self._streams.values()), list(self._calls.values())
            self._streams.clear()
            self._calls.clear()
        for stream in streams:
            stream.put(EngineDeadError(message))
        for fut in calls:
            if not fut.done():
                fut.set_exception(EngineDeadError(message))

    # -- calls --

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if self._stopped:
            raise EngineDeadError("the engine was shut down")

    def _send(self, method: str, *args: Any, reply: bool = True, **kwargs: Any):
        fut = None
        call_id = None
        if reply:
            fut = concurrent.futures.Future()
            with self._lock:
                self._check_alive()
                call_id = next(self._ids)
                self._calls[call_id] = fut
        self._outbox.put(("call", call_id, method, args, kwargs))
        return fut

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The core engine's ``method(*args, **kwargs)``, awaited."""
        return await asyncio.wrap_future(self._send(method, *args, **kwargs))

    async def add_request(
        self, request_id, prompt, params, *, lora_request=None, priority=0, tenant=None
    ) -> RequestStream:
        """As ``AsyncLLM.add_request``: the stream once the core has queued the request
        (its refusal raised here)."""
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            self._check_alive()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        args = (request_id, prompt, params, None, lora_request, None, None, priority)
        try:
            await self.call("add_request", *args, tenant=tenant)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return RequestStream(self, request_id, stream)

    def _release(self, request_id: str, finished: bool) -> None:
        """A stream closed (``RequestStream.close``): before its end, the request is
        aborted in the core."""
        with self._lock:
            self._streams.pop(request_id, None)
        if not finished and self.dead_error is None and not self._stopped:
            self._send("abort_request", request_id, reply=False)

    async def add_lora(self, lora_request: Any) -> bool:
        return await self.call("add_lora", lora_request)

    async def remove_lora(self, lora_id: int) -> bool:
        return await self.call("remove_lora", lora_id)

    async def check_health(self) -> None:
        self._check_alive()
        if not self.proc.is_alive():
            raise EngineDeadError(f"the engine process exited (code {self.proc.exitcode})")

    def shutdown(self) -> None:
        """Stops the core after the step it is in, and waits for its process (killed if it
        does not end within ``STOP_WAIT_S``)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        outbox = getattr(self, "_outbox", None)
        if outbox is not None:
            outbox.put(("stop",))
            outbox.put(None)
        else:
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
        self.proc.join(STOP_WAIT_S)
        if self.proc.is_alive():
            logger.warning("the engine process did not stop in %.0f s: killed", STOP_WAIT_S)
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()
