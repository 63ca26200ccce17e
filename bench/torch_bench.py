#!/usr/bin/env python3
"""torch_bench.py -- PyTorch-eager training throughput of the bmoe comparison model.

    /usr/bin/python3 bench/torch_bench.py [--steps N] [--warmup N] [--threads 1,2]

The same model as bench/bench_train.cpp (tools/bmoe_torch.py, float32: vocab 256, seq 256,
batch 8, d 256, 4 layers, 4 heads, 8 experts top-2, expert hidden 512, SwiGLU, RMSNorm, RoPE,
untied) trained with torch.optim.AdamW (no decay on 1-D tensors, grad-norm clip 1.0) on random
tokens. Measured at each thread count; reports the best. Model FLOP/s uses bmoe's formula:
tokens/s * (6 * active_matmul_params + 12 * L * T * d). Prints human lines and one "JSON {...}" line.

Debian's torch runs its ops on libgomp threads and its GEMMs on OpenBLAS's own pthread pool; with
both spinning while idle, 2 torch threads on 2 cores ran ~3.5x slower than 1. OMP_WAIT_POLICY
defaults to PASSIVE here (set it explicitly to override), which removes that penalty, so the
baseline is torch at its best.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see above
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

import torch  # noqa: E402

from bmoe_torch import BmoeModel  # noqa: E402

CONFIG = {
    "vocab_size": 256, "max_seq_len": 256, "d_model": 256, "num_layers": 4, "num_heads": 4,
    "num_kv_heads": 4, "num_experts": 8, "top_k": 2, "expert_hidden": 512, "moe_every": 1,
    "tie_embeddings": False, "norm": "rmsnorm", "position": "rope", "activation": "swiglu",
}
BATCH, SEQ = 8, 256


def active_matmul_params(model: BmoeModel) -> int:
    """Same count as ParameterLayout::active_matmul_params: matmul weights a token touches."""
    c = model.config
    n = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in ("model.embed_tokens.weight", "model.embed_positions.weight"):
            continue
        n += p.numel() // c["num_experts"] * c["top_k"] if ".experts." in name else p.numel()
    if c["tie_embeddings"]:
        n += c["vocab_size"] * c["d_model"]
    return n


def measure(threads: int, steps: int, warmup: int) -> float:
    """Tokens/s of forward + backward + AdamW at this many intra-op threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BmoeModel(CONFIG)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(42)

    def step() -> float:
        tokens = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen)
        targets = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen)
        opt.zero_grad(set_to_none=True)
        out = model(tokens, targets, aux_coef=0.01, zloss_coef=0.001)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.total.item()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - start
    tokens_per_s = BATCH * SEQ * steps / elapsed
    print(f"torch eager, {threads} thread(s): {steps} steps in {elapsed:.2f} s ({elapsed / steps:.3f} s/step, "
          f"loss {loss:.4f}): {tokens_per_s:.0f} tokens/s")
    return tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to try")
    args = parser.parse_args()

    results = {int(t): measure(int(t), args.steps, args.warmup) for t in args.threads.split(",")}
    best_threads = max(results, key=results.get)
    tokens_per_s = results[best_threads]
    model = BmoeModel(CONFIG)
    active = active_matmul_params(model)
    flops_per_token = 6 * active + 12 * CONFIG["num_layers"] * SEQ * CONFIG["d_model"]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes
    print(f"torch eager best: {tokens_per_s:.0f} tokens/s at {best_threads} thread(s), "
          f"{tokens_per_s * flops_per_token / 1e9:.1f} GFLOP/s model, peak RSS {rss_mib:.0f} MiB "
          f"(torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    print("JSON " + json.dumps({
        "impl": "torch", "torch_version": torch.__version__, "threads": best_threads,
        "tokens_per_s_by_threads": {str(k): v for k, v in results.items()}, "tokens_per_s": tokens_per_s,
        "model_flops": tokens_per_s * flops_per_token, "flops_per_token": flops_per_token,
        "active_matmul_params": active, "steps": args.steps, "peak_rss_mib": rss_mib,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
    }))


if __name__ == "__main__":
    main()
