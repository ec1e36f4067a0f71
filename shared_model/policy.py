"""The shared policy: per-embodiment adapters around a mixture-of-experts transformer.

A short history of observations of one embodiment (proprioceptive state + goal/env state,
plus optional precomputed image features) goes in; an action chunk comes out (action
chunking as in ACT / pi0 / GR00T). Each embodiment owns an input encoder and an action
decoder (its ``adapter/emb/<name>`` shard); the transformer in between is shared.

Tokens: ``history`` observation tokens followed by ``chunk`` learned action-query tokens,
plus learned position embeddings; attention is bidirectional (the whole window is known
when the chunk is predicted). The action-query outputs are decoded into actions.

Parameter names are chosen so that ``shared_model.shards.shard_of`` can assign each to a
shard by name alone, e.g. ``blocks.3.moe.experts.17.w_gate.weight`` (expert/L3/E17),
``blocks.0.attn.q.lora_B.weight`` (adapter/shared), ``adapters.so100.encoder.0.weight``
(adapter/emb/so100).
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.config import EmbodimentConfig, ModelConfig
from shared_model.lora import LoRALinear, new_module, stable_seed
from shared_model.moe import Device, MoELayer

_EMBODIMENT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_INIT_STD = 0.02


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many modules.

    Why: every module allocates several containers, so constructing the ~94k modules of the
    trillion layout triggers many full collections, each scanning the whole growing heap;
    measured 9 s with the collector running vs 2.8 s paused. Nothing built here is garbage.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_embodiment_name(name: str) -> str:
    """Embodiment names become module keys and shard ids, so they may not contain '.' or '/'."""
    if not isinstance(name, str) or not _EMBODIMENT_NAME.match(name):
        raise ValueError(f"embodiment name {name!r} must be non-empty and use only letters, digits, '_' and '-'")
    return name


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with LoRA on the q and v projections."""

    def __init__(self, cfg: ModelConfig, layer: int, device: Device = None) -> None:
        super().__init__()
        d = cfg.d_model
        if d % cfg.n_heads:
            raise ValueError(f"d_model ({d}) must be divisible by n_heads ({cfg.n_heads})")
        self.n_heads = cfg.n_heads

        def lora(name: str) -> LoRALinear:
            base = new_module(nn.Linear, d, d, bias=False, device=device)
            seed = stable_seed(cfg.lora_seed, f"blocks.{layer}.attn.{name}")
            return LoRALinear(base, cfg.lora_rank, cfg.lora_alpha, seed)

        self.q = lora("q")
        self.k = new_module(nn.Linear, d, d, bias=False, device=device)
        self.v = lora("v")
        self.o = new_module(nn.Linear, d, d, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + moe(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, device: Device = None) -> None:
        super().__init__()
        self.ln_1 = new_module(nn.LayerNorm, cfg.d_model, device=device)
        self.attn = Attention(cfg, layer, device=device)
        self.ln_2 = new_module(nn.LayerNorm, cfg.d_model, device=device)
        self.moe = MoELayer(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.expert_hidden, device=device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln_1(x))
        y, aux = self.moe(self.ln_2(x))
        return x + y, aux


def _mlp(d_in: int, hidden: int, d_out: int, device: Device) -> nn.Sequential:
    first = new_module(nn.Linear, d_in, hidden, device=device)
    return nn.Sequential(first, nn.GELU(), new_module(nn.Linear, hidden, d_out, device=device))


class EmbodimentAdapter(nn.Module):
    """One robot body's input encoder, optional image-feature projection and action decoder.

    These are GR00T-style per-embodiment MLPs: they map a body's own state / action spaces
    to and from the shared ``d_model`` token space, and form the ``adapter/emb/<name>`` shard.
    """

    def __init__(self, emb: EmbodimentConfig, cfg: ModelConfig, device: Device = None) -> None:
        super().__init__()
        self.obs_dim = emb.obs_dim
        self.image_feature_dim = emb.image_feature_dim
        self.action_dim = emb.action_dim
        self.encoder = _mlp(emb.obs_dim, cfg.adapter_hidden, cfg.d_model, device)
        self.image: nn.Linear | None = None
        if emb.image_feature_dim > 0:
            self.image = new_module(nn.Linear, emb.image_feature_dim, cfg.d_model, device=device)
        self.decoder = _mlp(cfg.d_model, cfg.adapter_hidden, emb.action_dim, device)


class Policy(nn.Module):
    """The shared MoE transformer policy.

    Args:
        model_cfg: sizes (``configs/model/*.yaml``).
        embodiments: the consortium's embodiments (``configs/embodiments.yaml``); one adapter
            each. Adding an embodiment does not change any other parameter's initial value.
        device: where to allocate. ``"meta"`` allocates nothing (layouts of any size).

    Initialisation is deterministic and leaves the global RNG untouched: every parameter is
    drawn from its own CPU generator seeded by ``(init_seed, parameter name)``, so values
    depend neither on construction order nor on device. LoRA A comes from ``lora_seed``
    (see ``shared_model.lora``). The modules are always constructed on the meta device first
    and materialised once, which keeps even the trillion-parameter layout cheap to build.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        embodiments: Mapping[str, EmbodimentConfig],
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = model_cfg
        self.embodiments = {check_embodiment_name(n): e for n, e in embodiments.items()}
        if model_cfg.d_model % model_cfg.n_heads:
            raise ValueError(f"d_model ({model_cfg.d_model}) must be divisible by n_heads ({model_cfg.n_heads})")
        for name, emb in self.embodiments.items():
            if emb.obs_dim <= 0 or emb.action_dim <= 0:
                raise ValueError(f"embodiment {name!r} needs positive obs_dim and action_dim")
        meta, d = torch.device("meta"), model_cfg.d_model
        with _gc_paused():
            self.pos_emb = new_module(nn.Embedding, model_cfg.history + model_cfg.chunk, d, device=meta)
            self.action_queries = new_module(nn.Embedding, model_cfg.chunk, d, device=meta)
            self.blocks = nn.ModuleList(Block(model_cfg, layer, device=meta) for layer in range(model_cfg.n_layers))
            self.ln_f = new_module(nn.LayerNorm, d, device=meta)
            # Task conditioning (shared_model.task_text), in adapter/shared: the same words
            # mean the same to every robot, so every member's episodes train one map.
            self.task_proj: nn.Linear | None = None
            if model_cfg.task_buckets > 0:
                self.task_proj = new_module(nn.Linear, model_cfg.task_buckets, d, bias=False, device=meta)
            self.adapters = nn.ModuleDict(
                {name: EmbodimentAdapter(emb, model_cfg, device=meta) for name, emb in sorted(self.embodiments.items())}
            )
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nanoGPT-style init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L),
        zero biases, unit LayerNorm; LoRA A from its layer seed, LoRA B zero; ``task_proj``
        zero, so a policy starts out as if it did not read the task, and a member whose
        episodes all share one task moves it only as far as training says."""
        residual_std = _INIT_STD / math.sqrt(2 * max(1, self.config.n_layers))
        lora_prefixes = set()
        for mod_name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                module.reset_lora_parameters()
                lora_prefixes.update({f"{mod_name}.lora_A.", f"{mod_name}.lora_B."})
        for name, param in self.named_parameters():
            if param.is_meta or any(name.startswith(p) for p in lora_prefixes):
                continue
            if re.search(r"(^|\.)ln_[^.]*\.weight$", name):
                param.fill_(1.0)
            elif name.endswith(".bias") or name == "task_proj.weight":
                param.zero_()
            else:
                std = residual_std if re.search(r"\.(attn\.o|w_down)\.weight$", name) else _INIT_STD
                gen = torch.Generator(device="cpu").manual_seed(stable_seed(self.config.init_seed, name))
                value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                param.copy_(value)

    def adapter(self, embodiment: str) -> EmbodimentAdapter:
        """The adapter of ``embodiment``; ValueError naming the known ones otherwise."""
        if embodiment not in self.embodiments:
            raise ValueError(f"unknown embodiment {embodiment!r}; this policy knows {sorted(self.embodiments)}")
        return self.adapters[embodiment]  # type: ignore[return-value]

    def forward(
        self,
        embodiment: str,
        obs: torch.Tensor,
        image: torch.Tensor | None = None,
        task: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict an action chunk.

        Args:
            embodiment: which body ``obs`` comes from (selects the adapter).
            obs: ``[B, history, obs_dim]`` normalised observations (state then env state).
            image: ``[B, history, image_feature_dim]`` precomputed image features; required
                exactly when the embodiment has ``image_feature_dim > 0`` (silently dropping
                them would make training and inference disagree).
            task: ``[B, task_buckets]`` hashed task texts (``shared_model.task_text``);
                required exactly when ``model_cfg.task_buckets > 0``, for the same reason.

        Returns:
            ``(actions[B, chunk, action_dim], aux[B])``; ``aux`` is the per-sample MoE
            load-balancing loss summed over layers. The caller weights it with
            ``model_cfg.aux_loss_coef``.
        """
        adapter = self.adapter(embodiment)
        cfg = self.config
        hist, chunk = cfg.history, cfg.chunk
        if obs.dim() != 3 or obs.shape[1] != hist or obs.shape[2] != adapter.obs_dim:
            raise ValueError(
                f"embodiment {embodiment!r} expects obs of shape [B, {hist}, {adapter.obs_dim}], got {tuple(obs.shape)}"
            )
        b = obs.shape[0]
        tokens = adapter.encoder(obs)
        if adapter.image is not None:
            want = (b, hist, adapter.image_feature_dim)
            if image is None or tuple(image.shape) != want:
                got = None if image is None else tuple(image.shape)
                raise ValueError(f"embodiment {embodiment!r} expects image features of shape {list(want)}, got {got}")
            tokens = tokens + adapter.image(image)
        elif image is not None:
            raise ValueError(f"embodiment {embodiment!r} has no image features (image_feature_dim 0), got an image")
        if self.task_proj is not None:
            if task is None or tuple(task.shape) != (b, cfg.task_buckets):
                got = None if task is None else tuple(task.shape)
                raise ValueError(
                    f"the policy reads the task: expected task of shape [{b}, {cfg.task_buckets}], got {got}"
                )
            # [B, 1, buckets] so the batch dimension is the first of a token sequence, as for
            # every other Linear the DP clipping taps
            tokens = tokens + self.task_proj(task.unsqueeze(1))
        elif task is not None:
            raise ValueError("the policy does not read the task (model.task_buckets 0), got one")

        # Embedding indices are [B, n] (not [n]) so the batch dimension is visible to Opacus.
        q_idx = torch.arange(chunk, device=obs.device).expand(b, chunk)
        p_idx = torch.arange(hist + chunk, device=obs.device).expand(b, hist + chunk)
        x = torch.cat([tokens, self.action_queries(q_idx)], dim=1) + self.pos_emb(p_idx)
        aux = x.new_zeros(b)
        for block in self.blocks:
            x, layer_aux = block(x)
            aux = aux + layer_aux
        x = self.ln_f(x)
        return adapter.decoder(x[:, hist:]), aux


def build_meta(model_cfg: ModelConfig, embodiments: Mapping[str, EmbodimentConfig]) -> Policy:
    """The policy on the meta device: shapes and names only, no memory, any size."""
    return Policy(model_cfg, embodiments, device="meta")


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen (works on meta models)."""
    return sum(p.numel() for p in model.parameters())
