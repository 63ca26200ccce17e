"""bmoe_torch.py -- an independent PyTorch implementation of the bmoe MoE transformer.

The model is written from the model definition (README "The loss", model/params.h), not from the
C++ code, so it can serve as an oracle: tests compare the C++ CPU/CUDA backends against it, the
benchmarks time it as the PyTorch-eager baseline, and checkpoint tools reuse its safetensors I/O.

    from bmoe_torch import BmoeModel, load_safetensors, save_safetensors
    model = BmoeModel({"vocab_size": 256, "d_model": 256, ...})      # ModelConfig field names
    out = model(tokens, targets, aux_coef=0.01, zloss_coef=0.001)      # tokens/targets [B, T]
    out.total.backward()

state_dict() keys are exactly bmoe's parameter names (Hugging Face Mixtral layout), e.g.
``model.layers.0.block_sparse_moe.experts.w1`` [E, F, D]. Definitions:

- layer: x += o_proj(attn(norm1(x))); x += ffn(norm2(x)); then final norm and lm_head
  (tied to embed_tokens when tie_embeddings).
- attention: causal, grouped-query (query head h reads kv head h // (H / KV)), scale 1/sqrt(Hd),
  RoPE in the HF rotate_half convention on q and k, or learned positions added to the embedding.
- MoE: probs = softmax(x W_r^T); top-k probs (descending, ties to the lower index) are the gates,
  renormalised to sum 1 when router_renormalize; y = sum_k gate_k * expert_k(x).
- loss = CE (mean over targets >= 0) + aux_coef * mean_l aux_l + zloss_coef * mean_l z_l with
  aux_l = E * sum_e f_e P_e (f_e = share of routed copies, a constant; P_e = mean prob) and
  z_l = mean_n logsumexp(router logits_n)^2.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ModelConfig defaults (model/config.h); a config dict only needs the fields it changes.
DEFAULT_CONFIG: Dict[str, Any] = {
    "vocab_size": 256,
    "max_seq_len": 256,
    "d_model": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 4,
    "num_experts": 8,
    "top_k": 2,
    "expert_hidden": 512,
    "moe_every": 1,
    "dense_hidden": 1024,
    "tie_embeddings": False,
    "norm": "rmsnorm",
    "position": "rope",
    "activation": "swiglu",
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "router_renormalize": True,
    "capacity_factor": 0.0,
    "init_std": 0.02,
}


def full_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The config with defaults filled in; rejects unknown keys and bad enum values."""
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    c = dict(DEFAULT_CONFIG)
    c.update(config)
    for key, allowed in (("norm", ("rmsnorm", "layernorm")), ("position", ("rope", "learned")),
                         ("activation", ("swiglu", "gelu"))):
        if c[key] not in allowed:
            raise ValueError(f"model.{key} must be one of {allowed} (got {c[key]!r})")
    if c["d_model"] % c["num_heads"] or c["num_heads"] % c["num_kv_heads"]:
        raise ValueError("num_heads must divide d_model and num_kv_heads must divide num_heads")
    return c


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """Layer l is MoE when l % moe_every == moe_every - 1 (moe_every = 0: no MoE layers)."""
    every = config["moe_every"]
    return every > 0 and layer % every == every - 1


# ---------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: Mapping[str, Any]) -> nn.Module:
    if config["norm"] == "rmsnorm":
        return RMSNorm(config["d_model"], config["norm_eps"])
    return nn.LayerNorm(config["d_model"], eps=config["norm_eps"])


def rope_cos_sin(T: int, head_dim: int, theta: float, dtype: torch.dtype,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, Hd]: angle(t, i) = t * theta^(-2i/Hd), repeated for both halves."""
    half = head_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE on x [B, heads, T, Hd]: element i pairs with i + Hd/2."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with optional RoPE."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        D, H, KV = config["d_model"], config["num_heads"], config["num_kv_heads"]
        self.H, self.KV, self.Hd = H, KV, D // H
        self.rope_theta = config["rope_theta"] if config["position"] == "rope" else None
        self.q_proj = nn.Linear(D, H * self.Hd, bias=False)
        self.k_proj = nn.Linear(D, KV * self.Hd, bias=False)
        self.v_proj = nn.Linear(D, KV * self.Hd, bias=False)
        self.o_proj = nn.Linear(H * self.Hd, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.Hd).transpose(1, 2)   # [B, H, T, Hd]
        k = self.k_proj(x).view(B, T, self.KV, self.Hd).transpose(1, 2)  # [B, KV, T, Hd]
        v = self.v_proj(x).view(B, T, self.KV, self.Hd).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(T, self.Hd, self.rope_theta, x.dtype, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.H // self.KV
        k = k.repeat_interleave(group, dim=1)  # query head h -> kv head h // group
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.Hd)  # [B, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # [B, H, T, Hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.Hd))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class DenseMlp(nn.Module):
    """Dense FFN: swiglu down(silu(gate(x)) * up(x)) or gelu down(gelu(up(x)))."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        D, Fd = config["d_model"], config["dense_hidden"]
        self.swiglu = config["activation"] == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(D, Fd, bias=False)
        self.up_proj = nn.Linear(D, Fd, bias=False)
        self.down_proj = nn.Linear(Fd, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = gelu_tanh(self.up_proj(x))
        return self.down_proj(hidden)


class Experts(nn.Module):
    """E stacked expert MLPs: w1, w3 [E, F, D] (w1 = gate, swiglu only), w2 [E, D, F]."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        E, D, Fh = config["num_experts"], config["d_model"], config["expert_hidden"]
        self.swiglu = config["activation"] == "swiglu"
        if self.swiglu:
            self.w1 = nn.Parameter(torch.empty(E, Fh, D))
        self.w3 = nn.Parameter(torch.empty(E, Fh, D))
        self.w2 = nn.Parameter(torch.empty(E, D, Fh))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [R, D] -> [R, D]."""
        if self.swiglu:
            hidden = F.silu(x @ self.w1[e].t()) * (x @ self.w3[e].t())
        else:
            hidden = gelu_tanh(x @ self.w3[e].t())
        return hidden @ self.w2[e].t()


class SparseMoe(nn.Module):
    """Softmax top-k router + experts. forward returns (y [N, D], aux, z, expert_counts [E])."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.E, self.K = config["num_experts"], config["top_k"]
        self.renormalize = bool(config["router_renormalize"])
        self.capacity_factor = float(config["capacity_factor"])
        self.gate = nn.Linear(config["d_model"], self.E, bias=False)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        N = x.shape[0]
        logits = self.gate(x)  # [N, E]
        probs = logits.softmax(dim=-1)
        # Descending, stable: among equal probs the lower expert index comes first.
        order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices
        topk_idx = order[:, : self.K]  # [N, K]
        gates = probs.gather(1, topk_idx)  # [N, K]
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)

        y = torch.zeros_like(x)
        flat_idx = topk_idx.reshape(-1)  # copy c = n*K + k
        # Capacity: each expert keeps its first C copies in (token, slot) order; 0 = dropless.
        capacity = math.ceil(self.capacity_factor * N * self.K / self.E) if self.capacity_factor > 0 else None
        for e in range(self.E):
            copies = (flat_idx == e).nonzero(as_tuple=True)[0]
            if capacity is not None:
                copies = copies[:capacity]
            if copies.numel() == 0:
                continue
            tokens = copies // self.K
            out = self.experts.expert(e, x[tokens]) * gates.reshape(-1)[copies, None]
            y = y.index_add(0, tokens, out)

        counts = torch.bincount(flat_idx, minlength=self.E).to(x.dtype)  # constant: no gradient
        f = counts / (N * self.K)
        P = probs.mean(dim=0)
        aux = self.E * (f * P).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y, aux, z, counts


class DecoderLayer(nn.Module):
    def __init__(self, config: Mapping[str, Any], layer: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.is_moe = is_moe_layer(config, layer)
        if self.is_moe:
            self.block_sparse_moe = SparseMoe(config)
        else:
            self.mlp = DenseMlp(config)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        B, T, D = h.shape
        y, aux, z, _ = self.block_sparse_moe(h.reshape(B * T, D))
        return x + y.view(B, T, D), (aux, z)


class Backbone(nn.Module):
    """The ``model.`` prefix of the HF names: embeddings, layers, final norm."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["d_model"])
        if config["position"] == "learned":
            self.embed_positions = nn.Embedding(config["max_seq_len"], config["d_model"])
        self.layers = nn.ModuleList(DecoderLayer(config, l) for l in range(config["num_layers"]))
        self.norm = make_norm(config)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    ce: torch.Tensor      # scalar: mean CE over targets >= 0 (0 when none)
    aux: torch.Tensor     # scalar: mean over MoE layers of the load-balancing loss (0 without MoE)
    z: torch.Tensor       # scalar: mean over MoE layers of the router z-loss
    total: torch.Tensor   # ce + aux_coef * aux + zloss_coef * z


class BmoeModel(nn.Module):
    """The bmoe decoder-only MoE transformer; parameter names match bmoe's ParameterLayout."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = full_config(config)
        self.model = Backbone(self.config)
        if not self.config["tie_embeddings"]:
            self.lm_head = nn.Linear(self.config["d_model"], self.config["vocab_size"], bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """bmoe's scheme (not its exact values): N(0, init_std) for weights, output projections
        (o_proj, w2, down_proj) N(0, init_std / sqrt(2L)), norm weights 1, biases 0."""
        std = self.config["init_std"]
        scaled = std / math.sqrt(2.0 * self.config["num_layers"])
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith(("o_proj.weight", "experts.w2", "down_proj.weight")):
                p.normal_(0.0, scaled, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config["tie_embeddings"] else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                aux_coef: float = 0.01, zloss_coef: float = 0.001) -> ModelOutput:
        """tokens, targets: integer [B, T]; targets < 0 are ignored (None: losses from aux/z only)."""
        tokens = tokens.long()
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        if self.config["position"] == "learned":
            if T > self.config["max_seq_len"]:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config['max_seq_len']}")
            x = x + self.model.embed_positions.weight[:T][None]
        aux_parts, z_parts = [], []
        for layer in self.model.layers:
            x, router_losses = layer(x)
            if router_losses is not None:
                aux_parts.append(router_losses[0])
                z_parts.append(router_losses[1])
        logits = self.model.norm(x) @ self.lm_head_weight().t()  # [B, T, V]

        zero = logits.new_zeros(())
        aux = torch.stack(aux_parts).mean() if aux_parts else zero
        z = torch.stack(z_parts).mean() if z_parts else zero
        ce = zero
        if targets is not None:
            targets = targets.long().reshape(-1)
            valid = targets >= 0
            nll = F.cross_entropy(logits.reshape(B * T, -1), targets.clamp(min=0), reduction="none")
            ce = (nll * valid).sum() / valid.sum().clamp(min=1)
        return ModelOutput(logits, ce, aux, z, ce + aux_coef * aux + zloss_coef * z)


# ---------------------------------------------------------------------------------------------
# safetensors (pure Python: json + numpy; the `safetensors` package is not a dependency)

_NP_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _NP_DTYPES.items()}


def load_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Reads a safetensors file -> ({name: numpy array}, metadata). BF16 is widened to float32."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file size")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: tensor {name!r} data_offsets out of range")
        shape = tuple(info["shape"])
        raw = data[begin:end]
        if info["dtype"] != "BF16" and info["dtype"] not in _NP_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(_NP_DTYPES[info["dtype"]]).newbyteorder("<"))
        tensors[name] = array.reshape(shape).copy()
    return tensors, dict(metadata)


def save_safetensors(path: str, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes {name: numpy array or torch tensor} (+ string metadata) as a safetensors file."""
    arrays = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.ascontiguousarray(value)
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {array.dtype}")
        arrays[name] = array
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in sorted(arrays):
        array = arrays[name]
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in sorted(arrays):
            f.write(arrays[name].astype(arrays[name].dtype.newbyteorder("<"), copy=False).tobytes())


def load_state(model: BmoeModel, tensors: Mapping[str, np.ndarray], strict: bool = True) -> None:
    """Copies bmoe-named arrays into the model (converted to the model's dtype)."""
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    if strict and missing:
        raise KeyError(f"missing parameters: {missing}")
    with torch.no_grad():
        for name, param in state.items():
            if name not in tensors:
                continue
            value = torch.from_numpy(np.asarray(tensors[name]))
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != model's {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
