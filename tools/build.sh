#!/usr/bin/env bash
# build.sh -- configure and build bmoe into ./build (Release, Ninja). Extra args go to CMake,
# e.g. bash tools/build.sh -DBMOE_CUDA=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${BMOE_JOBS:-$(nproc)}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j "$jobs"
