#!/usr/bin/python3
"""ckpt_logits.py -- PyTorch logits of a bmoe checkpoint, read with tools/bmoe_ckpt.py.

usage: ckpt_logits.py CHECKPOINT TOKENS.safetensors OUT.safetensors
TOKENS holds "tokens" [B, T] int32; OUT receives "logits" [B, T, V] float32 from the independent
PyTorch model (tools/bmoe_torch.py) built from the checkpoint's own [model] config.
"""
import os
import sys
import tomllib

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import bmoe_ckpt  # noqa: E402
import bmoe_torch  # noqa: E402


def main():
    ckpt, tokens_path, out_path = sys.argv[1:4]
    info, groups = bmoe_ckpt.load_checkpoint(ckpt)
    config = tomllib.loads(info["config_toml"])["model"]
    model = bmoe_torch.BmoeModel(config).float()
    bmoe_torch.load_state(model, {k: v.numpy() for k, v in groups["model"].items()})
    tokens, _ = bmoe_torch.load_safetensors(tokens_path)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens["tokens"]).long()).logits
    bmoe_torch.save_safetensors(out_path, {"logits": logits.float()})


if __name__ == "__main__":
    main()
