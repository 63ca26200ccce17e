#!/usr/bin/env python3
"""torch_reference.py -- float64 PyTorch reference forward + backward of a bmoe model.

    python3 tools/torch_reference.py IN.safetensors OUT.safetensors

IN holds every model parameter under its bmoe name, "tokens" and "targets" (int32 [B, T],
targets < 0 ignored) and metadata: "config" (JSON object with ModelConfig field names, e.g.
{"vocab_size": 37, "norm": "rmsnorm", ..., "router": {"type": "logit_fc", ...}}), "aux_coef",
"zloss_coef" and optionally "router_reg_coef" (decimal strings; default 0).
The routing noise the C++ forward drew, per MoE layer l (tools/bmoe_torch.py reads it instead of
drawing its own): "noise.{l}.eps" [S, N, E], "noise.{l}.dropout_mask" [S, N, D],
"noise.{l}.gumbel" [N, E], "noise.{l}.member" [N] (int); only those the family uses. An aux-free
selection bias, if any: "model.layers.{l}.block_sparse_moe.router_state.selection_bias" [E].

OUT gets (all F64): "logits" [B, T, V]; "ce", "aux", "z", "reg", "total" ([1] each, the loss
parts as defined in tools/bmoe_torch.py); and "grad.<name>" = d total / d parameter for every
parameter (zeros where the loss does not depend on it, e.g. an expert no token was routed to).
Used by tests/reference_test.cpp; exits non-zero with a message on any error.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bmoe_torch import BmoeModel, load_safetensors, load_state, save_safetensors  # noqa: E402


def main(argv: list) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    in_path, out_path = argv[1], argv[2]
    tensors, metadata = load_safetensors(in_path)
    for key in ("config", "aux_coef", "zloss_coef"):
        if key not in metadata:
            raise SystemExit(f"torch_reference: {in_path} has no '{key}' metadata")
    config = json.loads(metadata["config"])
    aux_coef, zloss_coef = float(metadata["aux_coef"]), float(metadata["zloss_coef"])
    router_reg_coef = float(metadata.get("router_reg_coef", "0"))

    # noise.{l}.{field} -> {l: {field: tensor}}; float noise in float64, member ids as int64
    noise = {}
    selection_bias = {}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "noise" and len(parts) == 3:
            value = torch.from_numpy(array)
            value = value.to(torch.float64) if value.is_floating_point() else value.to(torch.int64)
            noise.setdefault(int(parts[1]), {})[parts[2]] = value
        elif name.endswith(".block_sparse_moe.router_state.selection_bias"):
            selection_bias[int(parts[2])] = torch.from_numpy(array).to(torch.float64)

    torch.manual_seed(0)
    model = BmoeModel(config).to(torch.float64)
    load_state(model, tensors, strict=True)
    tokens = torch.from_numpy(tensors["tokens"].astype(np.int64))
    targets = torch.from_numpy(tensors["targets"].astype(np.int64))

    out = model(tokens, targets, aux_coef=aux_coef, zloss_coef=zloss_coef, router_reg_coef=router_reg_coef,
                noise=noise, selection_bias=selection_bias)
    out.total.backward()

    result = {"logits": out.logits.detach()}
    for key in ("ce", "aux", "z", "reg", "total"):
        result[key] = getattr(out, key).detach().reshape(1)
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        result["grad." + name] = grad
    save_safetensors(out_path, {k: v.to(torch.float64) for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
