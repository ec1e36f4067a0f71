"""Mixture-of-experts feed-forward layer whose dispatch keeps DP-SGD per-sample gradients right.

Opacus takes the first dimension of every trainable module's input as the sample dimension.
The usual MoE dispatch flattens batch x tokens before the experts; with Opacus that either
fails or, worse, silently clips per *token* instead of per sample (the privacy guarantee
would then be false). So this layer never flattens: for each expert it gathers, per sample,
the tokens routed to that expert into a ``[B, C, D]`` tensor (C = the largest per-sample
load for that expert, padding with zero vectors at gate 0), runs the expert on it, and
scatter-adds the gate-weighted outputs back. Padding is exactly zero in and out, so it adds
nothing to outputs or gradients, even where a real token would overflow the expert; every
sample's output and gradient depends only on that sample.

Every expert is called on every forward, even when nothing routes to it (then with one
zero padding slot per sample): a trainable module that is skipped leaves Opacus without
activations for it and breaks the step. See ``/work/shared/notes/dp-on-moe.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.lora import new_module

Device = torch.device | str | None


class Expert(nn.Module):
    """SwiGLU feed-forward network: ``w_down(silu(w_gate(x)) * w_up(x))``, no biases."""

    def __init__(self, d_model: int, hidden: int, device: Device = None) -> None:
        super().__init__()
        self.w_gate = new_module(nn.Linear, d_model, hidden, bias=False, device=device)
        self.w_up = new_module(nn.Linear, d_model, hidden, bias=False, device=device)
        self.w_down = new_module(nn.Linear, hidden, d_model, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Router(nn.Module):
    """Linear router with softmax, top-k selection and gates renormalised over the top k.

    Returns ``(gates[B,S,k], experts[B,S,k], probs[B,S,E])``; ``probs`` (all experts) feeds
    the load-balancing loss. The softmax runs in float32 for stable routing in low precision.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, device: Device = None) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be in 1..n_experts ({n_experts})")
        self.n_experts = n_experts
        self.top_k = top_k
        self.proj = new_module(nn.Linear, d_model, n_experts, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.proj(x).float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return gates.to(x.dtype), top_i, probs


class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts with batch-preserving sparse dispatch.

    ``forward(x[B,S,D]) -> (y[B,S,D], aux[B])``. ``aux`` is the Switch Transformer
    load-balancing loss ``E * sum_e f_e * P_e`` computed *per sample* (f and P over that
    sample's tokens), so a total loss built from it stays a sum of per-sample terms, which
    DP-SGD's per-sample clipping needs. ``f_e`` is the fraction of the sample's k * S routing
    slots that went to expert e (not differentiable), ``P_e`` the mean router probability of
    e; a perfectly balanced sample gives 1.0, and aux is always >= 0.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, device: Device = None) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.router = Router(d_model, n_experts, top_k, device=device)
        self.experts = nn.ModuleList(Expert(d_model, hidden, device=device) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3:
            raise ValueError(f"MoELayer expects x of shape [B, S, D], got {tuple(x.shape)}")
        b, s, d = x.shape
        n_exp = self.n_experts
        gates, top_i, probs = self.router(x)

        # Dense [B, S, E] views of the routing: which expert each token uses and with what gate.
        routed = torch.zeros(b, s, n_exp, dtype=torch.bool, device=x.device).scatter_(-1, top_i, True)
        combine = torch.zeros(b, s, n_exp, dtype=gates.dtype, device=x.device).scatter(-1, top_i, gates)

        # Per-sample load balancing loss, shape [B].
        frac = routed.to(probs.dtype).mean(dim=1) / self.top_k
        mean_p = probs.mean(dim=1)
        aux = n_exp * (frac * mean_p).sum(dim=-1)

        # Per (sample, expert): token positions with the routed ones first, in token order.
        routed_t = routed.transpose(1, 2)  # [B, E, S]
        order = torch.argsort((~routed_t).to(torch.int8), dim=-1, stable=True)
        # Capacity per expert: the largest per-sample load, at least 1 so that every expert
        # runs (zero gates) even when nothing routes to it; B = 0 has no loads at all.
        capacities = routed_t.sum(dim=-1).amax(dim=0).clamp(min=1).tolist() if b > 0 else [1] * n_exp
        combine_t = combine.transpose(1, 2)  # [B, E, S]

        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            cap = int(capacities[e])
            pos = order[:, e, :cap]  # [B, C]; beyond a sample's own load: gate-0 padding
            gate = combine_t[:, e].gather(1, pos)  # [B, C]
            index = pos.unsqueeze(-1).expand(b, cap, d)
            # Padding slots get zero vectors, not the sample's unrouted tokens: a bias-free
            # SwiGLU maps 0 to exactly 0 (with zero activations), whereas a real token could
            # overflow there, and inf x gate 0 is NaN. How many padding slots a sample gets
            # depends on the other samples' loads, so a NaN there would make one sample's
            # output (and DP-SGD's clipped sum) depend on who else is in the batch.
            slot_used = routed_t[:, e].gather(1, pos).unsqueeze(-1)  # [B, C, 1]
            inputs = torch.where(slot_used, x.gather(1, index), torch.zeros((), dtype=x.dtype, device=x.device))
            out = expert(inputs)  # [B, C, D]: batch dimension preserved for Opacus
            y = y.scatter_add(1, index, out * gate.unsqueeze(-1))
        return y, aux.to(x.dtype)
