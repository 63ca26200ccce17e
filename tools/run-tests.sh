#!/usr/bin/env bash
# run-tests.sh -- the README's test command: install deps, build, run every test with ctest.
# GPU tests (label gpu) skip cleanly on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh --tests
bash tools/build.sh "$@"
# The PyTorch reference test must run, not skip, when this script installed torch.
export BMOE_REQUIRE_TORCH=1
ctest --test-dir build --output-on-failure -j "${BMOE_TEST_JOBS:-2}"
