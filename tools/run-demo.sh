#!/usr/bin/env bash
# run-demo.sh -- the README's main job: install deps, build, train a small MoE from scratch on
# the built-in synthetic multi-domain corpus with expert parallelism over 2 MPI ranks, then print
# the evaluation report (validation loss against the unigram baseline, per-domain loss and
# expert usage, OoD domains included) and plot the loss curve (runs/demo/loss_curve.png).
# Extra args go to `bmoe train`; BMOE_RANKS=1 trains in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
bash tools/build.sh
launch/run_local.sh -n "${BMOE_RANKS:-2}" train --config tools/configs/demo.toml --train.out_dir=runs/demo "$@"
