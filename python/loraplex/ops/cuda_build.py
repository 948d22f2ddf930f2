"""Builds the CUDA SGMV kernels (``loraplex/cuda``) as a torch extension.

Works without a GPU: with the toolkit from PyPI (``cuda-toolkit[nvcc,cccl]``) it sets
``CUDA_HOME`` to the venv's ``nvidia/cu13`` and puts a ``libcudart.so`` link on
``LIBRARY_PATH`` (the wheel ships only ``libcudart.so.13``). Explicit ``-gencode`` flags for
sm_80 and sm_90a keep torch from querying a GPU for its arch list.

    python -m loraplex.ops.cuda_build [build_dir]     # prints the .so path
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent.parent / "cuda"
SOURCES = ["ops.cpp", "sgmv_f32.cu", "sgmv_f16.cu", "sgmv_bf16.cu"]
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")
NAME = "loraplex_sgmv"


def toolkit_home() -> Path | None:
    """CUDA_HOME if set, else the PyPI toolkit in this environment, else the toolkit of the
    ``nvcc`` on PATH (a CUDA machine's own), else None."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    try:
        import nvidia

        for root in map(Path, nvidia.__path__):
            if (root / "cu13" / "bin" / "nvcc").is_file():
                return root / "cu13"
    except ImportError:
        pass
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def _prepare_env(home: Path) -> None:
    os.environ["CUDA_HOME"] = str(home)
    lib = home / "lib"
    if not (lib / "libcudart.so").exists():
        links = Path(tempfile.mkdtemp(prefix="loraplex-cudart-"))
        target = next(iter(sorted(lib.glob("libcudart.so.*"))), None)
        if target is not None:
            (links / "libcudart.so").symlink_to(target)
            lib = links
    paths = [str(lib), os.environ.get("LIBRARY_PATH", "")]
    os.environ["LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    # nvcc, and ninja from this environment's bin
    bins = [str(home / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    os.environ["PATH"] = os.pathsep.join(bins)


def build(build_dir: str | Path | None = None, verbose: bool = False) -> Path:
    """Compiles (or reuses) the extension; returns the shared library's path. Warnings in
    the kernels are errors; ``-Xptxas -v`` prints registers, shared memory and spills."""
    home = toolkit_home()
    if home is None:
        raise RuntimeError(
            "no CUDA toolkit: set CUDA_HOME or pip install 'cuda-toolkit[nvcc,cccl]'"
        )
    _prepare_env(home)
    from torch.utils import cpp_extension

    # read from the environment when first imported, which may have been before _prepare_env
    # (the CPU extension's build imports it too)
    cpp_extension.CUDA_HOME = str(home)

    build_dir = Path(build_dir or tempfile.mkdtemp(prefix="loraplex-cuda-"))
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=NAME,
        sources=[str(CUDA_DIR / s) for s in SOURCES],
        extra_cflags=["-O3", "-Wall", "-Werror"],
        extra_cuda_cflags=["-O3", *ARCHS, "--Werror", "all-warnings", "-Xptxas", "-v"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return build_dir / f"{NAME}.so"


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None, verbose=True))
