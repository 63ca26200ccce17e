#!/usr/bin/python3
"""eval_metrics_reference.py -- independent numpy computation of eval/metrics.h's metrics.

usage: /usr/bin/python3 tests/eval_metrics_reference.py IN.txt OUT.txt
Written for tests/eval_metrics_test.cpp (EvalCrossCheck.MatchesNumpyReference). IN.txt holds

    calibration N C M
    p_0 ... p_{C-1} label        (N lines)
    id N_ID
    score                        (N_ID lines)
    ood N_OOD
    score                        (N_OOD lines)

and OUT.txt gets one "name value" line per metric (values printed with repr, i.e. round-trip exact).
The formulas are deliberately different from the C++ ones: per-bin means for ECE, an all-pairs
comparison for AUROC, per-positive precision for average precision, a threshold scan for FPR@95.
Plain numpy, no sklearn.
"""
import sys

import numpy as np


def read_input(path):
    with open(path) as f:
        tokens = f.read().split()
    pos = 0

    def take(k):
        nonlocal pos
        out = tokens[pos : pos + k]
        pos += k
        return out

    tag, n, c, m = take(4)
    assert tag == "calibration", tag
    n, c, m = int(n), int(c), int(m)
    rows = np.array([float(x) for x in take(n * (c + 1))]).reshape(n, c + 1)
    probs, labels = rows[:, :c], rows[:, c].astype(int)
    tag, n_id = take(2)
    assert tag == "id", tag
    id_scores = np.array([float(x) for x in take(int(n_id))])
    tag, n_ood = take(2)
    assert tag == "ood", tag
    ood_scores = np.array([float(x) for x in take(int(n_ood))])
    return probs, labels, m, id_scores, ood_scores


def calibration(probs, labels, num_bins):
    n, c = probs.shape
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)  # argmax: first maximum, as in C++
    bins = np.minimum(np.floor(conf * num_bins).astype(int), num_bins - 1)
    ece, mce = 0.0, 0.0
    for b in range(num_bins):
        mask = bins == b
        if not mask.any():
            continue
        gap = abs(correct[mask].mean() - conf[mask].mean())
        ece += mask.sum() / n * gap
        mce = max(mce, gap)
    onehot = np.eye(c)[labels]
    p_y = probs[np.arange(n), labels]
    return {
        "accuracy": correct.mean(),
        "ece": ece,
        "mce": mce,
        "brier": ((probs - onehot) ** 2).sum(axis=1).mean(),
        "nll": -np.log(np.maximum(p_y, 1e-12)).mean(),
    }


def detection(id_scores, ood_scores):
    greater = (ood_scores[:, None] > id_scores[None, :]).mean()
    ties = (ood_scores[:, None] == id_scores[None, :]).mean()
    everything = np.concatenate([id_scores, ood_scores])
    # Average precision: mean over OoD items of the precision at their own score as threshold.
    precision = [(ood_scores >= s).sum() / (everything >= s).sum() for s in ood_scores]
    fpr95 = None
    for t in np.unique(everything)[::-1]:
        if (ood_scores >= t).sum() * 100 >= 95 * len(ood_scores):
            fpr95 = (id_scores >= t).mean()
            break
    return {"auroc": greater + 0.5 * ties, "aupr": float(np.mean(precision)), "fpr95": fpr95}


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    probs, labels, num_bins, id_scores, ood_scores = read_input(sys.argv[1])
    results = {**calibration(probs, labels, num_bins), **detection(id_scores, ood_scores)}
    with open(sys.argv[2], "w") as f:
        for name, value in results.items():
            f.write(f"{name} {float(value)!r}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
