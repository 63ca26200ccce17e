#!/usr/bin/env python3
"""torch_reference.py -- float64 PyTorch reference forward + backward of a bmoe model.

    python3 tools/torch_reference.py IN.safetensors OUT.safetensors

IN holds every model parameter under its bmoe name, "tokens" and "targets" (int32 [B, T],
targets < 0 ignored) and metadata: "config" (JSON object with ModelConfig field names, e.g.
{"vocab_size": 37, "norm": "rmsnorm", ...}), "aux_coef" and "zloss_coef" (decimal strings).

OUT gets (all F64): "logits" [B, T, V]; "ce", "aux", "z", "total" ([1] each, the loss parts as
defined in tools/bmoe_torch.py); and "grad.<name>" = d total / d parameter for every parameter
(zeros where the loss does not depend on it, e.g. an expert no token was routed to).
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

    torch.manual_seed(0)
    model = BmoeModel(config).to(torch.float64)
    load_state(model, tensors, strict=True)
    tokens = torch.from_numpy(tensors["tokens"].astype(np.int64))
    targets = torch.from_numpy(tensors["targets"].astype(np.int64))

    out = model(tokens, targets, aux_coef=aux_coef, zloss_coef=zloss_coef)
    out.total.backward()

    result = {"logits": out.logits.detach()}
    for key in ("ce", "aux", "z", "total"):
        result[key] = getattr(out, key).detach().reshape(1)
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        result["grad." + name] = grad
    save_safetensors(out_path, {k: v.to(torch.float64) for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
