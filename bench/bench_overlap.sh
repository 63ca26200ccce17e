#!/usr/bin/env bash
# bench_overlap.sh -- gradient all-reduce overlapped with backward vs after it: tokens/s and the
# time a step still waits for gradient sums after backward, for 2 and 4 ranks (ep 1: every
# gradient is all-reduced over the world, the largest reduction volume), same config as bench_ep.sh.
# On a 2-core box the ranks share the cores: read the wait column, not the speedup.
#   bash bench/bench_overlap.sh            # uses ./build (tools/build.sh builds it); STEPS=20
set -euo pipefail
# shellcheck source=bench/mpi_bench_env.sh
source "$(dirname "$0")/mpi_bench_env.sh"
steps="${STEPS:-20}"
args=("${model_args[@]}" --train.steps="$steps" --train.log_every="$steps" --parallel.ep=1)
printf "%-6s %-8s %10s %14s %8s\n" ranks overlap "tokens/s" "grad wait ms" "wait %"
for np in 2 4; do
  threads=$(( $(nproc) / np )); (( threads < 1 )) && threads=1
  for overlap in false true; do
    out="$(mktemp -d)"
    OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE mpirun -np $np $bin train "${args[@]}" \
      --parallel.overlap_grad_reduce=$overlap --train.out_dir="$out" >/dev/null
    /usr/bin/python3 - "$out/metrics.jsonl" "$np" "$overlap" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][3:]  # skip warm-up steps
step = sum(r["step_s"] for r in rows)
wait = sum(r["grad_sync_s"] for r in rows)
print(f"{sys.argv[2]:<6} {sys.argv[3]:<8} {8 * 256 * len(rows) / step:10.0f} {1000 * wait / len(rows):14.1f} "
      f"{100 * wait / step:7.1f}%")
PY
    rm -rf "$out"
  done
done
