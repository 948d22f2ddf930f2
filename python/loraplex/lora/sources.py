"""Where an adapter's files come from, and the root nothing is read outside of.

A ``LoRARequest``'s path is one of:

- a local folder. Its root is the deepest configured root (``EngineArgs.lora_root``, the
  server's ``--lora-root``) that holds it; else, for a folder of Hugging Face's cache
  (``models--org--name/snapshots/<rev>``), that repo's cache folder (the snapshot's files are
  links into its ``blobs``); else the folder itself;
- an object-store URL (``s3://``, ``gs://``, ``az://``, ``abfs(s)://``, ``http(s)://``),
  fetched with obstore into a local content-addressed cache (its size bounded); the
  content's digest is the adapter's version, and its cache entry its root;
- a hub repo id, ``org/name`` or ``org/name@revision`` (``hf://`` in front is allowed),
  through ``huggingface_hub``'s cache (``HF_HUB_OFFLINE`` honoured): the repo's cache
  folder is its root, the commit its version.

Every file is then opened beneath its root afresh at each read (``_core.open_beneath``:
``openat2`` with ``RESOLVE_BENEATH``, or the equivalent walk), so a folder swapped for a link
out after a first read is refused at the next one.

Why obstore for object stores: one wheel with no Python dependencies (the Rust
``object_store`` crate inside) covers S3, GCS, Azure and HTTP with one API, streams objects
in chunks we can bound, and reads each store's usual environment (``AWS_*``,
``GOOGLE_*``, ``AZURE_*``); fsspec needs a further package per store (s3fs pulls aiobotocore
and botocore at pinned versions of each other; gcsfs, google-auth and more).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loraplex._core import LoRARequest, open_beneath

OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DEFAULT_CACHE_BYTES = 16 << 30
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


@dataclass(frozen=True)
class Location:
    """An adapter's folder ``folder`` (relative; ``"."`` is the root itself) beneath ``root``.
    ``version``: the content digest (object stores) or commit (hub); None for a local folder,
    whose version is the core's key for each read."""

    root: str
    folder: str
    source: str  # "local", "hub", or the URL's scheme
    version: str | None = None

    def rel(self, name: str) -> str:
        return name if self.folder == "." else f"{self.folder}/{name}"


class RefusedFile(Exception):
    """A file beneath a root that may not be read; the message says why (after its name).
    ``at_open``: the path itself was refused (it leads out of the root), not the file."""

    def __init__(self, message: str, at_open: bool = False):
        super().__init__(message)
        self.at_open = at_open


def open_regular(root: str, rel: str, limit: int, walk: bool = False) -> BinaryIO:
    """``rel`` beneath ``root`` opened as untrusted input: never following a link out of
    the root, without blocking (a FIFO answers at once), refused unless a regular file of
    at most ``limit`` bytes (``fstat`` on the handle that is then read, so the file checked
    is the file read). ``FileNotFoundError`` if it is not there."""
    try:
        fd = open_beneath(root, rel, walk)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RefusedFile(f"is refused: {e.strerror}", at_open=True) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFile("is not a regular file")
        if info.st_size > limit:
            raise RefusedFile(f"is {info.st_size} bytes, over the {limit}-byte bound")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def source_of(path: str) -> str:
    """ "local", "hub" or an object store's scheme, for ``path`` as written (nothing read)."""
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    if scheme in OBJECT_STORE_SCHEMES:
        return scheme
    if scheme == "hf":
        return "hub"
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) or local.exists():
        return "local"
    return "hub" if _HUB_ID.match(path) else "local"


SOURCE_KINDS = ("local", "hub", "s3", "gs", "az", "http")
_KIND = {"s3a": "s3", "azure": "az", "abfs": "az", "abfss": "az", "adl": "az", "https": "http"}


def source_kind(path: str) -> str:
    """The kind of source ``path`` is, one of ``SOURCE_KINDS`` (the server's
    ``--lora-sources`` names these)."""
    source = source_of(path)
    return _KIND.get(source, source)


def local_location(path: str, roots: list[str]) -> Location:
    """The root a local adapter folder is read beneath (see the module's words)."""
    folder = os.path.abspath(os.path.expanduser(path))
    best = None
    for root in roots:
        if folder == root or folder.startswith(root.rstrip("/") + "/"):
            if best is None or len(root) > len(best):
                best = root
    if best is not None:
        return Location(best, os.path.relpath(folder, best), "local")
    parts = Path(folder).parts
    for i in range(len(parts) - 2, 0, -1):  # models--org--name/snapshots/<rev>[/sub...]
        if parts[i] == "snapshots" and "--" in parts[i - 1]:
            repo = str(Path(*parts[:i]))
            return Location(repo, os.path.relpath(folder, repo), "local")
    return Location(folder, ".", "local")


def hub_location(path: str) -> Location:
    """A hub repo's adapter files through ``huggingface_hub``'s cache (downloading only
    what an adapter needs; offline, the cache alone)."""
    from huggingface_hub import snapshot_download

    m = _HUB_ID.match(path)
    if m is None:
        raise ValueError(f"{path!r} is not a hub repo id (org/name or org/name@revision)")
    repo, revision = m.group(1), m.group(2)
    snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    return Location(str(snapshot.parent.parent), f"snapshots/{snapshot.name}", "hub", snapshot.name)


class ObjectStoreCache:
    """Adapters fetched from object stores, kept by content: ``<dir>/<digest>/`` holds one
    adapter's files, the digest (sha256 over each file's name and sha256) its version. The
    entries' total stays under ``max_bytes`` (least recently used go first); an object larger
    than the bound is refused before it is fetched; a fetch is written to a temporary folder
    and renamed in whole, so a reader never sees half an entry."""

    def __init__(self, directory: str | None, max_bytes: int = DEFAULT_CACHE_BYTES):
        base = directory or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loraplex"
        )
        self.dir = Path(base) / "adapters"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # entry moves and evictions (never held over a fetch)

    def fetch(self, url: str, limits: dict[str, int]) -> Location:
        import obstore
        from obstore.store import from_url

        store = from_url(url.rstrip("/"))
        listed = {m["path"]: m for batch in obstore.list(store) for m in batch}
        names = [n for n in ADAPTER_FILES if n in listed]
        if "adapter_config.json" not in names or len(names) < 2:
            raise FileNotFoundError(
                f"{url} holds no adapter (needs adapter_config.json and adapter_model.*); "
                f"found {sorted(listed)[:8]}"
            )
        total = 0
        for name in names:
            size = listed[name]["size"]
            limit = min(limits.get(name, self.max_bytes), self.max_bytes)
            if size > limit:
                raise ValueError(f"{name} is {size} bytes, over the {limit}-byte bound")
            total += size
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.dir))
        try:
            digests = {}
            for name in names:
                digests[name] = _download(obstore, store, name, tmp / name, listed[name]["size"])
            summary = json.dumps(sorted(digests.items())).encode()
            digest = hashlib.sha256(summary).hexdigest()
            with self._lock:
                entry = self.dir / digest
                if entry.exists():
                    os.utime(entry)
                else:
                    self._make_room(total)
                    os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Location(str(entry), ".", url.split("://", 1)[0].lower(), digest)

    def _make_room(self, incoming: int) -> None:
        entries = []
        for e in self.dir.iterdir():
            if e.name.startswith("."):
                continue
            size = sum(f.stat().st_size for f in e.iterdir() if f.is_file())
            entries.append((e.stat().st_mtime, size, e))
        used = sum(size for _, size, _ in entries)
        for _, size, e in sorted(entries):
            if used + incoming <= self.max_bytes:
                break
            shutil.rmtree(e, ignore_errors=True)
            used -= size


def _download(obstore, store, name: str, dest: Path, size: int) -> str:
    """One object streamed to ``dest``, never more than its listed size; its sha256."""
    h = hashlib.sha256()
    got = 0
    with open(dest, "wb") as f:
        for chunk in obstore.get(store, name).stream(min_chunk_size=1 << 20):
            got += len(chunk)
            if got > size:
                raise ValueError(f"{name} grew past its listed {size} bytes while fetched")
            h.update(chunk)
            f.write(chunk)
    if got != size:
        raise ValueError(f"{name} ended at {got} of its listed {size} bytes")
    return h.hexdigest()


def locate(
    request: LoRARequest, roots: list[str], cache: ObjectStoreCache, limits: dict[str, int]
) -> Location:
    """Where ``request``'s adapter files are read (fetching remote ones first)."""
    source = source_of(request.lora_path)
    if source == "local":
        return local_location(request.lora_path, roots)
    if source == "hub":
        return hub_location(request.lora_path)
    return cache.fetch(request.lora_path, limits)


def read_with_timeout(fn, timeout: float, what: str):
    """``fn()`` on a thread of its own, waited for at most ``timeout`` seconds: a read that
    hangs (a stalled network mount, a store that stops answering) becomes a ``TimeoutError``
    naming ``what``; its thread (a daemon) is left to end when the read does."""
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e
        finally:
            done.set()

    start = time.monotonic()
    threading.Thread(target=run, name="loraplex-read", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(
            f"reading {what} did not finish in {timeout:g} s (after "
            f"{time.monotonic() - start:.1f} s: a stalled mount or store?)"
        )
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]
