#!/usr/bin/python3
"""make_hf_checkpoint.py -- a small MoE in Hugging Face safetensors layout, written by PyTorch.

usage: make_hf_checkpoint.py OUT_DIR STYLE CONFIG_JSON
  STYLE: mixtral (block_sparse_moe.experts.E.w1/w2/w3) or olmoe (mlp.gate, mlp.experts.E.*_proj)
Writes OUT_DIR/model.safetensors (per-expert tensors, as HF models store them) and
OUT_DIR/expected.safetensors (tokens [B, T] int32 and the PyTorch logits [B, T, V] float32),
so tests can import the checkpoint into bmoe and compare logits.
"""
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import bmoe_torch  # noqa: E402


def hf_names(state, style):
    out = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(w[123])", name)
        if m:
            layer, w = m.groups()
            for e in range(tensor.shape[0]):
                if style == "mixtral":
                    out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = tensor[e]
                else:
                    proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[w]
                    out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = tensor[e]
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", name)
        if m and style == "olmoe":
            out[f"model.layers.{m.group(1)}.mlp.gate.weight"] = tensor
            continue
        out[name] = tensor
    return out


def main():
    out_dir, style, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.manual_seed(0)
    model = bmoe_torch.BmoeModel(config).float()
    generator = torch.Generator().manual_seed(1)
    model.init_weights(generator)
    tokens = torch.randint(0, config["vocab_size"], (2, 9), generator=generator)
    with torch.no_grad():
        logits = model(tokens).logits
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    os.makedirs(out_dir, exist_ok=True)
    bmoe_torch.save_safetensors(os.path.join(out_dir, "model.safetensors"), hf_names(state, style))
    bmoe_torch.save_safetensors(os.path.join(out_dir, "expected.safetensors"),
                                {"tokens": tokens.to(torch.int32), "logits": logits.float()})


if __name__ == "__main__":
    main()
