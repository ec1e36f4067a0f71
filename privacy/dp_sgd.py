"""DP-SGD for a member's assigned shards: Poisson-sampled episodes, per-episode clipping, noise.

The mechanism (what the ledger records and the accountant composes) is the standard
subsampled Gaussian of Abadi et al. 2016, with Opacus' ``DPOptimizer`` semantics:

- Each step, every training episode is included independently with probability
  ``sample_rate`` = q (Poisson sampling, :class:`PoissonEpisodeSampler`). The batch may be
  empty; that step still runs (it adds only noise) and still counts for the accountant.
- Each sampled episode contributes one window, drawn uniformly from the sampler's secret
  stream (:meth:`PoissonEpisodeSampler.window_offsets`); its gradient over all trainable
  parameters together is clipped to L2 norm ``max_grad_norm`` = C (flat clipping,
  ``c_i = min(1, C / (||g_i|| + 1e-6))``).
- Gaussian noise ``N(0, (sigma C)^2)`` is added to the clipped sum and the result divided by
  a *public* normaliser (the consortium's ``train.batch_size``), then the wrapped optimizer
  steps. Not by the realised batch (that would release the batch size), and not by the
  expected batch ``q N`` either (Opacus' usual choice, where N is public): the accountant's
  guarantee covers the noised sum and whatever is computed from it with public values only,
  and a member's N is not public. Dividing by ``q N`` would scale the released update by
  ``1/N`` outside the mechanism (invisible under Adam, which is scale-invariant, but not
  under SGD, and not in the proof). For the default federation the two are equal (128 =
  0.08 x 1600). Only the trainable (assigned) parameters take part; frozen ones get no
  hooks and cost only their ordinary forward and backward.
- Noise comes from :class:`privacy.secure_noise.SecureRandom` (ChaCha20 under a fresh
  256-bit key from ``secrets`` for every :class:`DPSGD`, one per round; Gaussians drawn and
  added in float64, rounded once), never from anything the coordinator sends; it replaces
  Opacus' torch-generator noise (see that module for why and what it costs). An explicit
  ``noise_seed`` exists for tests only. The Poisson sampler draws from its own
  :class:`SecureRandom` too: privacy amplification by subsampling assumes nobody outside
  the node knows which episodes were sampled, and the trainer's ``rng`` is derived from
  the coordinator's seed.

Modes (``DPConfig.mode``), all producing the same update up to float rounding:

============  ====================================================================
``bk``        kyodo's book-keeping ghost clipping for ``nn.Linear``
              (``privacy.bookkeeping``; Bu et al. 2023): one backward pass, no
              per-sample gradients stored; noise and averaging by Opacus'
              ``DPOptimizerFastGradientClipping``. **Default.**
``hooks``     Opacus ``GradSampleModule`` (per-sample gradients by hooks) + ``DPOptimizer``
``functorch`` the same with ``force_functorch`` (per-sample gradients by ``torch.func``)
``ew``        Opacus / PyTorch expanded weights + ``DPOptimizer``
``ghost``     Opacus ``GradSampleModuleFastGradientClipping`` (ghost clipping, two
              backward passes) + ``DPOptimizerFastGradientClipping``
============  ====================================================================

Why ``bk`` is the default and replaces Opacus' clipping (the project rule is to use the
library unless a measured reason says otherwise). Measured with ``bench/dp_overhead.py``
on the ``small`` model (4 layers, 8 experts top-2, d 128), batch 32, 2 threads, each
variant in its own process, medians after warm-up; ratios are to non-private training of
the same trainable shards measured in the same run (the machine is shared and noisy, so
absolute milliseconds drift between runs, ratios much less):

==========  ==========================  ==========================
mode        2 experts + adapters        all experts + adapters
            (868k trainable)            (3.2M trainable)
==========  ==========================  ==========================
non-priv.   101 ms   1.00x   446 MB     100 ms   1.00x   452 MB
**bk**      121 ms   1.18x   450 MB     165 ms   1.56x   465 MB
hooks       208 ms   1.81x   613 MB     364 ms   3.42x  1011 MB
ghost       195 ms   1.78x   454 MB     241 ms   2.38x   476 MB
functorch   709 ms   2.62x   661 MB     442 ms   4.12x  1168 MB
ew          183 ms   1.61x   558 MB     370 ms   3.31x   859 MB
==========  ==========================  ==========================

(ms: median step; ratio: median over 15 interleaved turns of DP / the non-private turn
next to it; MB: the worker's peak RSS, opacus imported in every worker. Earlier runs on
the same machine gave bk 1.23-1.27x and 1.58-1.63x; alternating steps inside one process,
which keeps the caches warm, gives bk 1.14-1.22x and 1.39-1.43x.)

Stock Opacus modes are 1.6-2.6x (2 experts) and 2.4-4.1x (all experts): they either
materialise per-sample gradients ``[B, p, d]`` for every expert weight (hooks, functorch,
ew: +170 to +700 MB) or run a second backward pass (ghost). Profiled (torch.profiler,
all experts), ``bk``'s remaining overhead is the Gaussian noise for 3.2M parameters
(~12 ms of Opacus' ~24 ms optimizer step, inherent to DP-SGD), the ghost norms (~6-8 ms
of batched ``[B, T, T]`` products) and the clipped-gradient matmuls, which replace the
weight-gradient matmuls autograd would otherwise do (its backward is ~15 ms shorter).
Since the noise became one in-place draw per step (docs/performance.md, "dp_overhead"), a ``bk`` step
on a later session's VM measured 1.18-1.28x and 1.53-1.55x, against 1.31-1.34x and 2.12-2.13x for
the per-tensor draws in alternating runs.

``bk`` meets both targets of issue 3 (<= 1.3x with 2 experts, <= 2x with all experts),
keeps peak memory at non-private level, and produces the same clipped update as Opacus
hooks (tests/test_dp_sgd.py checks both against a single-sample loop to < 1e-5). Opacus
stays in charge of what it does well here: the averaging / optimizer step and (elsewhere)
accounting; the noise itself comes from :mod:`privacy.secure_noise`. ``ew`` cannot take the
policy's ``(embodiment, obs, ...)`` call directly and fails on an empty batch;
:class:`DPSGD` works around both so it can be measured, but it is not recommended.

Record ``DPSGD.mode`` (or ``TrainResult.dp_mode``) in the ledger: it names the clipping
implementation, not a different mechanism.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from privacy.bookkeeping import BookKeepingClipper
from privacy.secure_noise import SecureRandom

DEFAULT_MODE = "bk"
MODES = ("bk", "hooks", "ghost", "functorch", "ew")
PRIVACY_UNIT = "episode"

# Attributes Opacus' wrappers leave on parameters / modules; removed when a round ends so
# the node's long-lived Policy carries nothing from one round into the next.
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD mechanism of one round, as the member's node decides it.

    Args:
        noise_multiplier: sigma; the noise std is ``sigma * max_grad_norm``. 0 disables noise
            (not private; tests and debugging only).
        max_grad_norm: C, the per-episode clipping norm.
        sample_rate: q, the Poisson inclusion probability of each episode per step.
        mode: how per-sample clipping is computed (:data:`MODES`); not a privacy parameter.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    mode: str = DEFAULT_MODE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {self.max_grad_norm}")
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.mode not in MODES:
            raise ValueError(f"unknown DP-SGD mode {self.mode!r}; choose one of {MODES}")

    def to_record(self) -> dict[str, Any]:
        """The mechanism's fields for a ledger entry (steps are added by the caller)."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "max_grad_norm": float(self.max_grad_norm),
            "sample_rate": float(self.sample_rate),
            "mode": self.mode,
            "privacy_unit": PRIVACY_UNIT,
        }


class PoissonEpisodeSampler:
    """Poisson sampling: each episode joins a step independently with probability q.

    The result may be empty (probability ``(1-q)^N``); the step must still run. The
    ``rng`` the trainer passes is ignored on purpose: it is derived from the coordinator's
    seed, so the coordinator could replay which episodes were sampled, which voids the
    amplification-by-subsampling the accountant assumes. The sampler draws from its own
    :class:`SecureRandom` (a fresh secret key); ``seed`` exists for tests only.
    """

    def __init__(self, sample_rate: float, *, seed: int | None = None) -> None:
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = float(sample_rate)
        self._random = SecureRandom(seed=seed)

    def __call__(self, n_episodes: int, rng: np.random.Generator | None = None) -> np.ndarray:
        del rng  # see the class docstring
        return np.flatnonzero(self._random.uniform(n_episodes) < self.sample_rate)

    def window_offsets(self, lengths: np.ndarray) -> np.ndarray:
        """Which window of each sampled episode the step uses (uniform in ``[0, length)``),
        from the same secret stream. Not from the trainer's ``rng``: the coordinator knows that
        stream, and drawn from it in batch order, one episode more in the sample would shift
        the window of every episode after it, so neighbouring datasets would differ in many
        clipped terms of the sum, not one. Secret, the windows are independent uniform draws
        whatever else is sampled, and the sum differs by exactly that episode's term."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if np.any(lengths < 1):
            raise ValueError("every episode needs at least one window")
        return np.minimum((self._random.uniform(len(lengths)) * lengths).astype(np.int64), lengths - 1)


@functools.cache
def _with_secure_noise(base: type) -> type:
    """``base`` (an Opacus DP optimizer class) with its noise drawn by :class:`SecureRandom`.

    Opacus' ``add_noise`` takes a ``torch.Generator``; everything else (clipping checks,
    averaging by the normaliser, the wrapped step) stays Opacus'. The noise std is the one Opacus
    would use, including its adjusted multiplier where adaptive clipping sets one.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise(self: Any) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        # One draw for every parameter, in place: see SecureRandom (measured there).
        self.noise_source.add_noise_([p.summed_grad for p in self.params], std)
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    return type(f"Secure{base.__name__}", (base,), {"add_noise": add_noise, **_accumulation(base)})


def _accumulation(base: type) -> dict[str, Any]:
    """For Opacus' fast-gradient-clipping optimizer: keep the clipped sum that is already in
    ``p.grad`` as ``p.summed_grad`` instead of deep-copying it every step.

    Safe because nothing reads the un-noised sum again: ``add_noise`` noises it in place and
    makes it ``p.grad``, and ``zero_grad`` drops both. It saved about 2 ms of a 100 ms step
    (``small``, 2 experts, 868k trainable). Other Opacus optimizers accumulate in
    ``clip_and_accumulate`` and keep theirs.
    """
    if not hasattr(base, "accumulate"):
        return {}

    def accumulate(self: Any) -> None:
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad
            else:
                p.summed_grad.add_(p.grad)

    def signal_skip_step(self: Any, do_skip: bool = True) -> None:
        # A skipped step keeps summed_grad for the next one, and a zero_grad that zeroes in
        # place would then zero the aliased sum with it. DPSGD never skips a step.
        raise RuntimeError("kyodo's DP-SGD takes every step (each one is spent); skipping is not supported")

    return {"accumulate": accumulate, "signal_skip_step": signal_skip_step}


@functools.cache
def _with_distributed_secure_noise(base: type) -> type:
    """``base`` for data-parallel DP-SGD over a ``torch.distributed`` group (one member's workers).

    Every worker holds the clipped sum of its own Poisson-sampled episodes (its partition of
    the member's episodes, sampled at the same q: the union is one Poisson sample of all of
    them). The flattened sums are all-reduced; then worker r noises slice r of the total, in
    float64 and rounded once as in the single-process case, with numbers ``[start of slice
    r, end)`` of one draw from the key all workers share (rank 0's, see
    :func:`_shared_noise_key`), and broadcasts its slice to the others. So every coordinate
    gets exactly the noise the single-process step would add (tested: same key, same
    update), the mechanism is the one the ledger records, every worker takes the same
    optimizer step, and the cipher runs on W cores, not one.

    Why not rank 0 alone: it drew every normal, one host core running ChaCha20 at about
    2.8 GB/s, while the others waited; at the ``trillion`` plan's 5.5e9 trainable parameters
    per member that is about 16 s per step. A noise block (``secure_noise._BLOCK`` numbers)
    that straddles two slices is made by both workers, each keeping its own part: at most
    one extra block per worker and step. Why all-reduce and W broadcasts rather than
    reduce-scatter and all-gather (the same bytes as one all-reduce on NCCL's ring): gloo's
    reduce-scatter and all-gather of 20M float32 took 120 + 93 ms here, against 63 ms for
    its all-reduce and 25 ms for broadcasting the same bytes (``bench/dp_noise.py``).
    """
    import torch.distributed as dist
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise(self: Any) -> None:
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        sizes = [p.numel() for p in self.params]
        flat = torch.cat([p.summed_grad.reshape(-1) for p in self.params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total, world = flat.numel(), dist.get_world_size()
        bounds = [total * r // world for r in range(world + 1)]
        rank = dist.get_rank()
        start, stop = bounds[rank], bounds[rank + 1]
        self.noise_source.add_noise_([flat[start:stop]], std, offset=start, total=total)
        for r in range(world):
            dist.broadcast(flat[bounds[r] : bounds[r + 1]], src=r)
        for p, noised in zip(self.params, flat.split(sizes), strict=True):
            p.grad = noised.view_as(p).clone()
            _mark_as_processed(p.summed_grad)

    return type(f"DistributedSecure{base.__name__}", (base,), {"add_noise": add_noise, **_accumulation(base)})


def _shared_noise_key(key: bytes, device: torch.device) -> bytes:
    """Rank 0's noise key, on every worker of the group (a broadcast inside the member's own
    data center: the same links already carry its clipped gradients). One key, so that the
    workers' slices are disjoint parts of one draw, never the same noise twice."""
    import torch.distributed as dist

    shared = torch.tensor(list(key), dtype=torch.uint8, device=device)
    dist.broadcast(shared, src=0)
    return bytes(shared.cpu().tolist())


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Opacus' full backward hooks warn for every module whose inputs need no grad (the
    first trainable layer sees raw observations); expected here, so silenced locally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*full backward hook.*", category=UserWarning)
        yield


class DPSGD:
    """A model + optimizer made private for one round; :meth:`close` undoes everything.

    One step::

        dp.zero_grad()
        pred, aux = dp(embodiment, obs, image)        # forward (B may be 0)
        dp.backward(per_sample_loss(pred, ..., aux))  # [B] -> clipped sum in p.grad
        dp.step()                                     # + noise, / normaliser, optimizer step

    Args:
        model: the policy, with exactly the trainable parameters set (``set_trainable``).
        optimizer: an optimizer over exactly those trainable parameters.
        config: the mechanism.
        normaliser: what the noised clipped sum is divided by (Opacus' "expected batch
            size"). It must not depend on the member's data: pass a public number (the
            consortium's ``train.batch_size``), never ``q * N`` of a private N.
        noise_seed: tests only. ``None`` (always in production) keys the noise stream
            with a fresh secret (:class:`SecureRandom`).
        distributed: one of several data-parallel workers of the same member in the default
            ``torch.distributed`` group, each with a disjoint part of the episodes and the
            same ``normaliser``; ``bk`` mode only. See
            :func:`_with_distributed_secure_noise`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DPConfig,
        normaliser: float,
        *,
        noise_seed: int | None = None,
        distributed: bool = False,
    ) -> None:
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        if not (math.isfinite(normaliser) and normaliser > 0):
            raise ValueError(f"the normaliser must be finite and > 0, got {normaliser}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if in_opt != {id(p) for p in trainable}:
            raise ValueError("the optimizer must hold exactly the model's trainable parameters")

        self.config = config
        self.mode = config.mode
        self.normaliser = float(normaliser)
        self.steps = 0  # optimizer steps taken, empty batches included (each one is spent)
        self.empty_steps = 0
        self._last_batch: int | None = None
        self._model = model
        self._params = trainable
        self._clipper: BookKeepingClipper | None = None
        self._gsm: nn.Module | None = None
        self._closed = False
        noise = {
            "noise_multiplier": config.noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
            "expected_batch_size": self.normaliser,  # type: ignore[dict-item]  # Opacus' name; a public float
            "loss_reduction": "mean",  # i.e. divide the noised sum by the normaliser
        }
        mode = config.mode
        # Every wrapper below sees sum-reduced losses ("sum"), so per-sample gradients are
        # those of each sample's own loss; the optimizer then divides by the normaliser ("mean").
        if distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed DP-SGD needs an initialised torch.distributed default group")
            if mode != "bk":
                raise ValueError(f"distributed DP-SGD supports the bk mode only, not {mode!r}")
            self._clipper = BookKeepingClipper(model, config.max_grad_norm)
            self.optimizer = _with_distributed_secure_noise(DPOptimizerFastGradientClipping)(optimizer, **noise)
        elif mode == "bk":
            self._clipper = BookKeepingClipper(model, config.max_grad_norm)
            self.optimizer = _with_secure_noise(DPOptimizerFastGradientClipping)(optimizer, **noise)
        elif mode in ("hooks", "functorch"):
            from opacus import GradSampleModule

            self._gsm = GradSampleModule(
                model, batch_first=True, loss_reduction="sum", force_functorch=(mode == "functorch")
            )
            self.optimizer = _with_secure_noise(DPOptimizer)(optimizer, **noise)
        elif mode == "ghost":
            from opacus.grad_sample import GradSampleModuleFastGradientClipping

            self._gsm = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="sum", max_grad_norm=config.max_grad_norm
            )
            self.optimizer = _with_secure_noise(DPOptimizerFastGradientClipping)(optimizer, **noise)
        elif mode == "ew":
            self.optimizer = _with_secure_noise(DPOptimizer)(optimizer, **noise)
        else:  # DPConfig validates; this guards direct construction with a bad mode
            raise ValueError(f"unknown DP-SGD mode {mode!r}")
        key = SecureRandom.new_key(noise_seed)
        if distributed:
            key = _shared_noise_key(key, trainable[0].device)
        self.optimizer.noise_source = SecureRandom(key=key)

    # ------------------------------------------------------------------ step parts
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the private model (the policy's own call signature)."""
        self._check_open()
        if self.mode == "ew":
            return self._forward_ew(*args, **kwargs)
        model: Callable[..., Any] = self._gsm if self._gsm is not None else self._model
        with _quiet_opacus():
            return model(*args, **kwargs)

    def _forward_ew(self, *args: Any, **kwargs: Any) -> Any:
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        batch = next(a.shape[0] for a in args if isinstance(a, torch.Tensor))
        if batch == 0:  # expanded weights cannot take B = 0; backward fills empty grad samples
            return self._model(*args, **kwargs)
        return call_for_per_sample_grads(self._model, batch_size=batch, loss_reduction="sum")(*args, **kwargs)

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        """Backward of the per-sample losses ``[B]``; leaves the clipped *sum* in ``p.grad``.

        ``B = 0`` is fine: the clipped sum is zero and :meth:`step` adds only noise.

        In ``bk`` mode a step's sample may go through in chunks (one forward and one
        ``backward`` per chunk, then one :meth:`step`): each chunk's clipped sum is added to
        the previous ones, so memory follows the chunk, not the Poisson batch (q N grows with
        the member's data), and the step is the same. Other modes take the whole batch at once.
        """
        self._check_open()
        if loss_per_sample.dim() != 1:
            raise ValueError(f"expected per-sample losses of shape [B], got {tuple(loss_per_sample.shape)}")
        batch = loss_per_sample.shape[0]
        if self.mode == "bk":
            assert self._clipper is not None
            earlier = [p.grad for p in self._params]  # the step's previous chunks, if any
            for p in self._params:
                p.grad = None  # the clipper refuses a gradient it did not write
            loss_per_sample.sum().backward()
            self._clipper.clip_and_accumulate()
            for p, grad in zip(self._params, earlier, strict=True):
                if grad is not None:
                    p.grad.add_(grad)
        elif self._last_batch is not None:
            raise RuntimeError(f"mode {self.mode!r} takes a step's whole batch in one backward; call step() first")
        elif self.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            with _quiet_opacus():
                DPTensorFastGradientClipping(self._gsm, self.optimizer, loss_per_sample, "sum").backward()
        elif self.mode == "ew" and batch == 0:
            for p in self._params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            with _quiet_opacus():
                loss_per_sample.sum().backward()
        if batch == 0:
            # Some backward paths leave no .grad at all on B = 0; the clipped sum is zero.
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if self.mode in ("hooks", "functorch") and getattr(p, "grad_sample", None) is None:
                    p.grad_sample = p.new_zeros((0, *p.shape))
        self._last_batch = (self._last_batch or 0) + batch

    def step(self) -> None:
        """Noise, division by the normaliser, and the wrapped optimizer's step."""
        self._check_open()
        self.optimizer.step()
        self.steps += 1
        if self._last_batch == 0:
            self.empty_steps += 1
        self._last_batch = None

    def zero_grad(self) -> None:
        self._check_open()
        self.optimizer.zero_grad(set_to_none=True)
        if self._clipper is not None:
            self._clipper.zero_grad()

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this DPSGD was closed (one instance per round)")

    def close(self) -> None:
        """Remove every hook / override and every attribute Opacus left (idempotent).

        Afterwards the model is the plain policy again: same parameter objects, same
        state-dict keys, no hooks; gradients are cleared.
        """
        if self._closed:
            return
        self._closed = True
        if self._clipper is not None:
            self._clipper.close()
        if self._gsm is not None:
            self._gsm._close()  # type: ignore[operator]
        for p in self._model.parameters():
            p.grad = None
            for attr in _PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        for module in self._model.modules():
            for attr in _MODULE_ATTRS:
                if attr in module.__dict__:
                    delattr(module, attr)

    def __enter__(self) -> DPSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
