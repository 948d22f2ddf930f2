#!/usr/bin/env bash
# On a CUDA machine, in under 10 minutes: build the CUDA kernels, run the GPU tests, run the
# GPU benchmarks, and write a report (env, build, tests, benchmarks, summary) to REPORT_DIR
# (default: $OUT where set, else ./gpu-report).
#
#   bash scripts/gpu_check.sh [WHEEL]
#
# loraplex itself comes from WHEEL, else dist/loraplex-*.whl (`maturin build --release -o
# dist` on a machine with Rust: the wheel is abi3, any CPython >= 3.9), else the installed
# package. The machine's own torch, transformers, peft, pytest and hypothesis are used.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python3}"
report="${REPORT_DIR:-${OUT:-gpu-report}}"
mkdir -p "$report"
wheel="${1:-$(ls dist/loraplex-*.whl 2>/dev/null | head -n 1 || true)}"
if [ -n "$wheel" ]; then
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-deps --no-index --target "$site" "$wheel"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import torch, loraplex; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
    'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0)); \
    print('loraplex', loraplex.__file__)"
} 2>&1 | tee "$report/env.txt"

echo "== build the CUDA kernels (sm_80, sm_90a)"
"$py" -c "from loraplex.ops import cuda; assert cuda.available(), 'the kernels did not build'" \
  2>&1 | tee "$report/build.txt"

status=0
echo "== GPU tests"
# -W default: the machine's own package versions may warn where CI's pinned ones do not
timeout 300 "$py" -m pytest -q -p no:cacheprovider -W default tests/test_gpu.py tests/test_cuda.py \
  2>&1 | tee "$report/tests.txt" || status=1

echo "== GPU benchmarks"
timeout 330 "$py" benches/bench_gpu.py 2>&1 | tee "$report/bench.txt" || status=1

echo "gpu_check: tests and benchmarks $([ $status -eq 0 ] && echo passed || echo FAILED)" \
  | tee "$report/summary.txt"
exit $status
