"""The CUDA kernels: they must compile for sm_80 and sm_90a wherever a CUDA toolkit is
installed (CI installs the PyPI one), and match the float64 reference on a GPU."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from hypothesis import given, settings

from loraplex.ops import cuda_build, reference
from test_ops import check, make, problems

no_toolkit = pytest.mark.skipif(
    cuda_build.toolkit_home() is None,
    reason="no CUDA toolkit (pip install 'cuda-toolkit[nvcc,cccl]')",
)
no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return cuda_build.build(tmp_path_factory.mktemp("cuda"))


@no_toolkit
def test_kernels_compile_for_sm80_and_sm90a(built):
    assert built.is_file()
    cuobjdump = cuda_build.toolkit_home() / "bin" / "cuobjdump"
    listing = subprocess.run(
        [str(cuobjdump), "--list-elf", str(built)], capture_output=True, text=True, check=True
    ).stdout
    arches = set(re.findall(r"\.(sm_\w+)\.cubin", listing))
    assert arches == {"sm_80", "sm_90a"}, listing
    torch.ops.load_library(str(built))
    for name in ("sgmv_shrink", "sgmv_expand"):
        args = getattr(torch.ops.loraplex, name).default._schema.arguments
        written = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
        assert written == ["out"], (name, written)


@no_gpu
@settings(max_examples=40)
@given(problems())
def test_cuda_kernels_match_reference(problem):
    from loraplex.ops import cuda

    assert cuda.available()
    x, a, b, segments, total = make(problem)
    dtype, rank = x.dtype, a.shape[1]
    y_ref = torch.empty(total, rank, dtype=dtype)
    reference.sgmv_shrink(x, a, segments, y_ref)
    y = torch.empty(total, rank, dtype=dtype, device="cuda")
    cuda.sgmv_shrink(x.cuda(), a.cuda(), segments, y)
    check(y.cpu(), y_ref, dtype)
    base = torch.randn(total, b.shape[1] + 5).to(dtype)
    out_ref, out = base.clone(), base.cuda()
    reference.sgmv_expand(y_ref, b, segments, out_ref, 5)
    cuda.sgmv_expand(y_ref.cuda(), b.cuda(), segments, out, 5)
    check(out.cpu(), out_ref, dtype)  # the same dtype-keyed tolerances as the CPU path


@no_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_expand_stages_ranks_beyond_shared_memory(dtype):
    """k * max_lora_rank above the 512 columns staged at a time (e.g. q/k/v at rank 256)."""
    from loraplex.ops import cuda

    assert cuda.available()
    problem = (64, 300, 768, 2, [5, 0, 9, 17], [1, -1, 0, 1], dtype, 7)
    x, a, b, segments, total = make(problem)
    y = torch.empty(total, 768, dtype=dtype)
    reference.sgmv_shrink(x, a, segments, y)
    base = torch.randn(total, b.shape[1]).to(dtype)
    out_ref, out = base.clone(), base.cuda()
    reference.sgmv_expand(y, b, segments, out_ref)
    cuda.sgmv_expand(y.cuda(), b.cuda(), segments, out)
    check(out.cpu(), out_ref, dtype)
