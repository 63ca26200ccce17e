#!/usr/bin/env bash
# run_local.sh -- run bmoe as N MPI ranks on this machine (Open MPI's mpirun).
#
#   launch/run_local.sh -n 4 --config run.toml --train.steps=100   # = bmoe train ... on 4 ranks
#   launch/run_local.sh -n 2 train --parallel.ep=1 ...              # subcommand given explicitly
#
# Arguments after -n N go to bmoe; when the first of them is a flag, the subcommand is `train`.
# What it adds for this kind of machine (see docs/launch.md):
#   * --oversubscribe: allow more ranks than cores (a 2-core box can run -n 4);
#   * --allow-run-as-root when run as root (Open MPI refuses root otherwise);
#   * OMPI_MCA_btl_vader_single_copy_mechanism=none (containers often forbid the CMA copy path);
#   * OMPI_MCA_plm=isolated when there is no ssh/rsh (mpirun needs one even for local runs);
#   * OMP_WAIT_POLICY=PASSIVE when ranks x threads exceed the cores (no busy-waiting);
#   * OMP_NUM_THREADS = max(1, cores / N) unless already set, so ranks x threads ~ cores; with more
#     than one thread per rank the ranks are not pinned to single cores (--bind-to none).
# Environment: BMOE_BIN (default <repo>/build/launch/bmoe), MPIRUN (default mpirun),
# BMOE_MPIRUN_FLAGS (extra mpirun flags, split on spaces), OMP_NUM_THREADS.
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") -n N [SUBCOMMAND] [bmoe args...]
  -n N, -np N, --np N   number of MPI ranks (an integer >= 1)
  SUBCOMMAND            bmoe subcommand (default: train when the next argument is a flag)
  -h, --help            this help
example: $(basename "$0") -n 4 --config run.toml --train.steps=100
EOF
}
bad() { echo "run_local.sh: error: $*" >&2; usage; exit 2; }

np=""
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -n | -np | --np) [[ $# -ge 2 ]] || bad "$1 needs a number of ranks"; np="$2"; shift 2 ;;
  --np=*) np="${1#--np=}"; shift ;;
  -n[0-9]*) np="${1#-n}"; shift ;;
  "") bad "missing -n N (number of ranks)" ;;
  *) bad "the first argument must be -n N (number of ranks), got '$1'" ;;
esac
[[ "$np" =~ ^[1-9][0-9]*$ ]] || bad "number of ranks must be an integer >= 1, got '$np'"
if [[ $# -eq 0 || "$1" == -* ]]; then set -- train "$@"; fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${BMOE_BIN:-$root/build/launch/bmoe}"
[[ -x "$bin" ]] || { echo "run_local.sh: error: $bin is not an executable (build with tools/build.sh, or set BMOE_BIN)" >&2; exit 2; }
mpirun="${MPIRUN:-mpirun}"
command -v "$mpirun" >/dev/null || { echo "run_local.sh: error: $mpirun not found (install Open MPI: tools/install-deps.sh)" >&2; exit 2; }

cores="$(nproc)"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  OMP_NUM_THREADS=$(( cores / np > 1 ? cores / np : 1 ))
fi
export OMP_NUM_THREADS
# More ranks x threads than cores: OpenMP threads that busy-wait at barriers steal the cores the
# other ranks need (measured 18x slower on 2 cores), so they sleep instead.
if (( np * OMP_NUM_THREADS > cores )); then
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
fi

flags=(-np "$np")
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
  flags+=(--oversubscribe)
  [[ "$(id -u)" -eq 0 ]] && flags+=(--allow-run-as-root)
  ((OMP_NUM_THREADS > 1)) && flags+=(--bind-to none)
  export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
  if ! command -v ssh >/dev/null && ! command -v rsh >/dev/null; then
    export OMPI_MCA_plm="${OMPI_MCA_plm:-isolated}"
  fi
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
[[ -n "${BMOE_MPIRUN_FLAGS:-}" ]] && flags+=(${BMOE_MPIRUN_FLAGS})

exec "$mpirun" "${flags[@]}" "$bin" "$@"
