"""Concrete AdaMerging: a shared Concrete (Gumbel-sigmoid) mask over every task-vector entry,
meta-learned by entropy, then layer-wise AdaMerging under that mask.

Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion", 2023 (arXiv 2312.06173); FusionBench's ``ConcreteLayerWiseAdaMergingForCLIP``
(tanganke/fusion_bench ``fusion_bench/method/concrete_subspace/clip_concrete_adamerging.py``
L324-594, config ``config/method/concrete_subspace/clip_concrete_layer_wise_adamerging.yaml``,
mask model ``fusion_bench/models/masks/mask_model.py``; read at ``54c9e8c``). One logit per entry
of the merged parameters, shared by the K tasks, starts at ``initial_logits`` (0). The merge is

    theta_p = base_p + m_p * sum_k lambda[p, k] * tau_kp,    m_p = c_p / mean(c_p),

``c`` a Concrete sample ``sigmoid((z + log u - log(1 - u)) / T)`` (torch's ``RelaxedBernoulli``
with ``logits=z``, ``temperature=T``), rescaled per parameter tensor by its mean. Two phases in one
run:

1. steps ``< mask_steps`` (FusionBench ``max_steps: 1000``): sample ``c``; *inner*: the entropy at
   the current coefficients with the mask detached gives their gradient, the coefficients are
   reset to their initial values (0.3) and take one step of a persistent Adam (``base_lr`` 1);
   *outer*: the entropy with the stepped coefficients and the mask attached, one Adam step
   (``mask_lr`` 1e-3) of the logits (first order: the inner step is a constant).
2. later steps (FusionBench ``max_adamerging_steps: 1000``): one mask sampled from the final
   logits (``eval_mask_type``: continuous, as FusionBench, or discrete), fixed; layer-wise
   AdaMerging from the initial coefficients (Adam ``lr`` 1e-3, unclamped).

Every draw comes from a generator seeded by ``(mask_seed, step)`` (the phase-2 mask by
``mask_seed`` alone), not the global RNG, so a resumed run draws what the straight run drew and
export, test and ``compare`` merge with the same mask. Differences from FusionBench: docs/fidelity.md.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Literal, Mapping

import torch
from torch import nn

from ..engine.merged_model import Granularity, MergedModel
from ..engine.task_vectors import TaskVectors
from ..models.layout import Layout
from ..models.pool import ModelPool
from .adamerging import OBJECTIVES, AdaMerging
from .parts import MethodParts

MASK_LOGITS_KEY = "merged.mask_logits"
EVAL_MASK_TYPES = ("continuous", "discrete")
MASK_SEED = 0xC0C7  # mask noise: seeded by (this, mask_seed, step)
EVAL_STEP = -1      # the "step" whose draw is the fixed mask of phase 2, export and evaluation


def concrete_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """A relaxed Bernoulli sample ``sigmoid((z + log u - log(1 - u)) / T)``, differentiable in ``z``;
    ``u`` clamped to ``[eps, 1 - eps]`` and the sample to ``[tiny, 1 - eps]`` as torch's
    ``RelaxedBernoulli.rsample`` does."""
    info = torch.finfo(logits.dtype)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    u = u.clamp(info.eps, 1 - info.eps)
    return torch.sigmoid((logits + (u.log() - (-u).log1p())) / temperature).clamp(info.tiny, 1 - info.eps)


def bernoulli_sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 sample with ``P(1) = sigmoid(z)`` (FusionBench's ``eval_mask_type: discrete``)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    return (u < torch.sigmoid(logits)).to(logits.dtype)


class ConcreteMaskedModel(MergedModel):
    """A :class:`MergedModel` whose task-vector sum is multiplied entry-wise by one mask shared by
    every task: ``base_p + m_p * sum_k lambda[p, k] tau_kp``.

    Args:
        module, task_vectors, granularity, prior, clamp, offload: as in :class:`MergedModel`.
        temperature: ``T`` of the Concrete samples (FusionBench 0.5).
        initial_logits: the value every logit starts at (FusionBench 0: a mask of mean 1/2).
        eval_mask_type: how the fixed mask (phase 2, evaluation, export) is drawn from the logits:
            ``continuous`` (a Concrete sample, FusionBench's default) or ``discrete`` (Bernoulli).
        mask_seed: mixed into the seed of every draw.

    Attributes:
        mask_logits: ``[N]``, one logit per entry of the merged parameters, side by side in
            task-vector order (``N`` = the parameters' total size).
    """

    def __init__(self, module: nn.Module, task_vectors: TaskVectors, temperature: float = 0.5,
                 initial_logits: float = 0.0, eval_mask_type: str = "continuous", mask_seed: int = 0,
                 granularity: Granularity = "layerwise", prior: float = 0.3, clamp: bool = False,
                 offload: bool = False) -> None:
        check_mask_options(temperature, eval_mask_type)
        super().__init__(module, task_vectors, granularity=granularity, prior=prior, clamp=clamp, offload=offload)
        self.temperature, self.eval_mask_type, self.mask_seed = float(temperature), eval_mask_type, int(mask_seed)
        self.shapes = [tuple(t.shape[1:]) for t in task_vectors.tensors]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self._row_list = [int(r) for r in self.rows.tolist()]
        self.mask_logits = nn.Parameter(torch.full((sum(self.sizes),), float(initial_logits)))
        self._eval_cache: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (logits, their draw)

    def generator(self, step: int) -> torch.Generator:
        """The generator of step ``step``'s draw (:data:`EVAL_STEP`: the fixed mask's). A CPU
        generator whatever the logits' device (the noise is moved to them): CPU and CUDA generators
        give different streams, and the fixed mask must be the same draw on a GPU (fit, test) and on
        the CPU (compare's evaluation after the fit, export)."""
        g = torch.Generator()
        g.manual_seed((MASK_SEED * 1_000_003 + self.mask_seed) * 1_000_003 + step + 1)
        return g

    def rescaled(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The flat mask cut per parameter, each part divided by its mean (FusionBench
        clip_concrete_adamerging.py L418-420, L587-589), in the parameter's shape."""
        return [(c / c.mean().clamp_min(torch.finfo(c.dtype).tiny)).reshape(s)
                for c, s in zip(flat.split(self.sizes), self.shapes)]

    def sample_mask(self, step: int) -> list[torch.Tensor]:
        """Phase 1's mask at ``step``: a Concrete sample, rescaled, differentiable in the logits."""
        return self.rescaled(concrete_sample(self.mask_logits, self.temperature, self.generator(step)))

    @torch.no_grad()
    def eval_mask(self) -> list[torch.Tensor]:
        """The fixed mask: one ``eval_mask_type`` draw from the logits as they stand, rescaled (kept
        with a copy of the logits it was drawn from, drawn again when they differ)."""
        z = self.mask_logits.detach()
        cached = self._eval_cache
        if cached is None or cached[0].device != z.device or cached[0].dtype != z.dtype or not torch.equal(cached[0], z):
            g = self.generator(EVAL_STEP)
            flat = concrete_sample(z, self.temperature, g) if self.eval_mask_type == "continuous" \
                else bernoulli_sample(z, g)
            self._eval_cache = cached = (z.clone(), self.rescaled(flat))
        return cached[1]

    def merged_parameters(self, reuse_buffers: bool = False,
                          mask: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Merged tensors under ``mask`` (per parameter, as :meth:`sample_mask` gives; ``None``:
        :meth:`eval_mask`), differentiable in the coefficients and in a mask that carries a graph."""
        masks = self.eval_mask() if mask is None else mask
        params = dict(self.module.named_parameters())
        lam = self.lambdas()
        out = {}
        for p, (name, tau) in enumerate(zip(self.task_vectors.names, self.task_vectors.tensors)):
            base = params[name]
            tau = tau.to(base.device, non_blocking=True) if self.offload else tau
            delta = torch.tensordot(lam[self._row_list[p]].to(tau.dtype), tau, dims=1).to(base.dtype)
            out[name] = base + masks[p].to(base.dtype) * delta
        return out

    def shard(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("concrete_adamerging masks every entry of the merge, which the sharded merge does not "
                         "do: run it without ShardedMergeStrategy")

    def kept_fraction(self) -> torch.Tensor:
        """``mean(sigmoid(z))``: the expected fraction of entries the mask keeps."""
        return torch.sigmoid(self.mask_logits.detach()).mean()


def check_mask_options(temperature: float, eval_mask_type: str) -> None:
    """One-line errors for mask settings out of range."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if eval_mask_type not in EVAL_MASK_TYPES:
        raise ValueError(f"eval_mask_type must be one of {', '.join(EVAL_MASK_TYPES)}, got {eval_mask_type!r}")


class ConcreteAdaMerging(AdaMerging):
    """Concrete AdaMerging (layer-wise): a shared Concrete mask over the task vectors meta-learned
    for ``mask_steps`` steps, then AdaMerging under the fixed mask (see the module docstring).

    Args:
        mask_steps: steps of phase 1 (learning the mask); the rest of ``trainer.max_steps`` is
            phase 2 (AdaMerging). ``None`` (default): half the run, FusionBench's 1000 + 1000.
        temperature: Concrete temperature (0.5). initial_logits: the logits' start (0).
        mask_lr: Adam learning rate of the logits (FusionBench ``lr``: 1e-3).
        base_lr: Adam learning rate of phase 1's inner coefficient step (FusionBench ``base_lr``: 1).
        lr: Adam learning rate of phase 2's coefficients (FusionBench ``adamerging_lr``: 1e-3).
        prior: the initial coefficients (FusionBench ``scaling_factor``: 0.3), where each inner
            step and phase 2 start.
        clamp: clamp the coefficients to [0, 1] (FusionBench ``clamp_weights: false``).
        eval_mask_type: ``continuous`` (FusionBench) or ``discrete``: the draw of phase 2's mask.
        mask_seed: mixed into the seed of every mask draw.
        granularity, task_vector_dtype: as in :class:`~adamerge.methods.AdaMerging`.
    """

    method = "concrete_adamerging"
    identity: tuple[str, ...] = ("granularity",)
    objectives: Mapping[str, Any] = MappingProxyType({"entropy": OBJECTIVES["entropy"]})

    def __init__(self, pool: ModelPool, mask_steps: int | None = None, temperature: float = 0.5,
                 initial_logits: float = 0.0, mask_lr: float = 1e-3, base_lr: float = 1.0, lr: float = 1e-3,
                 prior: float = 0.3, clamp: bool = False,
                 eval_mask_type: Literal["continuous", "discrete"] = "continuous", mask_seed: int = 0,
                 granularity: Granularity = "layerwise",
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None) -> None:
        check_mask_options(temperature, eval_mask_type)  # before the pool is loaded
        if mask_steps is not None and mask_steps < 0:
            raise ValueError(f"model.mask_steps must be >= 0, got {mask_steps}")
        for key, value in (("mask_lr", mask_lr), ("base_lr", base_lr)):
            if not value > 0:
                raise ValueError(f"model.{key} must be > 0, got {value}")

        def merge(encoder: nn.Module, task_vectors: TaskVectors, layout: Layout | None = None,
                  **options: Any) -> ConcreteMaskedModel:
            if not isinstance(task_vectors, TaskVectors):
                raise ValueError("concrete_adamerging masks every entry of dense task vectors; this pool's are "
                                 "low-rank (LoRA)")
            return ConcreteMaskedModel(encoder, task_vectors, temperature=temperature, initial_logits=initial_logits,
                                       eval_mask_type=eval_mask_type, mask_seed=mask_seed, **options)
        super().__init__(pool, granularity=granularity, prior=prior, clamp=clamp, lr=lr,
                         task_vector_dtype=task_vector_dtype, _parts=MethodParts(OBJECTIVES["entropy"], merge=merge))
        self.automatic_optimization = False  # two optimizers per phase-1 step, one counted step
        self.mask_steps, self.mask_lr, self.base_lr = mask_steps, mask_lr, base_lr
        self.register_buffer("initial_coefficients", self.merged.coefficients.detach().clone(), persistent=False)

    def extra_learned_state(self) -> dict[str, torch.Tensor]:
        return {MASK_LOGITS_KEY: self.merged.mask_logits}

    def phase_boundary(self) -> int:
        """The first step of phase 2: ``mask_steps``, or half of ``trainer.max_steps``."""
        if self.mask_steps is not None:
            return int(self.mask_steps)
        steps = getattr(self._trainer, "max_steps", -1) if self._trainer is not None else -1
        if not isinstance(steps, int) or steps < 0:
            raise ValueError("model.mask_steps is unset (half the run) and trainer.max_steps is not: set one")
        return steps // 2

    def optimizers_for(self, total_steps: int | None) -> Any:
        """Phase 1's inner Adam (coefficients, ``base_lr``; its moments kept across steps, as
        FusionBench's ``base_optimizer``), the logits' Adam (``mask_lr``) and phase 2's Adam
        (coefficients, ``lr``)."""
        coefficients, logits = self.merged.coefficients, self.merged.mask_logits
        return [torch.optim.Adam([coefficients], lr=self.base_lr), torch.optim.Adam([logits], lr=self.mask_lr),
                torch.optim.Adam([coefficients], lr=self.lr)]

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:  # two backwards per DDP forward; the inner gradient is never all-reduced
            raise ValueError(f"concrete_adamerging trains on one device (its phase-1 step runs two backward "
                             f"passes per step outside DDP's gradient sync), got {trainer.world_size} processes: "
                             "set trainer.devices: 1")
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision.startswith("16"):  # the inner optimizer steps outside Lightning's GradScaler
            raise ValueError(f"concrete_adamerging: trainer.precision {precision} scales the gradients of its "
                             "inner step, which never unscales them; use 32-true or bf16-mixed")
        super().on_fit_start()

    def refusal(self, path: str) -> str | None:
        if path == "online":
            return ("concrete_adamerging learns a mask over its first mask_steps steps with two optimizers per step, "
                    "then restarts AdaMerging from the initial coefficients; online adapts one optimizer on the "
                    "stream it answers: fit it, then predict --export")
        return super().refusal(path)

    def _entropy(self, images: dict[str, torch.Tensor], indices: dict[str, torch.Tensor | None],
                 params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = self.task_losses(images, indices, params)
        return torch.stack(list(losses.values())).sum(), losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = int(self.global_step)
        images, indices, _ = self._batch(batch)
        inner_opt, mask_opt, ada_opt = self.optimizers()
        coefficients = self.merged.coefficients
        if step < self.phase_boundary():
            mask = self.merged.sample_mask(step)
            # inner: the coefficients' gradient under the detached mask, applied from their initial values
            inner, _ = self._entropy(images, indices, self.merged.merged_parameters(mask=[m.detach() for m in mask]))
            inner_opt.zero_grad()
            self.manual_backward(inner)
            with torch.no_grad():
                coefficients.copy_(self.initial_coefficients)
            self.check_gradients()
            inner_opt.optimizer.step()  # the raw optimizer: Lightning counts one step per training step
            # outer: the logits' gradient at the stepped coefficients (first order)
            loss, losses = self._entropy(images, indices, self.merged.merged_parameters(mask=mask))
            opt = mask_opt
        else:
            if step == self.phase_boundary():  # phase 2 starts from the initial coefficients
                with torch.no_grad():
                    coefficients.copy_(self.initial_coefficients)
            loss, losses = self._entropy(images, indices, self.merged.merged_parameters())
            opt = ada_opt
        self._log_train(loss.detach(), {t: e.detach() for t, e in losses.items()})
        opt.zero_grad()
        coefficients.grad = None
        self.manual_backward(loss)
        opt.step()
        return loss.detach()

    def _log_train(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        super()._log_train(loss, losses)
        if self.logs_this_step():
            self.log("mask/kept", self.merged.kept_fraction())
