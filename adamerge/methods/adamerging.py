"""The AdaMerging Lightning module: learn merging coefficients by test-time entropy minimisation."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from ..data.datamodule import MultiTaskDataModule
from ..engine.expert_features import FeatureCache, Units
from ..engine.lowrank import LowRankMergedModel, LowRankTaskVectors
from ..engine.merged_model import Granularity, MergedModel
from ..engine.objectives import entropy, expert_pseudo_label
from ..engine.task_vectors import DTYPES, TaskVectors
from ..models.layout import Layout
from ..models.pool import ModelPool
from ..report import evaluate
from .adaptation_features import AdaptationFeatures
from .checkpoint_guard import COEFFICIENTS_KEY, CheckpointGuard
from .parts import MethodParts, Objective, pick_objective

TASK_MODULES = "task_modules"  # state-dict prefix of the learned per-task modules
# ``model.optimizer``: the optimizer class over the learned tensors
OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]] = MappingProxyType(
    {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW})
# ``model.lr_schedule``: the per-step scheduler over a run of ``total_steps`` steps (``None``: constant)
LR_SCHEDULES: Mapping[str, Any] = MappingProxyType({
    "constant": None,
    "cosine": lambda optimizer, total_steps: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps),
})
ADAPT_TASKS = ("merged", "unseen", "all")  # ``model.adapt_tasks``


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch that is ``images``, ``(images, indices)`` or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["image"] if "image" in batch else next(iter(batch.values()))
    return batch[0]


def labels_of_batch(batch: Any) -> torch.Tensor | None:
    """The labels of a labeled stream batch ``(images, indices, labels)`` (few-shot); else ``None``."""
    if isinstance(batch, (tuple, list)) and len(batch) > 2 and isinstance(batch[2], torch.Tensor):
        return batch[2]
    return None


def indices_of(batch: Any) -> torch.Tensor | None:
    """The dataset indices of a stream batch ``(images, indices)``; ``None`` for bare images."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def _entropy(m: "AdaMerging", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Entropy of each head's predictions on the merged model (the AdaMerging paper)."""
    return {t: entropy(z) for t, z in m.task_logits(images, params).items()}


def _pseudo_label(m: "AdaMerging", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Cross-entropy to the task expert's predicted class of the same image (images the expert
    is less sure of than ``min_confidence`` dropped)."""
    return {t: expert_pseudo_label(z, m.heads[t](m.expert_features(t, indices[t], z.device, images[t])), m.min_confidence)
            for t, z in m.task_logits(images, params).items()}


def _cross_entropy(m: "AdaMerging", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Supervised cross-entropy to the batch's labels (few-shot batches, ``data.shots``)."""
    missing = [t for t in images if labels is None or labels.get(t) is None]
    if missing:
        raise ValueError(f"objective 'cross_entropy' needs labeled batches, tasks {missing} have "
                         "none: set data.shots (labeled images per class)")
    return {t: F.cross_entropy(z.float(), labels[t].to(z.device)) for t, z in m.task_logits(images, params).items()}


def _entropy_of_mean(m: "AdaMerging", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Entropy of each head's batch-mean logits (FusionBench's GPT-2 / Flan-T5 AdaMerging;
    :func:`adamerge.engine.objectives.entropy_of_mean`)."""
    return {t: entropy(z, batch_mean=True) for t, z in m.task_logits(images, params).items()}


def _vocab_entropy_of_mean(m: "AdaMerging", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Entropy of the batch-mean next-token logits over the whole vocabulary, before the label
    words are picked (FusionBench's Flan-T5 AdaMerging); language-model pools only, whose
    features are those logits (heads with ``vocabulary_features``, e.g. ``VerbaliserHead``)."""
    other = [t for t in images if not getattr(m.heads[t], "vocabulary_features", False)]
    if other:
        raise ValueError(f"objective 'vocab_entropy_of_mean' needs a language-model pool (HFLanguageModelPool, "
                         f"whose features are the next-token logits over the vocabulary); the heads of tasks "
                         f"{other} read other features: use entropy_of_mean")
    return {t: entropy(f, batch_mean=True) for t, f in m.features(images, params).items()}


OBJECTIVES: Mapping[str, Objective] = MappingProxyType({o.name: o for o in (
    Objective("entropy", "entropy", _entropy),
    Objective("entropy_of_mean", "entropy_of_mean", _entropy_of_mean),
    Objective("vocab_entropy_of_mean", "vocab_entropy_of_mean", _vocab_entropy_of_mean),
    Objective("pseudo_label", "pseudo_ce", _pseudo_label, needs_experts=True),
    Objective("cross_entropy", "ce", _cross_entropy, needs_labels=True),
)})


def plain_merge(encoder: nn.Module, task_vectors: TaskVectors | LowRankTaskVectors, layout: Layout | None = None,
                **options: Any) -> MergedModel:
    """The fused merge of :class:`MergedModel` (``options``: granularity, prior, clamp, offload),
    low-rank (:class:`LowRankMergedModel`) for LoRA task vectors: every method's default (the
    pool's ``layout`` is for builders that act on parts of the model)."""
    if isinstance(task_vectors, LowRankTaskVectors):
        return LowRankMergedModel(encoder, task_vectors, **options)
    return MergedModel(encoder, task_vectors, **options)


def prepared_task_vectors(tv: TaskVectors | LowRankTaskVectors, trim: float | None, preprocess: str | None,
                          preprocess_options: dict[str, Any] | None, dtype: str | None,
                          offload: bool) -> TaskVectors | LowRankTaskVectors:
    """The task vectors a run merges: transformed (``trim`` is ``preprocess: ties``), stored in
    ``dtype``, kept in (pinned) CPU memory when ``offload``. One-line errors for settings that
    contradict each other or the pool (a transform of LoRA task vectors)."""
    lowrank = not isinstance(tv, TaskVectors)  # LoRA experts: LowRankTaskVectors
    if trim is not None and preprocess is not None:
        raise ValueError(f"trim={trim} and preprocess={preprocess!r}: give one (trim is preprocess: ties)")
    if preprocess_options and preprocess is None:
        raise ValueError(f"preprocess_options {preprocess_options} without preprocess")
    if trim is not None:
        preprocess, preprocess_options = "ties", {"keep": trim}
    if preprocess is not None:
        if lowrank:
            what = "trim (AdaMerging++)" if trim is not None else f"preprocess {preprocess!r}"
            raise ValueError(f"{what} needs dense task vectors; this pool's are low-rank (LoRA): "
                             f"drop model.{'trim' if trim is not None else 'preprocess'}")
        from .preprocess import preprocess as transform
        tv = transform(tv, preprocess, preprocess_options)
    if dtype is not None:
        tv = tv.to(dtype=DTYPES[dtype])
    if offload:
        tv = tv.to("cpu")
        if torch.cuda.is_available() and not lowrank:
            tv = TaskVectors(tv.task_names, tv.names, [t.pin_memory() for t in tv.tensors], tv.meta, tv.norms)
    return tv


def training_free(name: str, path: str) -> str:
    """Why a training-free module (``learns = False``, e.g. SMILE) refuses ``path`` (fit, online)."""
    return (f"{name} is training-free (built from the task vectors alone, no data read): nothing to {path}; "
            "`adamerge test --config CONFIG` (no --ckpt_path) evaluates it, `adamerge export --config CONFIG "
            "--out DIR` writes it, `adamerge compare` runs it")


class AdaMerging(L.LightningModule):
    """Task-wise or layer-wise AdaMerging, and the engine of every learned method.

    The module is "merged encoder + optional per-task modules": coefficients over the task
    vectors (learned, or fixed at their prior / an earlier run's values) and, in subclasses,
    small trainable modules per task (:attr:`task_modules`) with their own objective
    (:meth:`task_losses`). Checkpoints hold exactly the learned tensors plus the method name and
    the pool fingerprint (see :func:`~adamerge.methods.checkpoint_guard.check_checkpoint`).

    Args:
        pool: where the base encoder, the fine-tuned experts and the task heads come from.
        granularity: ``taskwise`` (one coefficient per task) or ``layerwise`` (one per task per
            parameter tensor).
        split_qkv: ``layerwise`` only: three coefficient rows (q, k, v, equal thirds along dim 0)
            for each fused q/k/v parameter (open_clip's ``attn.in_proj_weight`` /
            ``in_proj_bias``, timm's ``qkv``), as FusionBench's layer-wise AdaMerging has on
            Hugging Face CLIP's separate ``q_proj`` / ``k_proj`` / ``v_proj``. Changes the
            coefficient (and checkpoint) shape; ``False`` (default): one row per tensor.
        prior: initial coefficient (the paper uses 0.3).
        clamp: clamp coefficients to [0, 1] when merging.
        lr: learning rate of the optimizer (the paper: Adam 1e-3).
        per_task_backward: back-propagate task by task through the shared merged weights, so
            peak activation memory is that of one task's batch instead of all K.
        trim: AdaMerging++: keep this fraction of each task vector's largest magnitudes, elect
            signs and drop disagreeing entries (TIES) before learning; ``None`` is plain
            AdaMerging, the paper's ++ uses 0.2.
        preprocess: learn the coefficients on transformed task vectors: ``ties``, ``dare``,
            ``breadcrumbs``, ``consensus`` or ``tsv_m`` (:mod:`adamerge.methods.preprocess`);
            ``trim: X`` is ``preprocess: ties`` with ``keep: X``. Part of the pool fingerprint.
        preprocess_options: the transform's options, e.g. ``{p: 0.5, seed: 0}`` for ``dare``.
        task_vector_dtype: storage dtype of the task vectors (float32, bfloat16, float16);
            ``None`` keeps the pool's.
        offload: keep task vectors in (pinned) CPU memory and stream them to the device per merge.
        learn_coefficients: train the coefficients (``False`` keeps them at ``prior`` or at the
            values of ``init_from``; the merge is then done once, not per step).
        init_from: an adamerge checkpoint (of any method, same pool and granularity) whose
            coefficients are the starting point, e.g. a finished AdaMerging run.
        objective: what the coefficients minimise on each unlabeled batch: ``entropy`` of each
            head's predictions (the paper), or ``pseudo_label``: cross-entropy to each task
            expert's predicted class of the same image (experts' features cached per image).
            ``cross_entropy``: supervised cross-entropy to the labels of a few labeled images per
            class (aTLAS few-shot; set ``data.shots``). ``entropy_of_mean``: the entropy of each
            task's batch-mean logits (FusionBench's text recipe); ``vocab_entropy_of_mean``: the
            same over a language model's whole vocabulary rather than the label words.
        min_confidence: ``pseudo_label`` only: drop images whose expert top softmax probability is
            below this (0 keeps every image).
        expert_chunk: objectives that read the experts' features (``pseudo_label``, Surgery,
            Tinting): each image's features are computed once (see
            :class:`adamerge.engine.expert_features.FeatureCache`), with the stream's batch it
            came in under ``fit``; elsewhere in chunks of this many dataset indices.
        expert_weights_mb: memory for the experts' formed weights (``base + tau_k``) kept between
            feature-cache misses; experts that do not fit are formed again at each miss.
        optimizer: ``adam`` (default, the paper) or ``adamw`` (decoupled weight decay; aTLAS).
        weight_decay: the optimizer's weight decay (``adam``: an L2 term in the gradient;
            ``adamw``: decoupled, as aTLAS's 0.1). Default 0.
        lr_schedule: ``constant`` (default) or ``cosine``: annealed per step from ``lr`` to 0
            over the run's ``trainer.max_steps`` (``online``: over its stream's steps), without
            warm-up (WEMoE's and aTLAS's). Gradient-norm clipping is Lightning's
            ``trainer.gradient_clip_val``.
        adapt_tasks: which tasks the adaptation stream and the objective cover: ``merged``
            (default: the tasks with an expert), ``unseen`` (only the pool's ``unseen_tasks``:
            aTLAS few-shot learns coefficients over the *other* tasks' vectors on its target
            task's labeled shots, the target's own vector never loaded) or ``all`` (both). The
            unseen tasks' losses use their frozen heads; objectives that read the experts
            (``pseudo_label``) cannot cover a task without one.
    """

    method = "adamerging"       # the method identity written into checkpoints and exports
    # Hyper-parameters that make a registry row what it is (``adamerging_layerwise`` vs
    # ``adamerging_layerwise_pp``): a module is a row only if it keeps the row's value of each,
    # and ``compare --config`` never carries them from a config to another row.
    identity: tuple[str, ...] = ("granularity", "split_qkv", "trim", "preprocess", "preprocess_options",
                                 "objective", "learn_coefficients", "init_from")
    objectives: Mapping[str, Objective] = OBJECTIVES  # what ``objective`` may name
    # False: a training-free module (SMILE), built from the task vectors alone: ``fit`` and
    # ``online`` are refused (:meth:`refusal`); test, export and compare take it as built
    learns: bool = True

    def __init__(self, pool: ModelPool, granularity: Granularity = "layerwise", prior: float = 0.3,
                 clamp: bool = True, lr: float = 1e-3, per_task_backward: bool = False,
                 trim: float | None = None,
                 preprocess: str | None = None, preprocess_options: dict[str, Any] | None = None,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 offload: bool = False, learn_coefficients: bool = True,
                 init_from: str | None = None,
                 objective: Literal["entropy", "entropy_of_mean", "vocab_entropy_of_mean", "pseudo_label",
                                    "cross_entropy"] = "entropy",
                 min_confidence: float = 0.0, expert_chunk: int = 64, expert_weights_mb: int = 4096,
                 split_qkv: bool = False, optimizer: Literal["adam", "adamw"] = "adam",
                 weight_decay: float = 0.0, lr_schedule: Literal["constant", "cosine"] = "constant",
                 adapt_tasks: Literal["merged", "unseen", "all"] = "merged",
                 _parts: MethodParts | None = None) -> None:
        super().__init__()
        # ``_parts``: a method's own objective, merge and per-task modules (adamerge.methods.parts);
        # hidden from the config schema (jsonargparse skips optional ``_`` arguments)
        parts = _parts or MethodParts(pick_objective(type(self).objectives, objective))
        # settings checked before anything is built or written, named by their config keys
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"model.min_confidence must be in [0, 1], got {min_confidence}")
        if not lr > 0:  # Adam would only say "Invalid learning rate"
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if not weight_decay >= 0:
            raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
        if adapt_tasks not in ADAPT_TASKS:
            raise ValueError(f"model.adapt_tasks must be one of {list(ADAPT_TASKS)}, got {adapt_tasks!r}")
        if clamp and not 0.0 <= prior <= 1.0:
            raise ValueError(f"model.prior must be in [0, 1] while model.clamp is true (the coefficients are "
                             f"clamped there), got {prior}")
        if trim is not None and not 0.0 < trim <= 1.0:
            raise ValueError(f"model.trim must be in (0, 1] (the fraction of each task vector kept), got {trim}")
        if split_qkv and granularity != "layerwise":
            raise ValueError(f"model.split_qkv gives fused q/k/v parameters three rows: it needs "
                             f"model.granularity: layerwise, got {granularity!r}")
        self.objective_part = parts.objective
        self.objective, self.loss_name = parts.objective.name, parts.objective.loss_name
        self.needs_experts = parts.objective.needs_experts
        if expert_weights_mb < 0:
            raise ValueError(f"model.expert_weights_mb must be >= 0, got {expert_weights_mb}")
        self.min_confidence, self.expert_chunk = min_confidence, expert_chunk
        self.expert_weights_mb = expert_weights_mb
        self.save_hyperparameters(ignore=["pool", "_parts"])
        self.strict_loading = False  # frozen tensors are rebuilt from the pool, not the checkpoint
        loaded = pool.load()
        self.loaded = loaded
        tv = prepared_task_vectors(loaded.task_vectors, trim, preprocess, preprocess_options,
                                   task_vector_dtype, offload)
        if split_qkv and (parts.merge is not None or not isinstance(tv, TaskVectors)):
            what = f"{type(self).__name__} builds its own merge" if parts.merge is not None else \
                "this pool's task vectors are low-rank (LoRA)"
            raise ValueError(f"model.split_qkv is an option of the plain fused merge; {what}: drop model.split_qkv")
        qkv = {"split_qkv": True} if split_qkv else {}  # builders without the option never see it
        self.merged = (parts.merge or plain_merge)(loaded.encoder, tv, layout=loaded.layout, granularity=granularity,
                                                   prior=prior, clamp=clamp, offload=offload, **qkv)
        self.merged.coefficients.requires_grad_(learn_coefficients)
        # heads of every evaluated task: the merged ones, then the unseen ones (no expert)
        self.heads = nn.ModuleDict({t: h.requires_grad_(False)
                                    for t, h in {**loaded.heads, **loaded.unseen_heads}.items()})
        self.unseen_tasks = list(loaded.unseen_heads)
        if adapt_tasks != "merged" and not self.unseen_tasks:
            raise ValueError(f"model.adapt_tasks: {adapt_tasks} adapts on the pool's unseen_tasks, and this pool has "
                             "none: list the target task(s) in the pool's unseen_tasks, or drop model.adapt_tasks")
        if adapt_tasks != "merged" and self.needs_experts:
            raise ValueError(f"model.adapt_tasks: {adapt_tasks} adapts on the unseen tasks {self.unseen_tasks}, which "
                             f"have no expert, and objective {self.objective!r} reads each task's expert: use an "
                             "objective without experts (entropy, cross_entropy) or drop model.adapt_tasks")
        self.adapt_tasks = adapt_tasks
        self.task_modules = nn.ModuleDict(parts.task_modules(self) if parts.task_modules else {})
        self.fingerprint = tv.fingerprint()
        # the checkpoint part: reads the live learned tensors (subclasses add theirs after this)
        self.guard = CheckpointGuard(self.method, self.fingerprint, self.learned_state)
        self.lr, self.per_task_backward = lr, per_task_backward
        # (subclasses with a schedule of their own, e.g. Twin-Merging's ``lr_schedule: linear``, keep theirs apart)
        self.optimizer_name, self.weight_decay, self.lr_schedule_name = optimizer, weight_decay, lr_schedule
        self.learn_coefficients = learn_coefficients
        self.metrics = nn.ModuleDict({t: MulticlassAccuracy(num_classes=self.num_classes(t), average="micro")
                                      for t in self.eval_tasks})
        self._eval_params: dict[str, torch.Tensor] | None = None
        self._fixed_params: dict[str, torch.Tensor] | None = None  # the merge, when coefficients are fixed
        self.features_part = AdaptationFeatures()  # experts' (and fixed merged) features per image
        if init_from is not None:
            self.init_coefficients(init_from)

    # ------------------------------------------------------------------- method hooks
    def extra_learned_state(self) -> dict[str, torch.Tensor]:
        """Learned tensors besides the coefficients and the per-task modules, by their state-dict
        name (e.g. WEMoE's routers, AdaRank's mask logits); none here."""
        return {}

    @property
    def trains_merge(self) -> bool:
        """Whether the merged parameters depend on trained tensors (then they are merged once per
        step with a graph; otherwise once per run, without one)."""
        return self.learn_coefficients

    @property
    def trains_encoder(self) -> bool:
        """Whether the encoder's forward needs a graph (its merged weights or parts inside it
        are trained); ``False`` lets fixed-merge methods cache the merged features."""
        return self.trains_merge

    def task_head(self, task: str) -> nn.Module:
        """What maps the merged encoder's output to ``task``'s logits (training, validate, test,
        :meth:`accuracies`): the frozen head here; subclasses put their per-task module in
        (unseen tasks, which have no per-task module, keep the frozen head)."""
        return self.heads[task]

    def task_losses(self, images: dict[str, torch.Tensor], indices: dict[str, torch.Tensor | None],
                    params: dict[str, torch.Tensor],
                    labels: dict[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """The method's :class:`~adamerge.methods.parts.Objective` per task on one batch."""
        return self.objective_part.losses(self, images, indices, params, labels)

    def export_heads(self) -> dict[str, nn.Module]:
        """The heads written by ``adamerge export`` (the learned ones where a method learns heads)."""
        return dict(self.heads)

    def export_task_modules(self) -> dict[str, torch.Tensor]:
        """Per-task tensors ``adamerge export`` writes to ``task_modules.safetensors`` (none here)."""
        return {}

    def export_extra(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """Method files ``adamerge export`` writes besides the merged weights, heads and per-task
        modules: ``{file name: (tensors, metadata)}``; read back by :meth:`load_export` (none here)."""
        return {}

    # The readers of an export (adamerge.exported.ExportedModel finds them through the registry,
    # by the method recorded in export.json): each writer above has its reader here.
    @classmethod
    def load_export(cls, encoder: nn.Module, folder: Path) -> nn.Module:
        """Rebuild the exported encoder on ``encoder`` (the architecture, any weights), in place,
        from ``folder``: here ``merged.safetensors``, every key of ``encoder`` (strict)."""
        from ..io.checkpoints import CheckpointError, load_state_dict
        path = Path(folder) / "merged.safetensors"
        result = encoder.load_state_dict(load_state_dict(path), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"{path}: does not fit {type(encoder).__name__}: missing "
                                  f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
        return encoder

    @classmethod
    def load_export_task_modules(cls, tensors: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
        """Per task, the module between the encoder and the head rebuilt from the tensors of
        ``task_modules.safetensors`` (what :meth:`export_task_modules` wrote); none here."""
        return {}

    # ----------------------------------------------------------------------------- helpers
    @property
    def task_names(self) -> list[str]:
        """The merged tasks (one expert each), in coefficient-column order."""
        return self.merged.task_names

    @property
    def eval_tasks(self) -> list[str]:
        """Every task validate/test score: the merged ones, then the unseen ones."""
        return self.task_names + self.unseen_tasks

    @property
    def adapted_tasks(self) -> list[str]:
        """The tasks the adaptation stream and the objective cover (``adapt_tasks``): the merged
        ones (default), the unseen ones, or all, in :attr:`eval_tasks` order."""
        return {"merged": self.task_names, "unseen": self.unseen_tasks, "all": self.eval_tasks}[self.adapt_tasks]

    def num_classes(self, task: str) -> int:
        """Output width of a task's head: its ``num_classes`` when it says (e.g. a verbaliser),
        else found by probing its last linear layer."""
        n = getattr(self.heads[task], "num_classes", None)
        return int(n) if n is not None else self._head_linear(task, last=True).out_features

    def feature_dim(self) -> int:
        """Width of the encoder's output, read from the first linear layer of the first head."""
        return self._head_linear(self.task_names[0], last=False).in_features

    def _head_linear(self, task: str, last: bool) -> nn.Linear:
        linears = [m for m in self.heads[task].modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"cannot tell the shape of head {task!r}: no nn.Linear in it")
        return linears[-1 if last else 0]

    def features(self, images: dict[str, torch.Tensor],
                 params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merged encoder's output per task; one encoder call when the image shapes allow."""
        tasks = list(images)
        shapes = {tuple(images[t].shape[1:]) for t in tasks}
        # With fixed coefficients nothing before the per-task modules is trained: no graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_encoder):
            if len(shapes) == 1 and len(tasks) > 1:
                sizes = [images[t].shape[0] for t in tasks]
                feats = self.encode(torch.cat([images[t] for t in tasks]), params, sizes)
                return dict(zip(tasks, feats.split(sizes)))
            return {t: self.encode(images[t], params, [images[t].shape[0]]) for t in tasks}

    def encode(self, images: torch.Tensor, params: dict[str, torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
        """The merged encoder on ``images``, consecutive task batches of ``sizes`` images (a
        method whose encoder treats each task batch as a whole, e.g. WEMoE's batch-reduced
        routing, reads them)."""
        return self.merged(images, params=params)

    def task_logits(self, images: dict[str, torch.Tensor],
                    params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of each task (its :meth:`task_head` on the merged encoder's features)."""
        return {t: self.task_head(t)(f) for t, f in self.features(images, params).items()}

    def expert_features(self, task: str, indices: torch.Tensor | None, device: torch.device,
                        images: torch.Tensor | None = None) -> torch.Tensor:
        """The task expert's features of the batch's images (computed once per image, cached;
        ``images``: the batch in hand, used on a miss instead of reading the images again)."""
        return self.features_part.expert(task, indices, device, type(self).__name__, images)

    @property
    def experts(self) -> FeatureCache | None:
        """The experts' feature cache (``None`` until :meth:`use_adaptation_data`)."""
        return self.features_part.experts

    def use_adaptation_data(self, datasets: Mapping[str, Dataset], chunk: int | None = None,
                            cache: bool = True, units: Units | None = None) -> None:
        """Where the experts' features come from: the adaptation datasets the stream indexes
        (called by :meth:`setup` with the data module's datasets and its stream's ``units``, the
        images computed together on a miss; benchmarks call it directly)."""
        if not self.needs_experts:
            return
        tv = self.loaded.task_vectors  # the experts as fine-tuned, even when trim is set
        if (self.hparams.get("trim") is None and self.hparams.get("preprocess") is None
                and self.hparams.get("task_vector_dtype") is None):
            tv = self.merged.task_vectors  # the same tensors, already on the module's device
        # the pool's encoder, not ``self.merged.module``: methods that route inside the encoder
        # (WEMoE, Twin-Merging) change their copy of it, and an expert is base + its own vector only
        self.features_part.use(self.loaded.encoder, tv, datasets, self.task_names, chunk or self.expert_chunk, cache,
                               units, int(self.expert_weights_mb) << 20)

    def train_features(self, images: dict[str, torch.Tensor], indices: dict[str, torch.Tensor | None],
                       params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`features` of a training batch. With fixed coefficients the merged encoder is
        frozen too, so each adaptation image's features are computed once and cached."""
        if self.trains_encoder or not self.features_part.caches_merged(indices):
            return self.features(images, params)
        return self.features_part.merged(self.merged.module, params, images, indices)

    def _batch(self, batch: dict[str, Any], every_task: bool = True
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]]:
        adapted = self.adapted_tasks
        missing = [t for t in adapted if t not in batch]
        if missing and every_task:
            raise ValueError(f"training batch has no data for tasks {missing}; got {list(batch)}")
        tasks = [t for t in adapted if t in batch]
        return ({t: images_of(batch[t]) for t in tasks}, {t: indices_of(batch[t]) for t in tasks},
                {t: labels_of_batch(batch[t]) for t in tasks})

    def _train_params(self) -> dict[str, torch.Tensor]:
        if self.trains_merge:
            return self.merged.merged_parameters(reuse_buffers=True)  # one merge per step
        if self._fixed_params is None:  # fixed coefficients: one merge for the whole run
            with torch.no_grad():
                self._fixed_params = self.merged.merged_parameters()
        return self._fixed_params

    def _direct_parameters(self) -> list[nn.Parameter]:
        """Trained tensors outside the merge (per-task modules, routers): their gradient comes
        straight from the loss, not through the merged parameters."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("merged.")]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the coefficients (if learned) and the per-task modules."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ train
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # ``data.task_steps``: each step's batch holds one task (tasks in turn); otherwise every task
        if getattr(getattr(self._trainer, "datamodule", None), "task_steps", False):
            present = [t for t in self.adapted_tasks if t in batch]
            if len(present) != 1:
                raise ValueError(f"data.task_steps: a training batch must hold exactly one of the tasks "
                                 f"{self.adapted_tasks}; got {list(batch)}")
            return self.adaptation_step(batch, int(self.global_step), every_task=False)
        return self.adaptation_step(batch, int(self.global_step))

    def adaptation_step(self, batch: dict[str, Any], step: int, every_task: bool = True) -> torch.Tensor:
        """The loss of one optimizer step on ``batch`` (``{task: (images, indices[, labels])}``),
        to back-propagate: what ``fit`` (:meth:`training_step`) and ``adamerge online``
        (:func:`adamerge.online.run_online`) both run, with the same checks. ``step``: the index
        of the step (methods with per-step randomness, e.g. Twin-Merging's dropout, key on it).
        ``every_task=False`` accepts a batch without some tasks: online (their stream ended) and
        ``fit`` with ``data.task_steps`` (one task per step); the loss and the logged per-task
        losses are then those of the tasks present."""
        images, indices, labels = self._batch(batch, every_task)
        params = self._train_params()
        if not self.per_task_backward:
            losses = self.task_losses(images, indices, params, labels)
            loss = torch.stack(list(losses.values())).sum()
            self._log_train(loss.detach(), {t: e.detach() for t, e in losses.items()})
            return loss
        return self._per_task_step(images, indices, params, labels)

    def _per_task_step(self, images: dict[str, torch.Tensor], indices: dict[str, torch.Tensor | None],
                       params: dict[str, torch.Tensor], labels: dict[str, torch.Tensor | None]) -> torch.Tensor:
        # Task by task: gradients w.r.t. the merged tensors (and the per-task modules) are
        # accumulated, then pushed through the merge once via a surrogate whose gradient w.r.t.
        # every trainable tensor is exact.
        leaves = {n: p.detach().requires_grad_(self.trains_merge) for n, p in params.items()}
        direct = self._direct_parameters()
        wrt = (list(leaves.values()) if self.trains_merge else []) + direct
        grads = [torch.zeros_like(p) for p in wrt]
        losses = {}
        for t in images:
            e = self.task_losses({t: images[t]}, {t: indices[t]}, leaves, {t: labels[t]})[t]
            if e.requires_grad:
                for acc, g in zip(grads, torch.autograd.grad(e, wrt, allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
            losses[t] = e.detach()
        self._log_train(torch.stack(list(losses.values())).sum(), losses)
        merged = list(params.values()) if self.trains_merge else []
        sources = merged + direct
        return sum((p * g).sum() for p, g in zip(sources, grads))

    def _log_train(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Every rank must take the same decision (a rank that raised alone would leave the
            # others waiting in the gradient all-reduce), and the logged value is the global one.
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {self.loss_name} {loss.item()} at step {self.global_step} "
                                     f"(per task: { {t: float(e) for t, e in losses.items()} }); the last "
                                     "good checkpoint is kept")
        if trainer is None:  # adamerge online: no logger
            return
        self.log(f"train/{self.loss_name}", loss, prog_bar=True)
        if not self.logs_this_step():
            return
        for t, e in losses.items():
            self.log(f"train/{self.loss_name}/{t}", e)
        lam = self.merged.lambdas().detach()
        self.log_dict({"coef/mean": lam.mean(), "coef/min": lam.min(), "coef/max": lam.max()})
        for k, t in enumerate(self.task_names):
            self.log(f"coef/{t}", lam[:, k].mean())

    def logs_this_step(self) -> bool:
        """Whether the logger writes this training step's metrics (every ``log_every_n_steps``
        steps, and when the run stops). Lightning drops step values logged in between, and each
        ``self.log`` costs about 2 ms of Python (16 calls took a quarter of a demo step on CPU),
        so the detailed metrics are logged only when they are written; the loss is logged every
        step for the progress bar. Lightning's own monitors (LearningRateMonitor,
        DeviceStatsMonitor) ask the logger connector the same question."""
        trainer = self._trainer
        if trainer is None:  # adamerge online: nothing is logged
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return connector is None or bool(connector.should_update_logs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.check_gradients()

    def check_gradients(self) -> None:
        """After the (all-reduced) backward, before the step: a non-finite gradient would make
        the learned tensors NaN and every later checkpoint useless (``fit`` and ``online``)."""
        for name, p in self.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                what = "coefficient gradient" if name == COEFFICIENTS_KEY else f"gradient of {name}"
                raise FloatingPointError(f"non-finite {what} at step {self.global_step} "
                                         f"({int((~torch.isfinite(p.grad)).sum())} of {p.grad.numel()} "
                                         "entries); the last good checkpoint is kept")

    def configure_optimizers(self) -> Any:
        steps = getattr(self._trainer, "max_steps", None) if self._trainer is not None else None
        return self.optimizers_for(steps if isinstance(steps, int) and steps > 0 else None)

    def optimizers_for(self, total_steps: int | None) -> Any:
        """The optimizer (and a per-step LR scheduler where the method has one), as
        ``configure_optimizers`` returns them, for a run of ``total_steps`` steps (``None``:
        unknown, no schedule): ``fit`` passes ``trainer.max_steps``, ``online`` its stream length."""
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__}: nothing to train (learn_coefficients=False and "
                             "no per-task modules)")
        optimizer = OPTIMIZERS[self.optimizer_name](params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = LR_SCHEDULES[self.lr_schedule_name]
        if schedule is None or not total_steps or total_steps < 1:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule(optimizer, total_steps),
                                                         "interval": "step"}}

    def refusal(self, path: str) -> str | None:
        """Why this module cannot take ``path`` (``fit``, ``resume``, ``test``, ``export``,
        ``predict``, ``online``, ``compare``), or ``None`` when it can: the CLI refuses such a
        run in one line, and the contract matrix (tests/test_contract.py) checks both. A class with
        ``learns = False`` (a training-free row, e.g. SMILE) refuses ``fit`` and ``online``;
        ``test``, ``export`` and ``compare`` take it as built, without a checkpoint."""
        if not self.learns and path in ("fit", "online"):
            return training_free(type(self).__name__, path)
        if path == "online" and self.objective_part.needs_labels:
            return (f"objective {self.objective!r} learns from labeled shots (data.shots); online "
                    "adapts on the unlabeled stream: use an unlabeled objective")
        if path == "online" and self.adapt_tasks != "merged":
            return (f"adapt_tasks: {self.adapt_tasks} adapts on the unseen tasks {self.unseen_tasks}; online "
                    "streams the merged tasks only: drop model.adapt_tasks")
        return None

    def on_train_start(self) -> None:
        self._fixed_params = None  # coefficients may have been restored from a checkpoint
        self.features_part.forget_merged()

    # -------------------------------------------------------------------------- evaluate
    def _start_eval(self) -> None:
        with torch.no_grad():
            self._eval_params = self.merged.merged_parameters()  # one merge per evaluation
        for m in self.metrics.values():
            m.reset()

    def _eval_step(self, batch: Any, dataloader_idx: int) -> None:
        task = self.eval_tasks[dataloader_idx]
        x, y = batch[0], batch[1]
        n = self.num_classes(task)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ValueError(f"task {task!r}: label {int(y.max()) if int(y.max()) >= n else int(y.min())} "
                             f"is outside the head's {n} classes")
        logits = self.task_logits({task: x}, self._eval_params)[task]
        self.metrics[task].update(logits, y)

    def _end_eval(self, stage: str) -> dict[str, float]:
        accs = {t: float(m.compute()) * 100 for t, m in self.metrics.items() if m.update_called}
        # torchmetrics already reduced the counts over ranks: every rank logs the same value.
        for t, a in accs.items():
            self.log(f"{stage}/acc/{t}", a, sync_dist=True)
        seen = [a for t, a in accs.items() if t not in self.unseen_tasks]
        unseen = [a for t, a in accs.items() if t in self.unseen_tasks]
        if seen:  # the merged tasks' average, as in the paper; unseen tasks are averaged apart
            self.log(f"{stage}/acc_avg", sum(seen) / len(seen), prog_bar=True, sync_dist=True)
        if unseen:
            self.log(f"{stage}/acc_avg_unseen", sum(unseen) / len(unseen), sync_dist=True)
        self._eval_params = None
        self.last_accuracies = accs
        return accs

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # -------------------------------------------------------------------- run set-up
    def setup(self, stage: str) -> None:
        """Check the data against the pool before any step, and keep DDP to the learned tensors."""
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        if isinstance(dm, MultiTaskDataModule):
            dm.select_tasks(self.task_names, unseen=self.unseen_tasks,
                            adapted=None if self.adapt_tasks == "merged" else self.adapted_tasks)
            splits = {"fit": [dm.adapt_split], "validate": [dm.eval_split],
                      "test": [dm.eval_split]}.get(stage, [])
            if stage == "fit" and trainer.limit_val_batches != 0:
                splits.append(dm.eval_split)
            dm.check({t: self.num_classes(t) for t in self.eval_tasks}, splits)
            if stage == "fit":
                self.use_adaptation_data({t: dm.adaptation_dataset(t) for t in self.task_names},
                                         units=dm.adaptation_stream().units())
        # DDP broadcasts every parameter and buffer at start-up and the buffers at every forward.
        # Only the learned tensors differ between steps; every rank rebuilds the frozen weights
        # from the same files, so nothing else needs to travel.
        from torch.nn.parallel import DistributedDataParallel
        learned = set(self.learned_shapes())
        frozen = [n for n, _ in self.named_parameters() if n not in learned]
        frozen += [n for n, _ in self.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)

    def configure_model(self) -> None:
        """Under :class:`~adamerge.methods.sharding.ShardedMergeStrategy`: shard the merge over
        the processes (FSDP2); any other strategy keeps it whole."""
        from .sharding import ShardedMergeStrategy, shard_module
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ShardedMergeStrategy):
            shard_module(self, strategy)

    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel):
            synced = [n for n, _ in self.named_parameters() if n not in wrapped.parameters_to_ignore]
            synced += [n for n, _ in self.named_buffers() if n not in wrapped.parameters_to_ignore]
            numel = sum(p.numel() for n, p in self.named_parameters() if n in synced)
            rank_zero_info(f"adamerge: DDP on {self.trainer.world_size} processes synchronises "
                           f"{synced} ({numel} values); frozen weights and buffers are not broadcast")

    def on_train_end(self) -> None:
        if self.trainer.world_size > 1:  # all ranks must hold the same learned tensors
            mine = torch.cat([t.detach().float().reshape(-1) for t in self.learned_state().values()])
            every = self.all_gather(mine)
            spread = float((every - every[0:1]).abs().max())
            if spread > 0:
                raise RuntimeError(f"learned tensors differ between DDP ranks by up to {spread:.3g}")
            rank_zero_info(f"adamerge: learned tensors identical on all {self.trainer.world_size} ranks")

    @torch.no_grad()
    def accuracies(self, datasets: Mapping[str, Dataset], batch_size: int = 256) -> dict[str, float]:
        """Top-1 accuracy in percent per task of the merged model with its current learned tensors
        (one merge, then :func:`adamerge.report.evaluate` with each :meth:`task_head`; what
        ``adamerge compare`` reports)."""
        params = {k: v.detach() for k, v in self.merged.merged_parameters().items()}
        return evaluate(self.merged.module, params, {t: self.task_head(t) for t in datasets},
                        datasets, batch_size, device=self.merged.coefficients.device)

    # ------------------------------------------------------------------------ checkpoints
    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps: the coefficients and the per-task modules' tensors
        (base weights, task vectors and heads come back from the pool)."""
        out = {COEFFICIENTS_KEY: self.merged.coefficients}
        out.update({f"{TASK_MODULES}.{k}": v for k, v in self.task_modules.state_dict().items()})
        out.update(self.extra_learned_state())
        return out

    def learned_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.learned_state().items()}

    def load_coefficients(self, path: str) -> dict[str, Any]:
        """Set every learned tensor (coefficients and per-task modules) from an adamerge
        checkpoint file of this method made on this pool; returns the checkpoint (checked by
        :func:`~adamerge.methods.checkpoint_guard.check_checkpoint`: method, task order, merged
        parameter names and shapes, weights hash, tensor shapes)."""
        checkpoint = self.guard.load(path)
        self._fixed_params = None
        self.features_part.forget_merged()
        return checkpoint

    def init_coefficients(self, path: str) -> None:
        """Start from the coefficients of a checkpoint of any method on this pool (``init_from``)."""
        if "init_from" not in inspect.signature(type(self).__init__).parameters:
            raise ValueError(f"{type(self).__name__} takes no init_from: its merge is fixed by its own "
                             "hyper-parameters")
        self.guard.load(path, coefficients_only=True)
        self._fixed_params = None
        self.features_part.forget_merged()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        split = {"split_qkv": True} if getattr(self.merged, "row_chunks", None) is not None else {}
        self.guard.for_saving(checkpoint, self.global_step, {"granularity": self.merged.granularity, **split})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = self._trainer.ckpt_path if self._trainer is not None else None
        self.guard.check(checkpoint, str(path) if path else "checkpoint")
        self._fixed_params = None
        self.features_part.forget_merged()
