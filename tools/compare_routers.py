#!/usr/bin/env python3
"""compare_routers.py -- the router comparison experiment: one base model, then each router
family fine-tuned on the same data for the same steps, evaluated the same way, over several seeds.

    /usr/bin/python3 tools/compare_routers.py [--out runs/compare] [--seeds 3] [--ranks 1]
        [--routers topk,temp_sampling,mc_dropout,swag,ensemble,weight_mfvi,logit_mf,logit_fc,vtsr]
        [--base-steps 600] [--learn-steps 600] [--overfit-steps 600] [--finetune-steps 100]
        [--questions 1000] [--samples 8] [--bmoe build/launch/bmoe] [--reuse]

Pipeline (docs/comparison.md explains the choices):
  1. data:    the built-in synthetic corpus with 30% multiple-choice documents; MCQA sets of 5000
              (learning), 300 (overfitting) and 1000 (router fine-tuning) training questions.
  2. base:    a deterministic (topk) model trained from scratch on the corpus (once).
  3. det:     the base model taught to answer (all parameters, loss on the answer letter, 5000
              questions), then fine-tuned for many epochs on the 300 questions: the overconfident
              deterministic model the papers start from (ECE >= 0.10).
  4. per seed and router type: `bmoe finetune-router --init det` on the fine-tuning set, same
              steps and learning rate; `topk` here is the CONTROL: the deterministic router
              fine-tuned with plain cross-entropy, which every Bayesian claim must beat.
  5. `bmoe eval` of det and of every fine-tuned model (same questions, noise scales, S).
  6. comparison.json / comparison.md (mean +- SD over seeds, and the paired difference against
     the control) and plots (comparison_*.png).
Every step is a bmoe command printed before it runs; --reuse skips steps whose output exists.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

ROUTERS = ["topk", "temp_sampling", "mc_dropout", "swag", "ensemble", "weight_mfvi", "logit_mf", "logit_fc", "vtsr"]
NOISE_SCALES = "0.01,0.02,0.05,0.1,0.2,0.5,1,2"
MODEL_FLAGS = ["--model.d_model=128", "--model.num_layers=4", "--model.num_heads=4", "--model.num_kv_heads=2",
               "--model.num_experts=8", "--model.top_k=2", "--model.expert_hidden=256"]


def run(cmd: list, log_path: str) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "w") as log:
        status = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if status != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        sys.exit(f"compare_routers: command failed (exit {status}), log {log_path}:\n{tail}")
    print(f"  done in {time.time() - start:.0f}s", flush=True)


def launcher(args) -> list:
    if args.ranks <= 1:
        return [args.bmoe]
    return [os.path.join(args.repo, "launch", "run_local.sh"), "-n", str(args.ranks)]


def bmoe_cmd(args, sub: list) -> list:
    # run_local.sh takes the subcommand after its own flags; the plain binary the same way
    return launcher(args) + sub


def last_checkpoint(run_dir: str) -> str:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt_dir, "latest")) as f:
        return os.path.join(ckpt_dir, f.read().strip())


def median_step_seconds(run_dir: str) -> float:
    steps = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "step_s" in j:
                steps.append(j["step_s"])
    return statistics.median(steps[len(steps) // 5:]) if steps else float("nan")


def summarise(eval_json: dict) -> dict:
    """The comparison's numbers from one eval.json."""
    out = {}
    for s in eval_json.get("mcqa", {}).get("sets", []):
        key = s["name"]
        for m in ("accuracy", "ece", "ece_se", "ece_floor", "mce", "brier", "nll"):
            out[f"{key}.{m}"] = s[m]
    for pair in eval_json.get("ood", {}).get("pairs", []):
        for sc in pair["scores"]:
            out[f"auroc.{pair['id_set']}.{sc['name']}"] = sc["auroc"]
    st = eval_json.get("stability", {})
    if st:
        out["stability.scales"] = st["noise_scales"]
        out["stability.mean_jaccard"] = st["mean_jaccard"]
    return out


def interpolate(scales: list, values: list, at: float) -> float:
    """Linear interpolation in log(scale)."""
    if at is None or not scales:
        return float("nan")
    xs = [math.log(s) for s in scales]
    x = math.log(at)
    if x <= xs[0]:
        return values[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return values[i - 1] + t * (values[i] - values[i - 1])
    return values[-1]


def mean_sd(values: list) -> tuple:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return (float("nan"), float("nan"))
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(ms: tuple, digits: int = 3) -> str:
    m, s = ms
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--learn-steps", type=int, default=600)
    p.add_argument("--overfit-steps", type=int, default=600)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--beta", type=float, default=1e-3)
    p.add_argument("--bmoe", default="build/launch/bmoe")
    p.add_argument("--reuse", action="store_true", help="skip steps whose outputs exist")
    args = p.parse_args()
    args.repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    routers = [r for r in args.routers.split(",") if r]
    if "topk" not in routers:
        sys.exit("compare_routers: --routers must include topk (the control)")
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    common = ["--train.plot=false", "--train.eval_every=0", "--train.log_every=50", "--data.seq_len=256"]

    def step(out_path: str, cmd: list, log: str) -> None:
        if args.reuse and os.path.exists(out_path):
            print(f"(reuse {out_path})")
            return
        run(cmd, log)

    # 1. data
    corpus, mcqa_learn, mcqa_small, mcqa_ft = (os.path.join(args.out, "data", d)
                                               for d in ("corpus", "mcqa_learn", "mcqa_small", "mcqa_ft"))
    step(os.path.join(corpus, "train.bin"),
         [args.bmoe, "data", "--source", "synthetic", "--mcqa-fraction", "0.3", "--train-tokens", "1500000",
          "--out", corpus], os.path.join(args.out, "data_corpus.log"))
    step(os.path.join(mcqa_learn, "train.bin"),
         [args.bmoe, "data", "--source", "mcqa", "--questions", "5000", "--val-questions", "200", "--seed", "10",
          "--out", mcqa_learn], os.path.join(args.out, "data_mcqa_learn.log"))
    step(os.path.join(mcqa_small, "train.bin"),
         [args.bmoe, "data", "--source", "mcqa", "--questions", "300", "--val-questions", "100", "--seed", "11",
          "--out", mcqa_small], os.path.join(args.out, "data_mcqa_small.log"))
    step(os.path.join(mcqa_ft, "train.bin"),
         [args.bmoe, "data", "--source", "mcqa", "--questions", "1000", "--val-questions", "100", "--seed", "12",
          "--out", mcqa_ft], os.path.join(args.out, "data_mcqa_ft.log"))

    # 2. base model, 3. overconfident deterministic model
    base_dir, learn_dir, det_dir = (os.path.join(args.out, d) for d in ("base", "learn", "det"))
    answers = ["--data.loss_on=answers"]
    step(os.path.join(base_dir, "checkpoints", "latest"),
         bmoe_cmd(args, ["train"] + MODEL_FLAGS + common + [
             f"--data.dataset={corpus}", f"--train.steps={args.base_steps}", "--optim.warmup_steps=30",
             f"--train.out_dir={base_dir}"]), os.path.join(args.out, "base.log"))
    step(os.path.join(learn_dir, "checkpoints", "latest"),
         bmoe_cmd(args, ["train"] + MODEL_FLAGS + common + answers + [
             f"--data.dataset={mcqa_learn}", f"--train.init={last_checkpoint(base_dir)}", "--data.batch_size=16",
             f"--train.steps={args.learn_steps}", "--optim.lr=2e-3", "--optim.warmup_steps=20",
             f"--train.out_dir={learn_dir}"]), os.path.join(args.out, "learn.log"))
    step(os.path.join(det_dir, "checkpoints", "latest"),
         bmoe_cmd(args, ["train"] + MODEL_FLAGS + common + answers + [
             f"--data.dataset={mcqa_small}", f"--train.init={last_checkpoint(learn_dir)}", "--data.batch_size=16",
             f"--train.steps={args.overfit_steps}", "--optim.lr=1e-3", "--optim.warmup_steps=10",
             "--optim.weight_decay=0", f"--train.out_dir={det_dir}"]), os.path.join(args.out, "det.log"))
    det_ckpt = last_checkpoint(det_dir)

    def evaluate(ckpt: str, out_dir: str) -> dict:
        step(os.path.join(out_dir, "eval.json"),
             bmoe_cmd(args, ["eval", "--ckpt", ckpt, "--questions", str(args.questions), "--samples",
                             str(args.samples), "--cloze=off", "--no-lm", "--data", corpus, "--noise-scales", NOISE_SCALES,
                             "--out", out_dir]), out_dir + ".log")
        with open(os.path.join(out_dir, "eval.json")) as f:
            return json.load(f)

    det_eval = summarise(evaluate(det_ckpt, os.path.join(args.out, "det_eval")))

    # 4./5. fine-tune and evaluate every router, every seed
    results = {r: [] for r in routers}  # router -> [per-seed summary]
    for seed in range(1, args.seeds + 1):
        for router in routers:
            run_dir = os.path.join(args.out, f"seed{seed}", router)
            step(os.path.join(run_dir, "checkpoints", f"step_{args.finetune_steps:08d}.h5"),  # a finished run
                 bmoe_cmd(args, ["finetune-router", "--init", det_ckpt, f"--router.type={router}"] + common + answers + [
                     f"--data.dataset={mcqa_ft}", f"--train.steps={args.finetune_steps}", "--optim.lr=1e-3",
                     "--optim.warmup_steps=10", f"--loss.router_reg_coef={args.beta}", f"--train.seed={seed}",
                     "--router.swag_every=5", f"--train.out_dir={run_dir}"]), run_dir + ".log")
            summary = summarise(evaluate(last_checkpoint(run_dir), os.path.join(run_dir, "eval")))
            summary["step_s"] = median_step_seconds(run_dir)
            results[router].append(summary)

    # 6. the table
    control = results["topk"]
    ref_scale = None
    ctrl_scales = control[0].get("stability.scales")
    if ctrl_scales:
        curve = [statistics.mean(c["stability.mean_jaccard"][i] for c in control) for i in range(len(ctrl_scales))]
        for i in range(1, len(curve)):  # where the control's mean Jaccard crosses 0.7
            if curve[i - 1] >= 0.7 > curve[i]:
                t = (curve[i - 1] - 0.7) / (curve[i - 1] - curve[i])
                ref_scale = math.exp(math.log(ctrl_scales[i - 1]) + t * (math.log(ctrl_scales[i]) -
                                                                          math.log(ctrl_scales[i - 1])))
        if ref_scale is None:
            ref_scale = ctrl_scales[-1]
    for runs in results.values():
        for r in runs:
            r["jaccard_at_ref"] = interpolate(r.get("stability.scales", []), r.get("stability.mean_jaccard", []),
                                              ref_scale)
    auroc_keys = sorted({k for runs in results.values() for r in runs for k in r if k.startswith("auroc.")})
    metrics = ["synthetic-id.accuracy", "synthetic-id.ece", "synthetic-id.ece_floor", "synthetic-id.mce",
               "synthetic-id.brier", "synthetic-id.nll"] + auroc_keys + ["jaccard_at_ref", "step_s"]
    table = {}
    for router, runs in results.items():
        row = {}
        for m in metrics:
            row[m] = mean_sd([r.get(m) for r in runs])
            paired = [r.get(m) - c.get(m) for r, c in zip(runs, control) if r.get(m) is not None and
                      c.get(m) is not None]
            row[m + ".diff"] = mean_sd(paired)
        row["synthetic-id.ece_se"] = mean_sd([r.get("synthetic-id.ece_se") for r in runs])
        row["step_overhead"] = mean_sd([r["step_s"] / c["step_s"] - 1.0 for r, c in zip(runs, control)])
        table[router] = row
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump({"config": vars(args), "det_before_router_finetuning": det_eval, "reference_noise_scale": ref_scale,
                   "runs": results, "table": table}, f, indent=1, default=str)

    lines = [f"# Router comparison ({args.seeds} seeds; mean ± SD; Δ = paired difference against the topk control)",
             "",
             f"Deterministic model before router fine-tuning: accuracy {det_eval.get('synthetic-id.accuracy', 0):.3f}, "
             f"ECE {det_eval.get('synthetic-id.ece', 0):.3f} (floor {det_eval.get('synthetic-id.ece_floor', 0):.3f}), "
             f"NLL {det_eval.get('synthetic-id.nll', 0):.3f}.", "",
             f"Stability: mean Jaccard of the selected experts at input noise {ref_scale:.3g} × RMS (where the "
             f"control falls to ≈ 0.7)." if ref_scale else "", ""]
    short = {k: k.replace("auroc.synthetic-id.", "AUROC ").replace("auroc.cloze-id.", "cloze AUROC ")
             for k in auroc_keys}
    header = ["router", "acc", "ECE ± SE (floor)", "Δ ECE", "MCE", "Brier", "NLL", "Δ NLL"] + \
             [short[k] for k in auroc_keys] + ["Jaccard", "step time"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for router, row in table.items():
        ece, se, floor = row["synthetic-id.ece"], row["synthetic-id.ece_se"], row["synthetic-id.ece_floor"]
        cells = [router, fmt(row["synthetic-id.accuracy"]),
                 f"{ece[0]:.3f} ± {se[0]:.3f} ({floor[0]:.3f})" if not math.isnan(ece[0]) else "—",
                 fmt(row["synthetic-id.ece.diff"]), fmt(row["synthetic-id.mce"]), fmt(row["synthetic-id.brier"]),
                 fmt(row["synthetic-id.nll"]), fmt(row["synthetic-id.nll.diff"])]
        cells += [fmt(row[k], 2) for k in auroc_keys]
        cells += [fmt(row["jaccard_at_ref"]), f"{100 * row['step_overhead'][0]:+.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Wall time: {(time.time() - started) / 60:.1f} min. Command: "
              f"`/usr/bin/python3 tools/compare_routers.py {' '.join(sys.argv[1:])}`"]
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args.out, table, results, auroc_keys, short)
    return 0


def plot(out: str, table: dict, results: dict, auroc_keys: list, short: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib missing (apt-get install python3-matplotlib): no comparison plots")
        return
    routers = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in ((axes[0], "synthetic-id.ece", "ECE (in-distribution MCQA)"),
                              (axes[1], "synthetic-id.nll", "NLL"), (axes[2], "synthetic-id.accuracy", "accuracy")):
        means = [table[r][metric][0] for r in routers]
        sds = [0.0 if math.isnan(table[r][metric][1]) else table[r][metric][1] for r in routers]
        ax.bar(range(len(routers)), means, yerr=sds, color=["grey"] + ["C0"] * (len(routers) - 1))
        ax.set_xticks(range(len(routers)))
        ax.set_xticklabels(routers, rotation=45, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "comparison_calibration.png"), dpi=100)
    plt.close(fig)
    if auroc_keys:
        fig, ax = plt.subplots(figsize=(12, 4))
        width = 0.8 / len(auroc_keys)
        for i, k in enumerate(auroc_keys):
            ax.bar([x + i * width for x in range(len(routers))],
                   [0.0 if math.isnan(table[r][k][0]) else table[r][k][0] for r in routers], width,
                   yerr=[0.0 if math.isnan(table[r][k][1]) else table[r][k][1] for r in routers], label=short[k])
        ax.set_xticks([x + 0.4 for x in range(len(routers))])
        ax.set_xticklabels(routers, rotation=45, ha="right")
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_ylabel("AUROC (ID vs OoD)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "comparison_ood.png"), dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in routers:
        runs = [x for x in results[r] if x.get("stability.scales")]
        if not runs:
            continue
        scales = runs[0]["stability.scales"]
        curve = [statistics.mean(x["stability.mean_jaccard"][i] for x in runs) for i in range(len(scales))]
        ax.plot(scales, curve, marker="o", label=r, lw=2.5 if r == "topk" else 1)
    ax.set_xscale("log")
    ax.set_xlabel("input noise (× hidden-state RMS)")
    ax.set_ylabel("mean Jaccard of selected experts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "comparison_stability.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
