#!/usr/bin/env python3
"""torch_bench.py -- PyTorch training throughput of the bmoe comparison models (CPU or GPU).

    /usr/bin/python3 bench/torch_bench.py [--steps N] [--warmup N] [--threads 1,2]
    python3 bench/torch_bench.py --device cuda --model gpt2-moe --precision bf16 [--attention sdpa] [--compile]

The same models as bench/bench_train.cpp's presets (tools/bmoe_torch.py), trained with
torch.optim.AdamW (no decay on 1-D tensors, grad-norm clip 1.0) on random tokens:
  default : vocab 256, seq 256, batch 8, d 256, 4 layers, 4 heads, 8 experts top-2, F 512, SwiGLU,
            RMSNorm, RoPE, untied (the CPU comparison)
  gpt2-moe: vocab 50304, seq 1024, batch 8, d 768, 12 layers, 12 heads, 8 experts top-2, F 3072,
            GELU, LayerNorm, learned positions, tied embeddings
  large   : vocab 50304, seq 2048, batch 4, d 1536, 8 layers, 12 heads, 8 experts top-2, F 6144,
            SwiGLU, RMSNorm, RoPE, untied
bf16 is torch.autocast (bf16 matmuls, fp32 master weights and optimizer), as bmoe's --precision bf16.
The MoE layer is the usual eager loop over experts (tokens gathered per expert, index_add back).
--attention sdpa uses F.scaled_dot_product_attention (flash kernels on GPUs, the strongest eager
attention); naive (the default on CPUs) materialises the [B, H, T, T] scores like bmoe does.
--compile wraps the model in torch.compile. --accumulate K: K micro-batches per optimizer step, as
bench_train's flag. Model FLOP/s and MFU use bmoe's formula:
tokens/s * (6 * active_matmul_params + 12 * L * T * d), against --peak-tflops (default: the
H100/H200 SXM dense figure, 989 bf16 / 67 fp32, as bench_train) on GPUs.
Prints human lines and one "JSON {...}" line.

Debian's torch runs its ops on libgomp threads and its GEMMs on OpenBLAS's own pthread pool; with
both spinning while idle, 2 torch threads on 2 cores ran ~3.5x slower than 1. OMP_WAIT_POLICY
defaults to PASSIVE here (set it explicitly to override), which removes that penalty, so the
baseline is torch at its best.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see above
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

import torch  # noqa: E402

from bmoe_torch import Attention, BmoeModel  # noqa: E402

COMMON = {"num_experts": 8, "top_k": 2, "moe_every": 1}
PRESETS = {  # name -> (model config, batch, seq): bench/bench_train.cpp's preset()
    "default": ({"vocab_size": 256, "d_model": 256, "num_layers": 4, "num_heads": 4, "expert_hidden": 512,
                 "tie_embeddings": False, "norm": "rmsnorm", "position": "rope", "activation": "swiglu"}, 8, 256),
    "gpt2-moe": ({"vocab_size": 50304, "d_model": 768, "num_layers": 12, "num_heads": 12, "expert_hidden": 3072,
                  "tie_embeddings": True, "norm": "layernorm", "position": "learned", "activation": "gelu"}, 8, 1024),
    "large": ({"vocab_size": 50304, "d_model": 1536, "num_layers": 8, "num_heads": 12, "expert_hidden": 6144,
               "tie_embeddings": False, "norm": "rmsnorm", "position": "rope", "activation": "swiglu"}, 4, 2048),
}


ACTIVE_PARAMS = {"count": 0}  # of the last model measured


def preset(name: str, batch: int):
    config, B, T = PRESETS[name]
    config = {**config, **COMMON, "num_kv_heads": config["num_heads"], "max_seq_len": T}
    return config, (batch if batch > 0 else B), T


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


def measure(args, config, B: int, T: int, threads: int) -> float:
    """Tokens/s of forward + backward + AdamW (at this many intra-op threads on the CPU)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = BmoeModel(config).to(device)
    ACTIVE_PARAMS["count"] = active_matmul_params(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    forward = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(42)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        for _ in range(args.accumulate):  # micro-batches, loss scaled by 1/accumulate (bench_train's too)
            tokens = torch.randint(0, config["vocab_size"], (B, T), generator=gen).to(device)
            targets = torch.randint(0, config["vocab_size"], (B, T), generator=gen).to(device)
            with autocast:
                out = forward(tokens, targets, aux_coef=0.01, zloss_coef=0.001)
            (out.total / args.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.total.item()  # waits for the GPU

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - start
    tokens_per_s = B * T * args.accumulate * args.steps / elapsed
    where = f"{threads} thread(s)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {'compile' if args.compile else 'eager'} ({args.precision}, {where}): {args.steps} steps in "
          f"{elapsed:.2f} s ({elapsed / args.steps:.3f} s/step, loss {loss:.4f}): {tokens_per_s:.0f} tokens/s",
          flush=True)
    return tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts to try")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="default", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the preset's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--attention", default=None, choices=("naive", "sdpa"),
                        help="attention core (default: sdpa on cuda, naive on cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="GPU dense peak for MFU")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches of the batch per optimizer step (gradient accumulation)")
    args = parser.parse_args()
    if args.accumulate < 1:
        sys.exit("torch_bench: --accumulate must be at least 1 (micro-batches per optimizer step)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_bench: --device cuda but torch sees no CUDA device; use --device cpu")
    args.attention = args.attention or ("sdpa" if args.device == "cuda" else "naive")
    Attention.use_sdpa = args.attention == "sdpa"
    config, B, T = preset(args.model, args.batch)

    thread_counts = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    results = {t: measure(args, config, B, T, t) for t in thread_counts}
    best_threads = max(results, key=results.get)
    tokens_per_s = results[best_threads]
    active = ACTIVE_PARAMS["count"]
    flops_per_token = 6 * active + 12 * config["num_layers"] * T * config["d_model"]
    model_flops = tokens_per_s * flops_per_token
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes
    record = {
        "impl": "torch", "torch_version": torch.__version__, "device": args.device, "model": args.model,
        "precision": args.precision, "attention": args.attention, "compile": args.compile, "batch": B, "seq": T,
        "accumulate": args.accumulate,
        "threads": best_threads, "tokens_per_s_by_threads": {str(k): v for k, v in results.items()},
        "tokens_per_s": tokens_per_s, "model_flops": model_flops, "flops_per_token": flops_per_token,
        "active_matmul_params": active, "steps": args.steps, "peak_rss_mib": rss_mib,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
    }
    summary = (f"torch {'compile' if args.compile else 'eager'} best: {tokens_per_s:.0f} tokens/s"
               f"{f' at {best_threads} thread(s)' if args.device == 'cpu' else ''}, {model_flops / 1e9:.1f} GFLOP/s "
               f"model, peak RSS {rss_mib:.0f} MiB")
    if args.device == "cuda":
        peak = args.peak_tflops or (989.0 if args.precision == "bf16" else 67.0)
        record["mfu"] = model_flops / (peak * 1e12)
        record["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        free, total = torch.cuda.mem_get_info()  # bench_train's "in use" figure: context and cache included
        record["device_mib"] = (total - free) / 2**20
        summary += (f", MFU {100 * record['mfu']:.1f}% of {peak:.0f} TFLOP/s, peak allocated "
                    f"{record['peak_device_mib']:.0f} MiB, device memory in use {record['device_mib']:.0f} MiB")
    print(f"{summary} (torch {torch.__version__}, model {args.model}, attention {args.attention}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    print("JSON " + json.dumps(record))


if __name__ == "__main__":
    main()
