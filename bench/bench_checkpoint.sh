#!/usr/bin/env bash
# bench_checkpoint.sh -- checkpoint save/load time and file size against the disk's plain sequential
# speed, for the default comparison model and a ~100M-parameter model, on 1, 2 and 4 MPI ranks
# (issue 5's benchmark; ~4 min on a 2-core machine).
#
#   bash bench/bench_checkpoint.sh                        # build bench_checkpoint into ./build, run, print a table
#   BMOE_BUILD_DIR=build-bench BENCH_RANKS="1 2 4" DEFAULT_REPS=5 BIG_REPS=3 bash bench/bench_checkpoint.sh
#
# Environment: BMOE_BUILD_DIR (default build), BENCH_CONFIGS ("default 100m"), BENCH_RANKS ("1 2 4";
# each must divide the 8 experts), DEFAULT_REPS (5), BIG_REPS (3, for 100m), BENCH_DIR (where the
# files go; default a fresh temp dir in $TMPDIR or /tmp, removed at the end), MPIEXEC (mpiexec).
# Every run is one `mpiexec -n R bench_checkpoint --config C --dir DIR --reps N`; ranks are
# oversubscribed on a small machine (4 ranks on 2 cores). Table figures are the best of the reps
# (the per-run lines above it also give medians); MB = 10^6 bytes, MB/s = file bytes / seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${BMOE_PYTHON:-/usr/bin/python3}"
[[ -x "$PY" ]] || PY=python3

BUILD="${BMOE_BUILD_DIR:-build}"
if [[ ! -f "$BUILD/build.ninja" && ! -f "$BUILD/Makefile" ]]; then
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$BUILD" -j "${BMOE_JOBS:-2}" --target bench_checkpoint >/dev/null
bin="$BUILD/bench/bench_checkpoint"

mpiexec="${MPIEXEC:-mpiexec}"
command -v "$mpiexec" >/dev/null || { echo "bench_checkpoint.sh: $mpiexec not found (install Open MPI)" >&2; exit 2; }
flags=()
cores="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it honours OMP_NUM_THREADS
if "$mpiexec" --version 2>/dev/null | grep -Eq "Open MPI|OpenRTE"; then  # the settings of launch/run_local.sh
  flags+=(--oversubscribe)
  [[ "$(id -u)" -eq 0 ]] && flags+=(--allow-run-as-root)
  export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
  if ! command -v ssh >/dev/null && ! command -v rsh >/dev/null; then
    export OMPI_MCA_plm="${OMPI_MCA_plm:-isolated}"
  fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ -n "${BENCH_DIR:-}" ]]; then
  dir="$BENCH_DIR"
  mkdir -p "$dir"
else
  dir="$(mktemp -d "${TMPDIR:-/tmp}/bmoe_bench_ckpt.XXXXXX")"
  trap 'rm -rf "$dir"' EXIT  # also after a failed run (the program removes its own files otherwise)
fi

echo "== environment: cores=$cores $(free -g | awk '/^Mem:/ {print "mem=" $2 "GiB"}')" \
     "dir=$dir on $(df -PT "$dir" | awk 'NR == 2 {print $1 " (" $2 ")"}') $("$mpiexec" --version 2>/dev/null | head -1)"
json=""
for config in ${BENCH_CONFIGS:-default 100m}; do
  reps="${DEFAULT_REPS:-5}"
  [[ "$config" == "100m" ]] && reps="${BIG_REPS:-3}"
  for ranks in ${BENCH_RANKS:-1 2 4}; do
    echo "== $config, $ranks rank(s): $mpiexec -n $ranks ${flags[*]} $bin --config $config --dir $dir --reps $reps"
    out="$("$mpiexec" -n "$ranks" "${flags[@]}" "$bin" --config "$config" --dir "$dir" --reps "$reps")"
    echo "$out" | grep -v '^JSON '
    json+="$(echo "$out" | sed -n 's/^JSON //p')"$'\n'
  done
done

BENCH_JSON="$json" "$PY" - <<'EOF'
import json, os
rows = [json.loads(l) for l in os.environ["BENCH_JSON"].splitlines() if l.strip()]
print()
print("checkpoint = params + AdamW m + v (float32, HDF5); save = gather to rank 0 + write + fsync + verify + rename;")
print("load = cold (page cache dropped), every rank reads its slices; disk = rank 0 write(2) 4 MiB blocks + fsync / read")
print("back cold, same directory, same size. Best of the reps; MB = 10^6 bytes.")
hdr = (f"{'config':<8}{'params':>8}{'ranks':>6}{'file MB':>9}{'save s':>8}{'save MB/s':>10}{'load s':>8}"
       f"{'load MB/s':>10}{'disk wr MB/s':>13}{'disk rd MB/s':>13}{'save % wr':>10}{'load % rd':>10}{'warm load s':>12}")
print(hdr)
print("-" * len(hdr))
for r in rows:
    mb = r["file_bytes"] / 1e6
    save, load, warm = r["save_s_best"], r["load_cold_s_best"], r["load_warm_s_best"]
    dw, dr = mb / r["disk_write_s_best"], mb / r["disk_read_s_best"]
    print(f"{r['config']:<8}{r['params'] / 1e6:>7.1f}M{r['ranks']:>6}{mb:>9.1f}{save:>8.2f}{mb / save:>10.0f}{load:>8.2f}"
          f"{mb / load:>10.0f}{dw:>13.0f}{dr:>13.0f}{100 * (mb / save) / dw:>9.0f}%{100 * (mb / load) / dr:>9.0f}%"
          f"{warm:>12.2f}")
EOF
