#!/usr/bin/env bash
# Sets up a fresh machine for loraplex: a virtual environment in .venv with the pinned Python
# packages (requirements.txt, or the file named by $1), the Rust core built into a wheel by
# maturin, and that wheel installed (not an editable tree). Run by demo.sh and test.sh; safe
# to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
venv="${LORAPLEX_VENV:-.venv}"
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
    exit 1
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# pip caches downloads in ~/.cache/pip, outside the clone; nothing depends on it being warm.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "${1:-requirements.txt}"

rm -rf dist
"$venv/bin/maturin" build --release --out dist --quiet
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps dist/loraplex-*.whl
# The C++ CPU LoRA kernels, compiled now (~10 s) rather than inside the first engine; cached in
# ~/.cache/loraplex. Without a C++ compiler the engine runs its torch path instead.
"$venv/bin/python" -m loraplex.ops.cpu_ext >/dev/null ||
    echo "setup: the C++ CPU LoRA kernels did not build; LoRA runs on the torch path" >&2
