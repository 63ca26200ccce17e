#!/usr/bin/env bash
# run-demo.sh -- the README's main job: install deps, build, train a small MoE from scratch on
# the built-in synthetic multi-domain corpus, then report validation loss against the unigram
# baseline and plot the loss curve (runs/demo/loss_curve.png). Extra args go to `bmoe train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
bash tools/build.sh
./build/launch/bmoe train --config tools/configs/demo.toml --train.out_dir=runs/demo "$@"
