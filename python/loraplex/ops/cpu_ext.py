"""The C++ CPU ops (``loraplex/csrc/cpu_ops.cpp``):

- ``lora_apply``: a merged projection's LoRA shrink and expand for every segment in one call,
  short segments in parallel (at::parallel_for) with AVX2 kernels, long ones through ATen's
  BLAS, reading only the diagonal blocks of a merged B (block diagonal, or packed: the
  modules' B^T side by side in R rows, as the host tier holds them);
- ``paged_decode_attention``: decode attention reading keys and values from the paged cache
  where they lie (the torch path gathers copies of them for every layer).

Built as a torch extension with the machine's C++ compiler on first use (~10 s; setup.sh does
it ahead), cached per torch version. float32 on AVX2 CPUs; elsewhere, or if it cannot be
built (one warning), the torch path (``ops.cpu``) serves. ``LORAPLEX_CPU_KERNELS=torch``
forces the torch paths.

    python -m loraplex.ops.cpu_ext [build_dir]     # builds; prints the .so path
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path

import torch

from loraplex.ops._library import load_or_warn

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_ops.cpp"
NAME = "loraplex_cpu"
MAX_ROWS = 1024  # k * max_lora_rank: the kernel's per-token buffer
_lock = threading.Lock()
_state: dict[str, bool] = {}


def supported_cpu() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(build_dir: str | Path | None = None, verbose: bool = False) -> Path:
    """Compiles (or reuses) the extension; returns the shared library's path."""
    from torch.utils.cpp_extension import load

    # ninja from this environment's bin
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    build_dir = Path(build_dir or tempfile.mkdtemp(prefix="loraplex-cpu-"))
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name=NAME,
        sources=[str(SOURCE)],
        # -fopenmp: at::parallel_for is a header template over OpenMP (torch's backend here);
        # compiled without it, it runs serially
        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-Wall", "-Werror"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return build_dir / f"{NAME}.so"


def cache_dir() -> Path:
    root = Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))
    return root / f"cpu-torch{torch.__version__}"


def enabled() -> bool:
    """False when ``LORAPLEX_CPU_KERNELS=torch`` asks for the plain torch paths (no C++ ops,
    no oneDNN-packed weights)."""
    return os.environ.get("LORAPLEX_CPU_KERNELS", "").lower() != "torch"


def available() -> bool:
    """Whether the ops are loaded (building them on first call); False when not
    :func:`enabled`, on a CPU without AVX2, or when the build fails."""
    if not enabled():
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = supported_cpu() and _load()
    return _state["ok"]


def _load() -> bool:
    return load_or_warn(lambda: build(cache_dir()), "C++ CPU LoRA kernels", "the torch path serves")


def segment_table(segments) -> torch.Tensor:
    """``[(start, length, slot), ...]`` as the op's int64 ``[n, 3]`` table."""
    return torch.tensor(segments, dtype=torch.long).reshape(-1, 3)


def lora_apply(x, a, bt, segments: torch.Tensor, out, splits: list[int]) -> None:
    """``out[seg, splits[i]:splits[i+1]] += (x[seg] @ a[slot, iR:(i+1)R]^T) @
    bt[slot, iR:(i+1)R, splits[i]:splits[i+1]]`` for each segment with slot >= 0 and each of
    the k = len(splits) - 1 modules (R = a.shape[1] / k). x [T, in], a [S, kR, in],
    bt [S, kR, O] (or packed, [S, R, O]: module i's block in rows 0..R), out [T, O],
    float32; ``segments`` from :func:`segment_table`, rows disjoint."""
    torch.ops.loraplex_cpu.lora_apply(x, a, bt, segments, out, splits)


def set_wide(on: bool) -> bool:
    """Turns the AVX-512 LoRA kernels on (the default where the CPU has them) or off, for
    every later call; returns whether they are on (never where the CPU lacks them)."""
    return torch.ops.loraplex_cpu.set_wide(on)


def paged_decode_attention(q, k_cache, v_cache, slots, rows, key_start, key_end, out) -> None:
    """For each decode sequence b: ``out[rows[b], h] = softmax(q[rows[b], h] . K^T / sqrt(D))
    @ V`` over the keys ``key_start[b]..key_end[b]`` of cache slots ``slots[b]``, query head h
    reading KV head ``h // (H / Hkv)``. q, out [T, H, D]; caches [N, Hkv, D]; float32."""
    scale = q.shape[-1] ** -0.5
    torch.ops.loraplex_cpu.paged_decode_attention(
        q, k_cache, v_cache, slots, rows, key_start, key_end, scale, out
    )


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else cache_dir(), verbose=True))
