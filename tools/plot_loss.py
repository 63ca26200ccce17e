#!/usr/bin/python3
"""plot_loss.py -- draw a bmoe run's loss curve from its metrics.jsonl.

usage: /usr/bin/python3 tools/plot_loss.py RUN_DIR/metrics.jsonl [OUT.png]
Plots the training loss (total and cross-entropy), validation loss and the unigram baseline.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else path.rsplit("/", 1)[0] + "/loss_curve.png"
    steps, loss, ce, val_steps, val, unigram = [], [], [], [], [], None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                val_steps.append(rec["step"])
                val.append(rec["val_loss"])
                unigram = rec["unigram_loss"]
            else:
                steps.append(rec["step"])
                loss.append(rec["loss"])
                ce.append(rec["ce"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=1, alpha=0.6, label="train loss (CE + aux + z)")
    ax.plot(steps, ce, lw=1, label="train cross-entropy")
    if val:
        ax.plot(val_steps, val, "o-", label="validation cross-entropy")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("bmoe training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"loss curve: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
