#!/usr/bin/env bash
# run_bench.sh -- bmoe CPU training throughput vs PyTorch eager on the same model (~2-3 min, 2 cores).
#
#   bash bench/run_bench.sh                 # build bench_train into ./build, run both, print a table
#   BENCH_STEPS=16 TORCH_STEPS=8 BMOE_BUILD_DIR=build bash bench/run_bench.sh   # the defaults
#
# Both sides train the default comparison model (vocab 256, seq 256, batch 8, d 256, 4 layers,
# 4 heads, 8 experts top-2, expert hidden 512, SwiGLU/RMSNorm/RoPE, untied) with AdamW on random
# tokens. "% peak" is model FLOP/s over the best sgemm FLOP/s measured by bench_train on this
# machine. OpenBLAS honours OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE; their values are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${BMOE_PYTHON:-/usr/bin/python3}"
[[ -x "$PY" ]] || PY=python3

BUILD="${BMOE_BUILD_DIR:-build}"

if [[ ! -f "$BUILD/build.ninja" && ! -f "$BUILD/Makefile" ]]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$BUILD" -j "${BMOE_JOBS:-2}" --target bench_train >/dev/null

echo "== environment: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-(unset)}" \
     "OMP_NUM_THREADS=${OMP_NUM_THREADS:-(unset)} nproc=$(nproc)"
echo "== bmoe (C++ CPU backend)"
bmoe_out="$("$BUILD/bench/bench_train" --steps "${BENCH_STEPS:-16}" --warmup 2)"
echo "$bmoe_out" | grep -v '^JSON '
echo "== PyTorch eager (tools/bmoe_torch.py)"
# the same OpenBLAS kernels for both: bench_train may have replaced OpenBLAS's generic fallback
# (model/cpu_threads.h), and Debian's torch runs its GEMMs on the same OpenBLAS
core="$(echo "$bmoe_out" | sed -n 's/^JSON .*"openblas_core": "\([A-Za-z0-9]*\)".*/\1/p')"
torch_out="$(OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$core}" "$PY" bench/torch_bench.py --steps "${TORCH_STEPS:-8}" \
  --warmup 1 --threads 1,2)"
echo "$torch_out" | grep -v '^JSON '

BMOE_JSON="$(echo "$bmoe_out" | sed -n 's/^JSON //p')" TORCH_JSON="$(echo "$torch_out" | sed -n 's/^JSON //p')" \
"$PY" - <<'EOF'
import json, os
b = json.loads(os.environ["BMOE_JSON"])
t = json.loads(os.environ["TORCH_JSON"])
peak = b["sgemm_flops"]
print()
print(f"sgemm peak: {peak / 1e9:.1f} GFLOP/s ({b['threads']} threads, OpenBLAS core {b['openblas_core']}, "
      f"OPENBLAS_CORETYPE={b['openblas_coretype']}, OPENBLAS_L2_SIZE={b['openblas_l2_size']})")
print(f"{'impl':<22}{'threads':>8}{'tokens/s':>12}{'GFLOP/s':>10}{'% peak':>9}{'peak RSS MiB':>14}")
for name, r in (("bmoe cpu", b), ("torch eager " + t["torch_version"], t)):
    print(f"{name:<22}{r['threads']:>8}{r['tokens_per_s']:>12.0f}{r['model_flops'] / 1e9:>10.1f}"
          f"{100 * r['model_flops'] / peak:>8.1f}%{r['peak_rss_mib']:>14.0f}")
print(f"ratio bmoe / torch tokens/s: {b['tokens_per_s'] / t['tokens_per_s']:.2f}x   "
      f"(torch per thread count: {', '.join(f'{k}: {v:.0f}' for k, v in t['tokens_per_s_by_threads'].items())} "
      f"tokens/s, OMP_WAIT_POLICY={t['omp_wait_policy']})")
EOF
