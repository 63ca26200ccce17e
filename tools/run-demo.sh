#!/usr/bin/env bash
# run-demo.sh -- the README's main job: install deps, build, train a small MoE from scratch on
# the built-in synthetic multi-domain corpus with expert parallelism over 2 MPI ranks, print the
# training report (validation loss against the unigram baseline, per-domain loss and expert usage,
# OoD domains included), plot the loss curve (runs/demo/loss_curve.png), then evaluate the final
# checkpoint with `bmoe eval` on the same 2 ranks (MCQA calibration, OoD detection, routing
# stability; runs/demo/eval/eval.md and PNGs). The demo model is not taught to answer questions,
# so its MCQA sets are flagged as not above chance: tools/compare_routers.py is the full experiment.
# Extra args go to `bmoe train`; BMOE_RANKS=1 trains in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
bash tools/build.sh
launch/run_local.sh -n "${BMOE_RANKS:-2}" train --config tools/configs/demo.toml --train.out_dir=runs/demo "$@"
launch/run_local.sh -n "${BMOE_RANKS:-2}" eval --ckpt runs/demo/checkpoints --questions 1000 --out runs/demo/eval
