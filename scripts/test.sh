#!/usr/bin/env bash
# The README's second command: set up, then run every check and test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh requirements-test.txt
venv="${LORAPLEX_VENV:-.venv}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

echo "== lint"
cargo fmt --check
cargo clippy --all-targets --features python --quiet -- -D warnings
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

echo "== cargo test"
cargo test --quiet

echo "== pytest (against the installed wheel)"
# The package lives under python/, not at the root, so the source tree cannot shadow the wheel.
"$venv/bin/python" -m pytest -q
