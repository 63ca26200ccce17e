#!/usr/bin/python3
"""plot_eval.py -- draw the figures of a `bmoe eval` report.

usage: /usr/bin/python3 tools/plot_eval.py EVAL_JSON OUT_DIR
Writes into OUT_DIR, one file per section of EVAL_JSON that is present and non-empty:
  reliability.png   "mcqa": per MCQA set, accuracy per confidence bin against the diagonal, with counts
  roc.png           "ood": per ID/OoD pair, one ROC curve per score, AUROC in the legend
  stability.png     "stability": mean Jaccard vs noise scale (log x), one line per layer, the mean thick
  expert_usage.png  "experts": per MoE layer, a domains x experts heat map of routed-token shares
The JSON schema is the one `bmoe eval` writes (sample: tests/data/eval_sample.json);
stability.per_layer is [layer][noise scale].
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def subplots(num_panels, panel_w, panel_h, max_cols=3):
    """A grid of num_panels axes, at most max_cols wide; the unused cells are hidden."""
    cols = min(num_panels, max_cols)
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, panel_h * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[num_panels:]:
        ax.set_visible(False)
    return fig, flat[:num_panels]


def save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def plot_reliability(mcqa, out_dir):
    sets = [s for s in mcqa.get("sets", []) if s.get("reliability")]
    if not sets:
        return
    fig, axes = subplots(len(sets), 4.2, 4.2)
    for ax, s in zip(axes, sets):
        rel = s["reliability"]
        lower, upper, count = rel["lower"], rel["upper"], rel["count"]
        acc, conf = rel["accuracy"], rel["confidence"]
        centers = [(lo + hi) / 2 for lo, hi in zip(lower, upper)]
        widths = [hi - lo for lo, hi in zip(lower, upper)]
        filled = [i for i, k in enumerate(count) if k > 0]
        ax.bar([centers[i] for i in filled], [acc[i] for i in filled], width=[widths[i] for i in filled],
               color="tab:blue", edgecolor="black", lw=0.5, alpha=0.8, label="accuracy")
        ax.plot([conf[i] for i in filled], [acc[i] for i in filled], "o", ms=3, color="tab:red",
                label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
        for i in filled:
            ax.text(centers[i], min(acc[i] + 0.02, 1.04), str(count[i]), ha="center", va="bottom", fontsize=6,
                    rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.12)
        ax.set_xlabel("confidence (max option probability)")
        ax.set_ylabel("accuracy")
        tag = " (OoD)" if s.get("ood") else ""
        title = f"{s['name']}{tag}, n={s.get('n', sum(count))}"
        if "ece" in s:
            title += f"\nacc {s.get('accuracy', float('nan')):.3f}  ECE {s['ece']:.3f}"
            if "ece_se" in s:
                title += f" +- {s['ece_se']:.3f}"
            if "ece_floor" in s:
                title += f" (floor {s['ece_floor']:.3f})"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    save(fig, out_dir, "reliability.png")


def plot_roc(ood, out_dir):
    pairs = [p for p in ood.get("pairs", []) if any(sc.get("roc") for sc in p.get("scores", []))]
    if not pairs:
        return
    fig, axes = subplots(len(pairs), 4.5, 4.5)
    for ax, pair in zip(axes, pairs):
        for sc in pair["scores"]:
            roc = sc.get("roc")
            if not roc:
                continue
            label = f"{sc['name']} (AUROC {sc.get('auroc', float('nan')):.3f})"
            ax.plot(roc["fpr"], roc["tpr"], lw=1.5, label=label)
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate (ID flagged)")
        ax.set_ylabel("true positive rate (OoD flagged)")
        ax.set_title(f"ID {pair.get('id_set', '?')} vs OoD {pair.get('ood_set', '?')}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    save(fig, out_dir, "roc.png")


def plot_stability(stability, out_dir):
    scales = stability.get("noise_scales") or []
    if not scales:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for layer, values in enumerate(stability.get("per_layer") or []):
        ax.plot(scales, values, lw=1, alpha=0.7, marker=".", label=f"layer {layer}")
    if stability.get("mean_jaccard"):
        ax.plot(scales, stability["mean_jaccard"], lw=3, color="black", marker="o", label="mean")
    ax.axhline(0.7, color="gray", ls=":", lw=1)
    at = stability.get("scale_at_0p7")
    if at is not None:
        ax.axvline(at, color="gray", ls="--", lw=1, label=f"mean reaches 0.7 at {at:.3g}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("noise scale")
    ax.set_ylabel("mean Jaccard of top-k expert sets")
    ax.set_title("routing stability under input noise", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    save(fig, out_dir, "stability.png")


def plot_expert_usage(experts, out_dir):
    layers = [layer for layer in experts.get("layers", []) if layer.get("usage")]
    if not layers:
        return
    domains = experts.get("domains") or [str(d) for d in range(len(layers[0]["usage"]))]
    vmax = max(max(max(row) for row in layer["usage"]) for layer in layers)
    num_experts = experts.get("num_experts", len(layers[0]["usage"][0]))
    fig, axes = subplots(len(layers), 0.55 * num_experts + 2.5, 0.4 * len(domains) + 1.6, max_cols=2)
    for ax, layer in zip(axes, layers):
        image = ax.imshow(layer["usage"], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(len(layer["usage"][0])))
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer.get('layer', '?')}: share of routed tokens", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    save(fig, out_dir, "expert_usage.png")


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        report = json.load(f)
    out_dir = sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    plot_reliability(report.get("mcqa") or {}, out_dir)
    plot_roc(report.get("ood") or {}, out_dir)
    plot_stability(report.get("stability") or {}, out_dir)
    plot_expert_usage(report.get("experts") or {}, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
