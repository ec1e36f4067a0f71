"""The shard layout: which shard every tensor of the policy belongs to.

Shards are the unit of assignment, transfer, aggregation and storage (see ARCHITECTURE.md):

============================  ================================================  =========================
shard id                      tensors                                           trainable in a round
============================  ================================================  =========================
``backbone``                  embeddings, attention (incl. LoRA base), norms,   nothing (frozen)
                              routers
``expert/L{l}/E{e}``          ``blocks.{l}.moe.experts.{e}.*``                  all of them
``adapter/shared``            LoRA A and B on attention (q, v) in all layers,   the ``lora_B`` weights and
                              the task projection (``task_proj``) if any        ``task_proj``
``adapter/emb/{name}``        ``adapters.{name}.*`` (encoder, image, decoder)   all of them
============================  ================================================  =========================

Assignment is by parameter name alone (``shard_of``), so the layout of any size, up to the
trillion-parameter config, is computed from a meta-device model without allocating it. The
rules are strict: a parameter that fits none of them is an error, so a new parameter cannot
silently end up in no shard (or in the wrong one).

LoRA A is part of ``adapter/shared`` (so a stored model is complete and self-describing)
but is never trainable: every node regenerates the same A from ``lora_seed`` (FFA-LoRA),
which makes averaging B exact.

The functions taking a model accept the ``Policy`` itself or a wrapper that holds it as
``_module`` (Opacus ``GradSampleModule``) or ``module`` (DDP / DPDDP); names are always the
policy's own (no wrapper prefix).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shared_model.config import EmbodimentConfig, ModelConfig

BACKBONE = "backbone"
SHARED_ADAPTER = "adapter/shared"
_EXPERT_PREFIX = "expert/"
_EMB_PREFIX = "adapter/emb/"

_EXPERT_PARAM = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(?:w_gate|w_up|w_down)\.weight$")
_LORA_PARAM = re.compile(r"^blocks\.\d+\.attn\.(?:q|v)\.lora_(A|B)\.weight$")
_TASK_PARAM = "task_proj.weight"
_EMB_PARAM = re.compile(r"^adapters\.([A-Za-z0-9_-]+)\.(?:encoder\.[02]|decoder\.[02]|image)\.(?:weight|bias)$")
_BACKBONE_PARAM = re.compile(
    r"^(?:pos_emb\.weight|action_queries\.weight|ln_f\.(?:weight|bias)"
    r"|blocks\.\d+\.(?:ln_1|ln_2)\.(?:weight|bias)"
    r"|blocks\.\d+\.attn\.(?:q\.base|v\.base|k|o)\.weight"
    r"|blocks\.\d+\.moe\.router\.proj\.weight)$"
)
_EXPERT_ID = re.compile(r"^expert/L(\d+)/E(\d+)\Z")
_EMB_ID = re.compile(r"^adapter/emb/([A-Za-z0-9_-]+)\Z")


def expert_shard(layer: int, expert: int) -> str:
    """``expert/L{layer}/E{expert}``."""
    if layer < 0 or expert < 0:
        raise ValueError(f"layer and expert must be >= 0, got {layer}, {expert}")
    return f"{_EXPERT_PREFIX}L{int(layer)}/E{int(expert)}"


def parse_expert_shard(shard_id: str) -> tuple[int, int]:
    """``(layer, expert)`` of an ``expert/L{l}/E{e}`` shard id; ValueError otherwise."""
    match = _EXPERT_ID.match(shard_id)
    if not match:
        raise ValueError(f"{shard_id!r} is not an expert shard id (expert/L<layer>/E<expert>)")
    return int(match.group(1)), int(match.group(2))


def embodiment_shard(name: str) -> str:
    """``adapter/emb/{name}``."""
    shard_id = f"{_EMB_PREFIX}{name}"
    if not _EMB_ID.match(shard_id):
        raise ValueError(f"embodiment name {name!r} must be non-empty and use only letters, digits, '_' and '-'")
    return shard_id


def shard_kind(shard_id: str) -> str:
    """``"backbone" | "expert" | "adapter_shared" | "adapter_emb"``; ValueError for a malformed id."""
    if shard_id == BACKBONE:
        return "backbone"
    if shard_id == SHARED_ADAPTER:
        return "adapter_shared"
    if _EXPERT_ID.match(shard_id):
        return "expert"
    if _EMB_ID.match(shard_id):
        return "adapter_emb"
    raise ValueError(
        f"malformed shard id {shard_id!r}; expected {BACKBONE!r}, {SHARED_ADAPTER!r}, "
        "'expert/L<layer>/E<expert>' or 'adapter/emb/<name>'"
    )


def is_shard_id(key: str) -> bool:
    """Whether ``key`` is a shard id: a round's ``failed`` names members and shards alike."""
    try:
        shard_kind(key)
    except ValueError:
        return False
    return True


def shard_of(param_name: str) -> str:
    """The shard a policy tensor belongs to, from its state-dict name."""
    match = _EXPERT_PARAM.match(param_name)
    if match:
        return expert_shard(int(match.group(1)), int(match.group(2)))
    if _LORA_PARAM.match(param_name) or param_name == _TASK_PARAM:
        return SHARED_ADAPTER
    match = _EMB_PARAM.match(param_name)
    if match:
        return embodiment_shard(match.group(1))
    if _BACKBONE_PARAM.match(param_name):
        return BACKBONE
    raise ValueError(f"tensor {param_name!r} fits no shard rule (see shared_model/shards.py)")


def _is_trainable_in_shard(param_name: str, shard_id: str) -> bool:
    """Backbone: frozen during rounds. adapter/shared: LoRA B and the task projection (LoRA A
    is shared and fixed)."""
    kind = shard_kind(shard_id)
    if kind == "backbone":
        return False
    if kind == "adapter_shared":
        if param_name == _TASK_PARAM:
            return True
        match = _LORA_PARAM.match(param_name)
        return bool(match) and match.group(1) == "B"
    return True


def _sort_key(shard_id: str) -> tuple:
    kind = shard_kind(shard_id)
    if kind == "backbone":
        return (0,)
    if kind == "expert":
        return (1, *parse_expert_shard(shard_id))
    if kind == "adapter_shared":
        return (2,)
    return (3, shard_id)


def _unwrap(model: nn.Module) -> nn.Module:
    """The policy inside an Opacus ``GradSampleModule`` (``_module``) or DDP (``module``):
    a module whose only child is called ``_module`` or ``module`` is a wrapper."""
    for _ in range(8):
        children = model._modules
        if len(children) != 1 or not ({"_module", "module"} & children.keys()):
            return model
        model = next(iter(children.values()))
    return model


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor: what a shard holds, without the values."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class ShardLayout:
    """Every shard of a model and the specs of its tensors.

    ``shards`` is ordered: backbone, experts by (layer, expert), adapter/shared, then the
    embodiment adapters sorted by name. Within a shard, tensors keep state-dict order.
    """

    def __init__(self, shards: Mapping[str, list[TensorSpec]]) -> None:
        self.shards: dict[str, list[TensorSpec]] = {k: list(shards[k]) for k in sorted(shards, key=_sort_key)}

    @classmethod
    def from_model(cls, model: nn.Module) -> ShardLayout:
        """Layout of a built model (any device, meta included). Buffers count too: a model
        whose state dict has a tensor outside every shard is rejected by ``shard_of``."""
        shards: dict[str, list[TensorSpec]] = {}
        for name, tensor in _unwrap(model).state_dict(keep_vars=True).items():
            spec = TensorSpec(name, tuple(tensor.shape), tensor.dtype)
            shards.setdefault(shard_of(name), []).append(spec)
        return cls(shards)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, embodiments: Mapping[str, EmbodimentConfig]) -> ShardLayout:
        """Layout from the config alone, via a meta-device model (no allocation, any size)."""
        from shared_model.policy import build_meta  # local: policy is the heavier module

        return cls.from_model(build_meta(model_cfg, embodiments))

    def __contains__(self, shard_id: object) -> bool:
        return shard_id in self.shards

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardLayout) and self.shards == other.shards

    def __repr__(self) -> str:
        return f"ShardLayout({len(self.shards)} shards, {self.total_numel():,} parameters)"

    def _specs(self, shard_id: str) -> list[TensorSpec]:
        try:
            return self.shards[shard_id]
        except KeyError:
            shard_kind(shard_id)  # a malformed id gets the more precise message
            raise ValueError(f"shard {shard_id!r} is not in this layout") from None

    def numel(self, shard_id: str) -> int:
        return sum(s.numel for s in self._specs(shard_id))

    def nbytes(self, shard_id: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of the shard's tensors, in their own dtype or, if given, in ``dtype``
        (e.g. ``torch.bfloat16`` to plan storage or transfer)."""
        specs = self._specs(shard_id)
        if dtype is None:
            return sum(s.nbytes for s in specs)
        return sum(s.numel for s in specs) * dtype.itemsize

    def total_numel(self) -> int:
        return sum(s.numel for specs in self.shards.values() for s in specs)

    def count_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (number of shards, number of parameters)."""
        out: dict[str, tuple[int, int]] = {}
        for shard_id, specs in self.shards.items():
            kind = shard_kind(shard_id)
            count, numel = out.get(kind, (0, 0))
            out[kind] = (count + 1, numel + sum(s.numel for s in specs))
        return out


_INDEX: weakref.WeakKeyDictionary[nn.Module, dict[str, list[str]]] = weakref.WeakKeyDictionary()


def _index(policy: nn.Module) -> dict[str, list[str]]:
    """shard id -> state-dict names, computed once per model.

    Why cached: walking the state dict of the trillion layout takes seconds, and a node or
    store streams shards one at a time. Names are fixed at construction; parameters may be
    replaced (``to()``, ``to_empty()``), so only names are cached and tensors are looked up
    fresh on every call.
    """
    index = _INDEX.get(policy)
    if index is None:
        index = {}
        for name in policy.state_dict(keep_vars=True):
            index.setdefault(shard_of(name), []).append(name)
        _INDEX[policy] = index
    return index


def _tensor(policy: nn.Module, name: str) -> torch.Tensor:
    try:
        return policy.get_parameter(name)
    except AttributeError:
        return policy.get_buffer(name)


def _shard_names(policy: nn.Module, shard_id: str) -> list[str]:
    shard_kind(shard_id)
    names = _index(policy).get(shard_id)
    if not names:
        raise ValueError(f"shard {shard_id!r} has no tensors in this model")
    return names


def shard_state(model: nn.Module, shard_id: str) -> dict[str, torch.Tensor]:
    """The shard's tensors by full state-dict name.

    These are detached *views* sharing storage with the model (no copy, so a trillion-scale
    node can stream shards out without doubling memory): they change when the model is
    trained or loaded. Clone them to keep a snapshot (e.g. the round's starting point to
    compute a delta).
    """
    policy = _unwrap(model)
    return {n: _tensor(policy, n).detach() for n in _shard_names(policy, shard_id)}


@torch.no_grad()
def load_shard(model: nn.Module, shard_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's shard (cast to the model's dtype and device).

    Keys must be exactly the shard's names and shapes must match; nothing is written unless
    everything checks out, so a bad shard object never leaves the model half-loaded.
    """
    policy = _unwrap(model)
    names = _shard_names(policy, shard_id)
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"shard {shard_id!r}: missing keys {missing}, unexpected keys {extra}")
    own = {n: _tensor(policy, n) for n in names}
    wrong = [
        f"{n}: expected {tuple(own[n].shape)}, got {tuple(tensors[n].shape)}"
        for n in names
        if tuple(tensors[n].shape) != tuple(own[n].shape)
    ]
    if wrong:
        raise ValueError(f"shard {shard_id!r}: shape mismatch: " + "; ".join(wrong))
    for n in names:
        own[n].copy_(tensors[n])


def trainable_names(model: nn.Module, shard_id: str) -> list[str]:
    """Names of the shard's parameters that train when the shard is assigned.

    ``backbone`` -> [] (frozen in federated rounds); ``adapter/shared`` -> the LoRA B weights
    and ``task_proj``; experts and embodiment adapters -> all their parameters.
    """
    policy = _unwrap(model)
    params = dict(policy.named_parameters())
    return [n for n in _shard_names(policy, shard_id) if n in params and _is_trainable_in_shard(n, shard_id)]


def set_trainable(model: nn.Module, shard_ids: Iterable[str]) -> list[str]:
    """Make exactly the given shards' trainable parameters require grad, all others not.

    Returns the trainable names in model order. Note for Opacus (hooks mode): every
    trainable module must run in every forward, so assign only the embodiment adapter(s)
    the node's data actually uses.
    """
    policy = _unwrap(model)
    wanted: set[str] = set()
    for shard_id in shard_ids:
        wanted.update(trainable_names(policy, shard_id))
    names = []
    for name, param in policy.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            names.append(name)
    return names
