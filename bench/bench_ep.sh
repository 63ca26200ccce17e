#!/usr/bin/env bash
# bench_ep.sh -- expert-parallel overhead on this machine: tokens/s, share of the step spent in the
# token all-to-alls, and bytes exchanged per step against the minimum (one row per token and
# destination rank), for 1, 2 and 4 ranks with ep = ranks. On a 2-core box 4 ranks oversubscribe
# the cores: read the numbers as overhead, not speedup.
#   bash bench/bench_ep.sh            # uses ./build (tools/build.sh builds it); STEPS=20
set -euo pipefail
# shellcheck source=bench/mpi_bench_env.sh
source "$(dirname "$0")/mpi_bench_env.sh"
steps="${STEPS:-20}"
args=("${model_args[@]}" --train.steps="$steps" --train.log_every="$steps")
printf "%-6s %10s %9s %16s %16s %7s\n" ranks "tokens/s" "a2a %" "bytes/step" "min bytes/step" "ratio"
for np in 1 2 4; do
  out="$(mktemp -d)"
  threads=$(( $(nproc) / np )); (( threads < 1 )) && threads=1
  if [[ $np == 1 ]]; then
    OMP_NUM_THREADS=$threads $bin train "${args[@]}" --train.out_dir="$out" >/dev/null
  else
    OMP_NUM_THREADS=$threads mpirun -np $np $bin train "${args[@]}" --train.out_dir="$out" >/dev/null
  fi
  # skip the first 3 steps (warm-up), average the rest
  /usr/bin/python3 - "$out/metrics.jsonl" "$np" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][3:]
tok = 8 * 256 * len(rows) / sum(r["step_s"] for r in rows)  # global batch 8 x 256 tokens
a2a = 100 * sum(r["exchange_s"] for r in rows) / sum(r["step_s"] for r in rows)
b = sum(r["exchange_bytes"] for r in rows) / len(rows)
m = sum(r["exchange_min_bytes"] for r in rows) / len(rows)
print(f"{sys.argv[2]:<6} {tok:10.0f} {a2a:8.1f}% {b:16.0f} {m:16.0f} {b / m if m else float('nan'):7.2f}")
PY
done
