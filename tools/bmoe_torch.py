"""bmoe_torch.py -- an independent PyTorch implementation of the bmoe MoE transformer.

The model is written from the model definition (README "The loss", model/params.h,
docs/routers.md), not from the C++ code, so it can serve as an oracle: tests compare the C++
CPU/CUDA backends against it (autograd gives the gradients the C++ computes by hand), the
benchmarks time it as the PyTorch-eager baseline, and checkpoint tools reuse its safetensors I/O.

    from bmoe_torch import BmoeModel, load_safetensors, save_safetensors
    model = BmoeModel({"vocab_size": 256, "d_model": 256, ...,        # ModelConfig field names
                       "router": {"type": "logit_fc", "train_samples": 2}})  # RouterConfig fields
    out = model(tokens, targets, aux_coef=0.01, zloss_coef=0.001,     # tokens/targets [B, T]
                router_reg_coef=1e-3, noise={1: {"eps": eps}})          # noise: optional, per layer
    out.total.backward()

state_dict() keys are exactly bmoe's parameter names (Hugging Face Mixtral layout), e.g.
``model.layers.0.block_sparse_moe.experts.w1`` [E, F, D], ``...block_sparse_moe.gate.weight``
[E, D] and the router family's own tensors under ``...block_sparse_moe.router.``. Definitions:

- layer: x += o_proj(attn(norm1(x))); x += ffn(norm2(x)); then final norm and lm_head
  (tied to embed_tokens when tie_embeddings).
- attention: causal, grouped-query (query head h reads kv head h // (H / KV)), scale 1/sqrt(Hd),
  RoPE in the HF rotate_half convention on q and k, or learned positions added to the embedding.
- MoE routing (docs/routers.md, TRAINING mode: S = router.train_samples where the family samples
  logits, else 1): l_det = x W_r^T; the family gives logit samples l^s [S, N, E], a temperature T
  (1, router.temperature, or vtsr's T(x) per token), the mean logits mu and its regulariser;
  p^s = softmax(l^s / T), pbar = mean_s p^s; score = log pbar (+ Gumbel noise for temp_sampling
  and vtsr: Sample-K) (+ the aux-free selection bias); the top-k of the score (ties to the lower
  index; the selection itself has no gradient) are the experts, gates = pbar[idx] renormalised
  to sum 1 when router_renormalize; y = sum_k gate_k * expert_k(x). Capacity: each expert keeps
  its first C = ceil(capacity_factor * N * K / E) copies in (token, slot) order.
  Families (Router subclasses below): topk / swag (l = l_det), temp_sampling, mc_dropout,
  ensemble, weight_mfvi, logit_mf, logit_fc, vtsr. Their noise (eps [S, N, E], dropout_mask
  [S, N, D], gumbel [N, E], member [N]) is read from the `noise` argument when given (to
  reproduce a C++ forward exactly), else drawn from torch's RNG.
  Inference-time routing (eval_samples, SWAG weight sampling, ensemble averaging, mean mode)
  is not modelled here.
- loss = CE (mean over targets >= 0) + aux_coef * mean_l aux_l + zloss_coef * mean_l z_l
  + router_reg_coef * sum_l reg_l with aux_l = E * sum_e f_e P_e (f_e = share of routed copies
  before capacity dropping, a constant; P_e = mean_n pbar[n, e]), z_l = mean_n logsumexp(mu_n)^2
  and reg_l = (sum_n reg_n + weight-space KL) / N.
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
    "router": {},  # RouterConfig fields (DEFAULT_ROUTER_CONFIG); {} = the topk router
}

# RouterConfig defaults (model/router_config.h).
DEFAULT_ROUTER_CONFIG: Dict[str, Any] = {
    "type": "topk",
    "train_samples": 1,
    "eval_samples": 8,
    "temperature": 1.5,
    "dropout": 0.1,
    "ensemble_size": 4,
    "swag_rank": 8,
    "swag_every": 10,
    "swag_start": 0,
    "weight_sigma_init": 1e-3,
    "weight_prior_std": 0.1,
    "hidden": 64,
    "sigma_init": 0.1,
    "sigma_min": 1e-4,
    "prior_std": 1.0,
    "temp_min": 0.5,
    "temp_max": 2.0,
    "selection_bias_rate": 0.0,
}
ROUTER_TYPES = ("topk", "temp_sampling", "mc_dropout", "swag", "ensemble", "weight_mfvi", "logit_mf",
                "logit_fc", "vtsr")


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
    router = dict(c["router"] or {})
    unknown = set(router) - set(DEFAULT_ROUTER_CONFIG)
    if unknown:
        raise ValueError(f"unknown router config keys: {sorted(unknown)}")
    c["router"] = {**DEFAULT_ROUTER_CONFIG, **router}
    if c["router"]["type"] not in ROUTER_TYPES:
        raise ValueError(f"router.type must be one of {ROUTER_TYPES} (got {c['router']['type']!r})")
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
    """Causal grouped-query self-attention with optional RoPE. use_sdpa: the softmax(QK^T)V core
    through F.scaled_dot_product_attention (fused kernels on GPUs: the fast eager baseline in
    bench/torch_bench.py) instead of the explicit [B, H, T, T] scores that the tests compare."""

    use_sdpa = False

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
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.Hd))
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


# ---------------------------------------------------------------------------------------------
# routers (docs/routers.md): every family produces logit samples l^s; route() does the rest


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), = x above 20 (as the C++)."""
    return F.softplus(x, beta=1.0, threshold=20.0)


def softplus_inverse(y: float) -> float:
    return y if y > 20.0 else math.log(math.expm1(y))


@dataclass
class LogitSamples:
    """What a router family hands to route() for N tokens, E experts, S samples."""
    logits: torch.Tensor                  # [S, N, E] l^s, before the temperature
    mu: torch.Tensor                      # [N, E] mean logits (the z-loss is on them)
    temperature: Any = 1.0                # 1.0, or a [N, 1] tensor
    reg_sum: Optional[torch.Tensor] = None  # sum_n reg_n (+ the weight-space KL); None: no regulariser
    gumbel: Optional[torch.Tensor] = None   # [N, E] Gumbel noise added to the score (Sample-K)


class _Weight(nn.Module):
    """Holds one parameter named ``weight`` (for names like ``router.ensemble.weight``)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


def _noise(noise: Optional[Mapping[str, torch.Tensor]], key: str, shape: Tuple[int, ...],
           draw, like: torch.Tensor) -> torch.Tensor:
    """noise[key] (checked against `shape`), or a fresh draw() when the caller passed none."""
    if noise is not None and key in noise:
        value = torch.as_tensor(noise[key])
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"router noise {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value.to(device=like.device, dtype=like.dtype if value.is_floating_point() else value.dtype)
    return draw()


def _draw_gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like `like`."""
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device).clamp_min(1e-30)
    return -torch.log(-torch.log(u))


class Router(nn.Module):
    """Base router: parameters live under ``block_sparse_moe.router.`` (gate.weight is the
    SparseMoe's). sample() returns the family's LogitSamples for x [N, D] in TRAINING mode
    (S = router.train_samples where the family samples logits; 1 otherwise)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.rc = dict(config["router"])
        self.E, self.D = config["num_experts"], config["d_model"]

    def num_samples(self) -> int:
        return 1

    @torch.no_grad()
    def init_parameters(self, std: float, generator: Optional[torch.Generator] = None) -> None:
        """bmoe's initial values for the family's own tensors (model/params.cpp)."""

    def sample(self, x: torch.Tensor, ldet: torch.Tensor, gate_weight: torch.Tensor,
               noise: Optional[Mapping[str, torch.Tensor]]) -> LogitSamples:
        raise NotImplementedError


class TopKRouter(Router):
    """topk and swag (SWAG trains the weights as topk; it samples only at inference): l = l_det."""

    def sample(self, x, ldet, gate_weight, noise):
        return LogitSamples(ldet[None], ldet)


class TempSamplingRouter(Router):
    """l = l_det, fixed T = router.temperature, Sample-K: Gumbel noise on the score."""

    def sample(self, x, ldet, gate_weight, noise):
        N, E = ldet.shape
        gumbel = _noise(noise, "gumbel", (N, E), lambda: _draw_gumbel(ldet), ldet)
        return LogitSamples(ldet[None], ldet, float(self.rc["temperature"]), gumbel=gumbel)


class McDropoutRouter(Router):
    """l^s = (m^s * x) W_r^T, m^s_d in {0, 1/(1-p)}; mu = l_det (no dropout)."""

    def num_samples(self) -> int:
        return int(self.rc["train_samples"])

    def sample(self, x, ldet, gate_weight, noise):
        S, (N, D), p = self.num_samples(), x.shape, float(self.rc["dropout"])

        def draw():
            keep = torch.rand(S, N, D, dtype=x.dtype, device=x.device) >= p
            return keep.to(x.dtype) / (1.0 - p)
        mask = _noise(noise, "dropout_mask", (S, N, D), draw, x)
        return LogitSamples((mask * x[None]) @ gate_weight.t(), ldet)


class EnsembleRouter(Router):
    """M routers (member 0 = gate.weight, 1..M-1 = router.ensemble.weight [M-1, E, D]); in training
    token n is routed by member m(n) alone: l = mu = member m(n)'s logits."""

    def __init__(self, config):
        super().__init__(config)
        self.M = int(self.rc["ensemble_size"])
        self.ensemble = _Weight(self.M - 1, self.E, self.D)

    @torch.no_grad()
    def init_parameters(self, std, generator=None):
        self.ensemble.weight.normal_(0.0, std, generator=generator)

    def sample(self, x, ldet, gate_weight, noise):
        N = x.shape[0]
        member = _noise(noise, "member", (N,), lambda: torch.randint(self.M, (N,), device=x.device), x).long()
        members = torch.cat([ldet[None], torch.einsum("nd,med->mne", x, self.ensemble.weight)])  # [M, N, E]
        chosen = members[member, torch.arange(N, device=x.device)]  # [N, E]
        return LogitSamples(chosen[None], chosen)


class WeightMfviRouter(Router):
    """Mean-field Gaussian weights N(gate.weight, softplus(router.weight_rho)^2), local
    reparameterisation: l^s = x mu_W^T + sqrt((x*x) (sigma_W^2)^T + 1e-12) * eps^s; mu = l_det.
    reg = KL(q(W) || N(0, weight_prior_std^2)) over all E*D weights (divided by N in route)."""

    def __init__(self, config):
        super().__init__(config)
        self.weight_rho = nn.Parameter(torch.empty(self.E, self.D))

    def num_samples(self) -> int:
        return int(self.rc["train_samples"])

    @torch.no_grad()
    def init_parameters(self, std, generator=None):
        self.weight_rho.fill_(softplus_inverse(float(self.rc["weight_sigma_init"])))

    def sample(self, x, ldet, gate_weight, noise):
        S, (N, E) = self.num_samples(), ldet.shape
        sigma_w = softplus(self.weight_rho)
        sd = torch.sqrt((x * x) @ (sigma_w * sigma_w).t() + 1e-12)  # [N, E]
        eps = _noise(noise, "eps", (S, N, E), lambda: torch.randn(S, N, E, dtype=x.dtype, device=x.device), x)
        sp = float(self.rc["weight_prior_std"])
        kl = (math.log(sp) - torch.log(sigma_w) + (sigma_w ** 2 + gate_weight ** 2) / (2 * sp * sp) - 0.5).sum()
        return LogitSamples(ldet[None] + sd[None] * eps, ldet, reg_sum=kl)


class LogitGaussianRouter(Router):
    """logit_mf / logit_fc (VGLR): z = gelu_tanh(x A^T), dmu = z B_mu^T, raw = z B^T + b;
    MF: sigma = softplus(raw) + sigma_min, l^s = mu + sigma * eps^s;
    FC: L lower-triangular from raw packed row-major ((i, j) at i(i+1)/2 + j), diagonal
        softplus(raw_ii) + sigma_min, l^s = mu + L eps^s;
    mu = l_det + dmu; reg_n = KL(N(dmu, L L^T) || N(0, prior_std^2 I))
         = sum_e [log prior_std - log L_ee + (sum_j L_ej^2 + dmu_e^2) / (2 prior_std^2) - 1/2]."""

    def __init__(self, config, full_covariance: bool):
        super().__init__(config)
        self.fc = full_covariance
        R, E = int(self.rc["hidden"]), self.E
        self.P = E * (E + 1) // 2 if self.fc else E
        self.trunk = nn.Linear(self.D, R, bias=False)
        self.mean_head = nn.Linear(R, E, bias=False)
        self.head_name = "chol_head" if self.fc else "scale_head"
        setattr(self, self.head_name, nn.Linear(R, self.P))

    def num_samples(self) -> int:
        return int(self.rc["train_samples"])

    def head(self) -> nn.Linear:
        return getattr(self, self.head_name)

    @torch.no_grad()
    def init_parameters(self, std, generator=None):
        self.trunk.weight.normal_(0.0, std, generator=generator)
        self.mean_head.weight.zero_()
        self.head().weight.zero_()
        b = softplus_inverse(float(self.rc["sigma_init"]) - float(self.rc["sigma_min"]))
        if self.fc:
            rows, cols = torch.tril_indices(self.E, self.E)
            self.head().bias.copy_(torch.where(rows == cols, b, 0.0))
        else:
            self.head().bias.fill_(b)

    def sample(self, x, ldet, gate_weight, noise):
        S, (N, E) = self.num_samples(), ldet.shape
        sigma_min, sp = float(self.rc["sigma_min"]), float(self.rc["prior_std"])
        z = gelu_tanh(self.trunk(x))
        dmu = self.mean_head(z)
        raw = self.head()(z)  # [N, P]
        mu = ldet + dmu
        eps = _noise(noise, "eps", (S, N, E), lambda: torch.randn(S, N, E, dtype=x.dtype, device=x.device), x)
        if self.fc:
            rows, cols = torch.tril_indices(E, E, device=x.device)  # row-major packing order
            entries = torch.where(rows == cols, softplus(raw) + sigma_min, raw)
            L = raw.new_zeros(N, E, E).index_put((torch.arange(N, device=x.device)[:, None], rows, cols), entries)
            logits = mu[None] + torch.einsum("nij,snj->sni", L, eps)
            diag = torch.diagonal(L, dim1=-2, dim2=-1)
            row_sq = (L * L).sum(-1)
        else:
            sigma = softplus(raw) + sigma_min
            logits = mu[None] + sigma[None] * eps
            diag, row_sq = sigma, sigma * sigma
        kl = math.log(sp) - torch.log(diag) + (row_sq + dmu * dmu) / (2 * sp * sp) - 0.5  # [N, E]
        return LogitSamples(logits, mu, reg_sum=kl.sum())


class VtsrRouter(Router):
    """l = l_det, per-token T = temp_min + (temp_max - temp_min) * sigmoid(x w_T + b_T)
    (router.temperature.{weight [1, D], bias [1]}), Sample-K; reg_n = -log T."""

    def __init__(self, config):
        super().__init__(config)
        self.temperature = nn.Linear(self.D, 1)

    @torch.no_grad()
    def init_parameters(self, std, generator=None):
        lo, hi = float(self.rc["temp_min"]), float(self.rc["temp_max"])
        self.temperature.weight.zero_()
        self.temperature.bias.fill_(math.log((1.0 - lo) / (hi - 1.0)))  # T = 1

    def sample(self, x, ldet, gate_weight, noise):
        N, E = ldet.shape
        lo, hi = float(self.rc["temp_min"]), float(self.rc["temp_max"])
        T = lo + (hi - lo) * torch.sigmoid(self.temperature(x))  # [N, 1]
        gumbel = _noise(noise, "gumbel", (N, E), lambda: _draw_gumbel(ldet), ldet)
        return LogitSamples(ldet[None], ldet, T, reg_sum=(-torch.log(T)).sum(), gumbel=gumbel)


def make_router(config: Mapping[str, Any]) -> Router:
    kind = config["router"]["type"]
    if kind in ("topk", "swag"):
        return TopKRouter(config)
    if kind == "temp_sampling":
        return TempSamplingRouter(config)
    if kind == "mc_dropout":
        return McDropoutRouter(config)
    if kind == "ensemble":
        return EnsembleRouter(config)
    if kind == "weight_mfvi":
        return WeightMfviRouter(config)
    if kind in ("logit_mf", "logit_fc"):
        return LogitGaussianRouter(config, full_covariance=kind == "logit_fc")
    if kind == "vtsr":
        return VtsrRouter(config)
    raise ValueError(f"unknown router type {kind!r}")


def route(samples: LogitSamples, K: int, renormalize: bool,
          selection_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared skeleton: p^s = softmax(l^s / T), pbar = mean_s p^s, score = log pbar (+ Gumbel)
    (+ selection bias), idx = top-K(score) with ties to the lower index (not differentiated),
    gates = pbar[idx] (renormalised over the K: a softmax of the selected log pbar).
    Returns (topk_idx [N, K], gates [N, K], pbar [N, E])."""
    logp = torch.log_softmax(samples.logits / samples.temperature, dim=-1)  # [S, N, E]
    S = logp.shape[0]
    log_pbar = logp[0] if S == 1 else torch.logsumexp(logp, dim=0) - math.log(S)
    score = log_pbar.detach()  # S = 1: l/T - logsumexp, the same ranking as l/T
    if samples.gumbel is not None:
        score = score + samples.gumbel
    if selection_bias is not None:
        score = score + selection_bias
    topk_idx = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :K]
    selected = log_pbar.gather(1, topk_idx)
    gates = selected.softmax(dim=-1) if renormalize else selected.exp()
    return topk_idx, gates, log_pbar.exp()


class SparseMoe(nn.Module):
    """Router (gate.weight + the family's router.* tensors) + experts.
    forward returns (y [N, D], aux, z, reg, expert_counts [E])."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.E, self.K = config["num_experts"], config["top_k"]
        self.renormalize = bool(config["router_renormalize"])
        self.capacity_factor = float(config["capacity_factor"])
        self.gate = nn.Linear(config["d_model"], self.E, bias=False)
        self.router = make_router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor, noise: Optional[Mapping[str, torch.Tensor]] = None,
                selection_bias: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        N = x.shape[0]
        ldet = self.gate(x)  # [N, E]
        samples = self.router.sample(x, ldet, self.gate.weight, noise)
        topk_idx, gates, pbar = route(samples, self.K, self.renormalize, selection_bias)

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
            y = y.index_add(0, tokens, out.to(y.dtype))  # bf16 under autocast

        counts = torch.bincount(flat_idx, minlength=self.E).to(x.dtype)  # constant: no gradient
        f = counts / (N * self.K)
        P = pbar.mean(dim=0)
        aux = self.E * (f * P).sum()
        z = torch.logsumexp(samples.mu, dim=-1).pow(2).mean()
        reg = samples.reg_sum / N if samples.reg_sum is not None else x.new_zeros(())
        return y, aux, z, reg, counts


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

    def forward(self, x: torch.Tensor, noise: Optional[Mapping[str, torch.Tensor]] = None,
                selection_bias: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        B, T, D = h.shape
        y, aux, z, reg, _ = self.block_sparse_moe(h.reshape(B * T, D), noise, selection_bias)
        return x + y.view(B, T, D), (aux, z, reg)


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
    total: torch.Tensor   # ce + aux_coef * aux + zloss_coef * z + router_reg_coef * reg
    reg: torch.Tensor     # scalar: sum over MoE layers of the router regulariser (0 for topk)


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
        for layer in self.model.layers:  # the router families' own initial values
            if layer.is_moe:
                layer.block_sparse_moe.router.init_parameters(std, generator)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config["tie_embeddings"] else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                aux_coef: float = 0.01, zloss_coef: float = 0.001, router_reg_coef: float = 0.0,
                noise: Optional[Mapping[int, Mapping[str, torch.Tensor]]] = None,
                selection_bias: Optional[Mapping[int, torch.Tensor]] = None) -> ModelOutput:
        """tokens, targets: integer [B, T]; targets < 0 are ignored (None: losses from aux/z only).
        noise: {layer index: {"eps" | "dropout_mask" | "gumbel" | "member": tensor}}, the routing
        noise of each MoE layer over its N = B*T tokens (missing: drawn from torch's RNG).
        selection_bias: {layer index: [E]} aux-free selection bias added to the scores (default 0)."""
        tokens = tokens.long()
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        if self.config["position"] == "learned":
            if T > self.config["max_seq_len"]:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config['max_seq_len']}")
            x = x + self.model.embed_positions.weight[:T][None]
        aux_parts, z_parts, reg_parts = [], [], []
        for l, layer in enumerate(self.model.layers):
            layer_noise = noise.get(l) if noise is not None else None
            bias = selection_bias.get(l) if selection_bias is not None else None
            x, router_losses = layer(x, layer_noise, bias)
            if router_losses is not None:
                aux_parts.append(router_losses[0])
                z_parts.append(router_losses[1])
                reg_parts.append(router_losses[2])
        logits = self.model.norm(x) @ self.lm_head_weight().t()  # [B, T, V]

        zero = logits.new_zeros(())
        aux = torch.stack(aux_parts).mean() if aux_parts else zero
        z = torch.stack(z_parts).mean() if z_parts else zero
        reg = torch.stack(reg_parts).sum() if reg_parts else zero
        ce = zero
        if targets is not None:
            targets = targets.long().reshape(-1)
            valid = targets >= 0
            nll = F.cross_entropy(logits.reshape(B * T, -1), targets.clamp(min=0), reduction="none")
            ce = (nll * valid).sum() / valid.sum().clamp(min=1)
        total = ce + aux_coef * aux + zloss_coef * z + router_reg_coef * reg
        return ModelOutput(logits=logits, ce=ce, aux=aux, z=z, total=total, reg=reg)


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
