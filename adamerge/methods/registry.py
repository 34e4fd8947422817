"""The method registry: the one list of merging methods adamerge knows.

Every method is one :class:`Method` entry: its name, its kind, a one-line description, what
builds it and the hyper-parameters it changes from the builder's defaults. ``adamerge demo``,
``adamerge compare``, ``adamerge bench``, the results report and the ``--help`` texts read this
table; nothing else in the package lists method names.

Kinds:

* ``static``: a function over the task vectors, ``merge(task_vectors, base, **hparams) ->
  {parameter name: merged tensor}`` (parameters it leaves out keep the base value); one model.
  Hyper-parameters named in ``tune`` are picked from a grid on a labeled split when not fixed.
* ``per_task``: one model per task, ``build(loaded_pool) -> {task: () -> state dict}``; each
  task is evaluated with its own model.
* ``fitted``: statistics of a few batches of the adaptation data, then one model,
  ``build(loaded_pool, data, **hparams) -> {parameter name: tensor}`` (``data``: task -> the
  task's adaptation dataset; e.g. RegMean's Gram matrices, Fisher's diagonal). Used by
  ``compare``, ``demo``, ``export`` and ``predict`` as a static row is.
* ``learned``: a LightningModule class, ``build(pool, **hparams)``, trained by a Lightning
  ``Trainer`` on unlabeled adaptation batches; after training ``module.accuracies(datasets,
  batch_size)`` gives its per-task accuracy. A module whose class sets ``learns = False`` (SMILE)
  is training-free: ``fit`` and ``online`` refuse it, and ``test``, ``export`` and ``compare`` take
  it as built (no checkpoint).

Adding a method: write its function or module (one module in this folder), add one entry to
:data:`REGISTRY`, add its test.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import lightning as L

from ..errors import unknown_name
from .adamerging import AdaMerging
from .adarank import AdaRank
from .concrete import ConcreteAdaMerging
from .fisher import fisher
from .lines import lines
from .localize_stitch import localize_stitch
from .magnitude_merges import della, magmax, pcb
from .model_stock import model_stock
from .references import individual, pretrained
from .regmean import regmean, regmean_plusplus
from .smile import Smile
from .sparsify import breadcrumbs, consensus, dare, emr, tall_masks
from .static import task_arithmetic, ties, weight_averaging
from .svd_merges import SCALING_GRID, iso_c, iso_cts, tsv_m
from .surgery import Surgery
from .tinting import Tinting
from .twin import TwinMerging
from .wemoe import WEMoE
from .wudi import wudi

Kind = Literal["static", "per_task", "fitted", "learned"]
KINDS: tuple[str, ...] = ("static", "per_task", "fitted", "learned")
ALL = "all"  # the --methods value that selects every registered method
# Method.paper value: the trim fraction the official AdaMerging++ keeps of this pool's task vectors
OFFICIAL_TRIM = "official"
# --protocol paper: the official AdaMerging schedule (EnnengYang/AdaMerging src/main_layer_wise_adamerging.py
# L151-152, L166-182; docs/fidelity.md): 500 steps, two batches of 16 per task per step (`if i > 0: break`),
# i.e. one batch of 32; the Method.paper_batch / paper_steps of a learned row without an official value of its own
PAPER_BATCH = 32
PAPER_STEPS = 500
_PAPER_DEFAULT_NOTE = "no official schedule of its own recorded: AdaMerging's (batch 32 = two of 16, 500 steps)"

# Arguments of a builder that are inputs, not hyper-parameters.
_INPUTS = {"static": ("task_vectors", "base"), "per_task": ("loaded",), "fitted": ("loaded", "data"),
           "learned": ("pool",)}


@dataclass(frozen=True)
class Recipe:
    """A published recipe of a learned row, written as a config by ``scripts/make_clip_configs.py``
    (``configs/<folder>/clip-<model>_8tasks_<row>.yaml``; the folder is the key in
    ``Method.recipes``: ``paper`` for the official code's, ``fusionbench`` for FusionBench's).

    Attributes:
        note: the config's header: what the recipe is and where it comes from.
        model: hyper-parameter -> ``(value, comment)`` replacing the row's defaults.
        data: data-module setting -> ``(value, comment)``; a value may be ``{open_clip model name:
            value, "*": value}`` where the recipe differs by architecture.
        steps: ``trainer.max_steps`` (``None``: the row's ``steps``); with ``data.task_steps`` on,
            steps over all tasks, written as ``steps x T`` single-task steps. ``steps_note``: its source.
        val_every: ``trainer.val_check_interval`` when the recipe evaluates before the end (``None``:
            once, at the end); ``val_note``: its source.
        precision: the recipe's ``trainer.precision`` (``None``: ours, ``32-true``).
        stem: the config's name after ``_8tasks_`` (``None``: the row's name without ``adamerging_``),
            for a recipe that is not the row's own protocol (aTLAS few-shot: ``atlas_fewshot``).
        unseen: tasks of the 8-task suite moved from the pool's experts to its ``unseen_tasks``
            (aTLAS: the target task, whose own task vector the recipe never uses).
        gradient_clip_val: the recipe's ``trainer.gradient_clip_val`` (gradient-norm clipping;
            ``None``: none).
    """

    note: str
    model: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    data: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    steps: int | None = None
    steps_note: str = ""
    val_every: int | None = None
    val_note: str = ""
    precision: str | None = None
    stem: str | None = None
    unseen: tuple[str, ...] = ()
    gradient_clip_val: float | None = None


@dataclass(frozen=True)
class Method:
    """One merging method.

    Attributes:
        name: the name users type (``--methods NAME``) and the report's row label.
        kind: ``static``, ``per_task``, ``fitted`` or ``learned`` (see the module docstring).
        description: one line for listings and the report.
        build: the merge function (static), the per-task builder (per_task) or the
            LightningModule class (learned).
        hparams: hyper-parameters that differ from ``build``'s own defaults.
        tune: hyper-parameter -> grid, picked on a labeled split unless fixed (static methods: one
            value for the merged model; per_task methods: one value per task, each task's model
            picking its own on that task's split).
        demo: whether the default ``adamerge demo`` / ``compare`` run includes it: the paper's
            table (the references, weight averaging, task arithmetic, TIES, task-wise and
            layer-wise AdaMerging), so that the demo's first run, suite build included, stays
            under 6 minutes on 2 CPU cores (the README's quick-start table); ``--methods all`` runs the rest.
        source: where the method and its defaults come from.
        starts_from: learned methods: another learned method whose final coefficients this one
            starts from (its ``init_from``). ``adamerge compare`` runs that one first and passes
            its checkpoint; a ``fit`` user gives ``--model.init_from CKPT``.
        data: learned and fitted methods: settings of the data module this method adapts (or
            fits) with (e.g. ``{"shots": 4, "shots_split": "train"}`` for labeled shots kept apart
            from the evaluated split); ``compare`` and ``export --method`` apply them to this row
            only (a ``fit`` user sets ``data.*``).
        bench: learned methods: ``adamerge bench`` times this method's step as a variant of the
            same name and reports its ratio to the AdaMerging step (``<name>_over_adamerging``).
        text: whether ``adamerge demo --suite text`` (language models, LoRA experts) runs it.
        models: how many models it keeps: ``1``, ``K`` (one per task) or ``per input`` (default
            from the kind: ``K`` for per_task, else ``1``).
        storage: what it stores besides one merged model (``-``: nothing).
        uses: the data it needs (default from the kind: ``-``; static rows with a ``tune`` grid:
            a labeled val split; learned rows: unlabeled test images).
        note: learned methods: the header of their generated configs (``scripts/make_clip_configs.py``):
            the recipe the defaults follow, with its source.
        steps: learned methods: optimizer steps of the published recipe (``trainer.max_steps``
            of the generated configs); ``steps_note`` says where the number comes from.
        paper: the hyper-parameters of the official code's recipe behind the published numbers,
            where they differ from ours (``--protocol paper``; fixed, never tuned). The value
            :data:`OFFICIAL_TRIM` is resolved per pool (:func:`adamerge.commands.compare.paper_protocol`).
        paper_batch: learned methods: images per task per step of the official recipe (``--protocol
            paper`` runs the row with it); an int, or ``{open_clip model name: value, "*": value
            for any other pool}`` where the official configs differ by architecture (AdaRank).
            Default :data:`PAPER_BATCH`, AdaMerging's.
        paper_steps: learned methods: optimizer steps of the official recipe under ``--protocol
            paper`` (``--steps`` overrides); int or mapping as ``paper_batch``. Default
            :data:`PAPER_STEPS`, AdaMerging's.
        paper_note: where ``paper_batch`` and ``paper_steps`` come from (file and line of the official
            code; docs/fidelity.md), or why the row keeps AdaMerging's.
        recipes: learned methods: published recipes as generated configs, by folder (:class:`Recipe`).
        linear: static methods: the hyper-parameter (``scaling``) in which the merge is ``base + value *
            delta``, ``delta`` depending on neither it nor ``base``: a grid search over it merges once
            per point of the other hyper-parameters (``delta``, with a zero base) and rescales
            (:func:`adamerge.compare.run_one_model`) instead of merging once per grid point.
    """

    name: str
    kind: Kind
    description: str
    build: Callable[..., Any]
    hparams: Mapping[str, Any] = field(default_factory=dict)
    tune: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    demo: bool = True
    source: str = ""
    starts_from: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    bench: bool = False
    text: bool = False
    models: str = ""
    storage: str = "-"
    uses: str = ""
    paper: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    steps: int = 500
    steps_note: str = "paper: 500"
    paper_batch: int | Mapping[str, int] = PAPER_BATCH
    paper_steps: int | Mapping[str, int] = PAPER_STEPS
    paper_note: str = _PAPER_DEFAULT_NOTE
    recipes: Mapping[str, Recipe] = field(default_factory=dict)
    linear: str | None = None

    def __post_init__(self) -> None:
        if self.name == ALL:
            raise ValueError(f"{ALL!r} is reserved (--methods {ALL} selects every method)")
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        known = self.builder_defaults()
        for key in [*self.hparams, *self.tune, *self.paper, *(k for r in self.recipes.values() for k in r.model)]:
            if key not in known:
                raise ValueError(f"method {self.name!r}: {key!r} is not an argument of "
                                 f"{self.build.__qualname__} (arguments: {sorted(known)})")
        if self.starts_from is not None and (self.kind != "learned" or "init_from" not in known):
            raise ValueError(f"method {self.name!r}: starts_from needs a learned method with an "
                             "init_from argument")
        if self.linear is not None and (self.kind != "static" or self.linear not in known):
            raise ValueError(f"method {self.name!r}: linear names a hyper-parameter of a static row, got {self.linear!r}")
        if self.bench and self.kind != "learned":
            raise ValueError(f"method {self.name!r}: only learned methods have a step to bench")
        if self.recipes and self.kind != "learned":
            raise ValueError(f"method {self.name!r}: recipes (generated configs) apply to learned methods only")
        if self.data and self.kind not in ("learned", "fitted"):
            raise ValueError(f"method {self.name!r}: data settings apply to learned and fitted methods only")
        for label, value in (("paper_batch", self.paper_batch), ("paper_steps", self.paper_steps)):
            values = list(value.values()) if isinstance(value, Mapping) else [value]
            if isinstance(value, Mapping) and "*" not in value:
                raise ValueError(f"method {self.name!r}: {label} needs a '*' entry (any other pool)")
            if not all(isinstance(v, int) and v >= 1 for v in values):
                raise ValueError(f"method {self.name!r}: {label} must be positive integers, got {value!r}")

    def paper_schedule(self, model: str | None = None) -> dict[str, int]:
        """``{"batch_size", "steps"}`` of the official recipe (``--protocol paper``) on the open_clip
        architecture ``model`` (e.g. ``"ViT-L-14"``; ``None``: any other pool, the ``"*"`` values)."""
        def pick(value: int | Mapping[str, int]) -> int:
            if not isinstance(value, Mapping):
                return value
            return value.get(model, value["*"]) if model is not None else value["*"]
        return {"batch_size": pick(self.paper_batch), "steps": pick(self.paper_steps)}

    def profile(self) -> dict[str, str]:
        """``{"models", "storage", "data"}``: the report's columns of what a method keeps and uses."""
        models = self.models or ("K" if self.kind == "per_task" else "1")
        uses = self.uses or ("unlabeled test images" if self.kind == "learned"
                             else "unlabeled adaptation images (statistics)" if self.kind == "fitted"
                             else "labeled val (tuning)" if self.tune else "-")
        return {"models": models, "storage": self.storage, "data": uses}

    def refusal(self, path: str) -> str | None:
        """Why this row cannot take ``path`` (``export``, ``predict``, ...), from its kind; ``None``
        when it can. A learned row's module answers for itself (``AdaMerging.refusal``)."""
        if self.kind == "per_task" and path in ("export", "predict"):
            return (f"one model per task ({self.profile()['storage']}), no single merged model to "
                    f"{path}; `adamerge compare --methods {self.name}` evaluates it")
        return None

    def builder_defaults(self) -> dict[str, Any]:
        """Keyword arguments of ``build`` (inputs excluded) with their default values."""
        out = {}
        for name, p in inspect.signature(self.build).parameters.items():
            # inputs, *args/**kwargs, and ``_`` arguments (a method's parts; not in configs either)
            if name in _INPUTS[self.kind] or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name.startswith("_"):
                continue
            out[name] = None if p.default is inspect.Parameter.empty else p.default
        return out

    def defaults(self) -> dict[str, Any]:
        """Every hyper-parameter with the value this method uses unless told otherwise."""
        return {**self.builder_defaults(), **self.hparams}

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`defaults` updated by ``overrides``; an unknown key is an error naming it."""
        values = self.defaults()
        for key, value in (overrides or {}).items():
            if key not in values:
                raise ValueError(unknown_name(f"hyper-parameter of {self.name}", key, values))
            values[key] = value
        return values


# Config headers of the learned rows (Method.note), one per recipe.
_ADAMERGING_NOTE = ("Paper defaults (Yang et al., ICLR 2024): prior 0.3, Adam lr 1e-3, 500 steps, 16 unlabeled "
                    "test images per task per step, coefficients clamped to [0, 1].")
_SURGERY_NOTE = ("Representation Surgery (Yang et al., ICML 2024; EnnengYang/RepresentationSurgery): a rank-16 "
                 "adapter per task on the encoder output, L1 to the expert's features, Adam lr 1e-3; the "
                 "coefficients stay fixed. Schedule differences from the official code: docs/fidelity.md.")
_SURGERY_STEPS = (1000, "official: 500 x 8 tasks x 2 one-task steps; FusionBench: 1000")
_ADAMERGING_PAPER = ("EnnengYang/AdaMerging src/main_layer_wise_adamerging.py L151-152 (500 epochs = 500 steps), "
                     "L166-182 (two batches of 16 per task per step: one of 32); the same in "
                     "main_task_wise_adamerging.py L185 and both ++ scripts")
_SURGERY_PAPER = ("EnnengYang/RepresentationSurgery src/main_AdaMerging_with_surgery.py L105-129: 500 iterations x "
                  "2 batches of 16 per task, one step per task batch: 1000 updates of 16 images per adapter")
_TWIN_PAPER = ("AdaMerging's (32, 500): the official router trainer (LZY-the-boys/Twin-Merging router.py L168-199) "
               "runs 50 epochs over up to 5,500 examples per task, no step count or vision batch to take")
_TWIN_NOTE = ("Twin-Merging (Lu et al., NeurIPS 2024; LZY-the-boys/Twin-Merging): task arithmetic 0.29 as the "
              "shared expert, each expert's exclusive part truncated to 10% of its rank, mixed per input by a "
              "router on the shared model's features, trained on task identity (Adam lr 5e-4). Differences: "
              "adamerge/methods/twin.py.")
# what both Surgery rows share (they differ in the coefficients the adapters sit on)
_SURGERY_ROW: dict[str, Any] = dict(
    storage="K feature adapters (rank 16)", uses="unlabeled test images + the experts",
    source="Yang et al., ICML 2024 (Representation Surgery); EnnengYang/RepresentationSurgery",
    note=_SURGERY_NOTE, steps=_SURGERY_STEPS[0], steps_note=_SURGERY_STEPS[1],
    paper_batch=16, paper_steps=1000, paper_note=_SURGERY_PAPER)

_TA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))   # 0.05 ... 1.0
_TIES_GRID = tuple(round(0.1 * i, 1) for i in range(1, 21))  # 0.1 ... 2.0
_TALL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)  # nik-dim/tall_masks src/utils/tallmask_utils.py L96
_LINES_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 ... 1.0: wang-kee/LiNeS src/eval/eval.py L215
_PCB_GRID = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # duguodong7/pcb-merging pcb-merging.py L64: lambda in [0.8, 1.3]
# what the fitted rows read: FusionBench's 256 images per task (their CLIP configs), of the adaptation split
_FITTED_DATA = "256 unlabeled adaptation images per task (adapt split, test by default)"

REGISTRY: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method("base", "static", "the pretrained model with its zero-shot heads (reference)", pretrained,
           source="-", text=True),
    Method("individual", "per_task", "each task's own fine-tuned expert (reference; K models)",
           individual, source="-", text=True, storage="K experts"),
    Method("weight_averaging", "static", "mean of the fine-tuned models", weight_averaging,
           source="Wortsman et al., ICML 2022 (model soups)", text=True),
    Method("task_arithmetic", "static", "base + scaling * sum of the task vectors",
           task_arithmetic, tune={"scaling": _TA_GRID}, linear="scaling", paper={"scaling": 0.3},
           source="Ilharco et al., ICLR 2023 (task arithmetic)", text=True),
    Method("ties", "static", "TIES: trim to the top `keep` magnitudes, elect signs, disjoint mean",
           ties, tune={"scaling": _TIES_GRID}, linear="scaling", paper={"scaling": 0.3, "merge": "sum", "keep": 0.2},
           source="Yadav et al., NeurIPS 2023 (TIES-merging)", text=True),
    Method("dare", "static",
           "DARE: drop each task-vector entry with probability p, rescale the kept by 1/(1-p), then "
           "task arithmetic", dare, tune={"scaling": _TA_GRID}, linear="scaling", text=True, demo=False,
           source="Yu et al., ICML 2024 (DARE); yule-BUAA/MergeLM model_merging_methods/mask_weights_utils.py"),
    Method("breadcrumbs", "static",
           "Model Breadcrumbs: per row drop the largest `top` magnitudes, keep the next `keep`, then "
           "task arithmetic", breadcrumbs, tune={"scaling": _TA_GRID}, linear="scaling", demo=False,
           source="Davari & Belilovsky, ECCV 2024 (Model Breadcrumbs); rezazzr/breadcrumbs src/task_vectors.py"),
    Method("consensus", "static",
           "Consensus merging: keep the entries that at least k TALL masks keep, then task arithmetic",
           consensus, tune={"scaling": _TA_GRID}, linear="scaling", demo=False,
           source="Wang et al., ICML 2024 (TALL masks / Consensus); nik-dim/tall_masks src/utils/tallmask_utils.py"),
    Method("tall_masks", "per_task",
           "TALL masks: per task, the base plus its TALL mask of the sum of the task vectors (K masks)",
           tall_masks, tune={"lambdas": _TALL_GRID}, storage="K binary masks + the sum of the task vectors", demo=False,
           uses="labeled val (lambda per task)",
           source="Wang et al., ICML 2024 (TALL masks); nik-dim/tall_masks src/utils/tallmask_utils.py, src/eval/eval.py"),
    Method("emr", "per_task",
           "EMR-Merging: elected unified task vector, per-task sign masks and rescalers (no hyper-parameter)",
           emr, storage="one unified task vector + K binary masks + K scalars", demo=False,
           source="Huang et al., NeurIPS 2024 (EMR-Merging); harveyhuang18/EMR_Merging merge_vit/src/main_emr_merging.py"),
    Method("tsv_m", "static",
           "TSV-M: per matrix each task's top r/K singular triplets, singular vectors orthogonalised "
           "(polar), summed; other tensors averaged", tsv_m, tune={"scaling": SCALING_GRID}, linear="scaling", demo=False,
           source="Gargiulo et al., CVPR 2025 (Task Singular Vectors); AntoAndGar/task_singular_vectors "
                  "src/utils/TSVM_utils.py"),
    Method("iso_c", "static",
           "Iso-C: per matrix the SVD of the summed task vectors with every singular value set to their "
           "mean; other tensors averaged", iso_c, tune={"scaling": SCALING_GRID}, linear="scaling", demo=False,
           source="Marczak et al., ICML 2025 (Iso-C); danielm1405/iso-merging src/utils/iso.py"),
    Method("iso_cts", "static",
           "Iso-CTS: the sum's top 80% directions plus each task's top directions off them, "
           "orthogonalised, flat spectrum; other tensors averaged", iso_cts, tune={"scaling": SCALING_GRID}, linear="scaling",
           demo=False, source="Marczak et al., ICML 2025 (Iso-CTS); danielm1405/iso-merging src/utils/iso.py"),
    Method("magmax", "static",
           "MagMax: per entry the task-vector value of largest magnitude, times scaling (0.5)", magmax,
           tune={"scaling": _TA_GRID}, linear="scaling", paper={"scaling": 0.5}, demo=False,
           source="Marczak et al., ECCV 2024 (MagMax); danielm1405/magmax src/merging/task_vectors.py L104-127, "
                  "merge_8datasets.py L25"),
    Method("model_stock", "static",
           "Model Stock: per tensor base + t * mean task vector, t from the mean angle between the task "
           "vectors (no hyper-parameter)", model_stock, demo=False,
           source="Jang et al., ECCV 2024 (Model Stock); tanganke/fusion_bench "
                  "fusion_bench/method/model_stock/model_stock.py L26-270"),
    Method("lines", "static",
           "LiNeS: the summed task vector scaled from alpha (1/K) at the first block to alpha + scaling "
           "at the last", lines, tune={"scaling": _LINES_GRID}, demo=False,
           source="Wang et al., ICLR 2025 (LiNeS); wang-kee/LiNeS src/eval/eval.py L56-126"),
    Method("della", "static",
           "DELLA: drop entries with probabilities ranked by magnitude per row (density 0.7 +/- 0.15), "
           "restore each tensor's L1 mass, elect signs, disjoint mean", della, tune={"scaling": _TIES_GRID}, linear="scaling",
           demo=False,
           source="Deep et al., 2024 (DELLA-Merging); arcee-ai/mergekit mergekit/sparsify.py L138-175, "
                  "merge_methods/generalized_task_arithmetic.py L119-184"),
    Method("pcb", "static",
           "PCB-merging: intra- and inter-task balancing scores, each task's top 5% as weights of a "
           "weighted mean of the task vectors, times scaling (1.2)", pcb, tune={"scaling": _PCB_GRID}, linear="scaling",
           paper={"scaling": 1.2}, demo=False,
           source="Du et al., NeurIPS 2024 (PCB-merging); duguodong7/pcb-merging vision_source_code/pcb.py L44-105"),
    Method("wudi", "static",
           "WUDI-merging: per weight matrix, 400 Adam steps from the summed task vectors towards least "
           "interference with each task vector (no data); other tensors averaged", wudi, demo=False,
           source="Cheng et al., ICML 2025 (WUDI-merging); tanganke/fusion_bench fusion_bench/method/wudi/wudi.py L17-60"),
    Method("fisher", "fitted",
           "Fisher merging: per entry the experts weighted by their diagonal Fisher (256 unlabeled adaptation "
           "images per task), each expert scaled by its Fisher's inverse norm", fisher, demo=False,
           uses=_FITTED_DATA,
           source="Matena & Raffel, NeurIPS 2022 (Fisher merging); tanganke/fusion_bench "
                  "fusion_bench/method/fisher_merging/clip_fisher_merging.py L138-183, fisher_merging.py L68-189"),
    Method("regmean", "fitted",
           "RegMean: each linear weight the least-squares fit of the experts' outputs on their tasks' inputs "
           "(Gram matrices of 256 unlabeled adaptation images per task, off-diagonal x 0.95); other tensors averaged",
           regmean, demo=False, uses=_FITTED_DATA,
           source="Jin et al., ICLR 2023 (RegMean); tanganke/fusion_bench fusion_bench/method/regmean/clip_regmean.py "
                  "L50-128, regmean.py L24-120"),
    Method("regmean_plusplus", "fitted",
           "RegMean++: RegMean one transformer block at a time, each block's Grams on the outputs of the merged "
           "blocks before it (256 unlabeled adaptation images per task, off-diagonal x 0.95)",
           regmean_plusplus, demo=False, uses=_FITTED_DATA,
           source="Nguyen et al., 2025 (RegMean++, arXiv 2508.03121); tanganke/fusion_bench "
                  "fusion_bench/method/regmean_plusplus/regmean_plusplus.py L164-311, clip_regmean_plusplus.py L54-210"),
    Method("localize_stitch", "fitted",
           "Localize-and-Stitch: a sparse mask of each task vector (sigmoid logits from its top 1e-5 magnitudes, 10 "
           "steps of CE on 64 labeled images per class), the masked task vectors added, averaged where masks overlap",
           localize_stitch, demo=False, data={"shots": 64, "shots_split": "train"},
           uses="64 labeled train images per class of each task (at most 1024 per task)",
           source="He et al., 2024 (Localize-and-Stitch, arXiv 2408.13656); uiuctml/Localize-and-Stitch localize_utils.py "
                  "L78-135, L184-321, vision/src/main_localize_stitch.py L48-60; uiuctml/MergeBench "
                  "merging/merging_methods/localize_utils.py, prepare_args.py L19-25"),
    Method("adamerging_taskwise", "learned",
           "AdaMerging, task-wise: one coefficient per task (entropy on unlabeled test batches)",
           AdaMerging, {"granularity": "taskwise"}, source="Yang et al., ICLR 2024 (AdaMerging)",
           text=True,
           note=_ADAMERGING_NOTE, paper_note=_ADAMERGING_PAPER),
    Method("adamerging_layerwise", "learned",
           "AdaMerging, layer-wise: one coefficient per task per parameter tensor (entropy)", AdaMerging,
           {"granularity": "layerwise"}, source="Yang et al., ICLR 2024 (AdaMerging)", text=True,
           note=_ADAMERGING_NOTE, paper_note=_ADAMERGING_PAPER,
           recipes={"fusionbench": Recipe(
               "FusionBench's layer-wise AdaMerging (fusion_bench/method/adamerging/layer_wise_adamerging.py): prior "
               "0.3, unclamped, one row per HF CLIP tensor (q/k/v apart), Adam 1e-3, batch 16, 1000 steps.",
               model={"clamp": (False, "FusionBench: clamp_weights false (config/method/adamerging/clip.yaml L11)"),
                      "split_qkv": (True, "FusionBench: HF CLIP's q_proj, k_proj, v_proj are three rows")},
               steps=1000, steps_note="FusionBench: max_steps 1000 (clip.yaml L19)")}),
    Method("adamerging_layerwise_pp", "learned",
           "AdaMerging++: layer-wise on TIES-trimmed task vectors (top 20%)", AdaMerging,
           {"granularity": "layerwise", "trim": 0.2}, paper={"trim": OFFICIAL_TRIM}, demo=False,
           source="Yang et al., ICLR 2024 (AdaMerging++)",
           note=_ADAMERGING_NOTE, paper_note=_ADAMERGING_PAPER),
    Method("adamerging_layerwise_dare", "learned",
           "AdaMerging layer-wise on DARE task vectors (p 0.5, rescaled by 2)", AdaMerging,
           {"granularity": "layerwise", "preprocess": "dare"}, demo=False,
           source="AdaMerging (Yang et al., ICLR 2024) on DARE (Yu et al., ICML 2024) vectors: our row",
           note=_ADAMERGING_NOTE),
    Method("adamerging_layerwise_tsv_m", "learned",
           "AdaMerging layer-wise on TSV-M's per-task components (orthogonalised task singular vectors)",
           AdaMerging, {"granularity": "layerwise", "preprocess": "tsv_m"}, demo=False,
           source="AdaMerging (Yang et al., ICLR 2024) on TSV-M (Gargiulo et al., CVPR 2025) components: our row",
           note=_ADAMERGING_NOTE),
    Method("adamerging_layerwise_pseudolabel", "learned",
           "layer-wise coefficients learned by cross-entropy to each expert's predicted class "
           "(no labels)", AdaMerging, {"granularity": "layerwise", "objective": "pseudo_label"},
           uses="unlabeled test images + the experts", demo=False,
           source="objective: the crosspseudo loss of AIM-SKKU/SyMerge src/main_symerge.py L339-347",
           note=_ADAMERGING_NOTE),
    Method("adamerging_layerwise_fewshot", "learned",
           "layer-wise coefficients learned by cross-entropy on 4 labeled training images per class "
           "(aTLAS-style few-shot; uses labels)", AdaMerging,
           {"granularity": "layerwise", "objective": "cross_entropy"},
           data={"shots": 4, "shots_split": "train"}, uses="4 labeled train images per class", demo=False,
           source="objective: aTLAS few-shot (Zhang et al., NeurIPS 2024); coefficients as AdaMerging",
           note=_ADAMERGING_NOTE,
           paper_note=("AdaMerging's (32, 500): aTLAS (fredzzhang/atlas src/learn_few_shots.py L421) trains 10 epochs "
                       "of batch 128 over the shots of one target task, no 8-task recipe to take a step count from"),
           recipes={"paper": Recipe(
               "aTLAS few-shot (Zhang et al., NeurIPS 2024; fredzzhang/atlas src/learn_few_shots.py): ONE target task, "
               "here sun397, learns layer-wise coefficients over the 7 OTHER tasks' vectors (its own is never "
               "loaded) by cross-entropy on its labeled shots: coefficients from 0, unclamped, AdamW lr 0.1, weight "
               "decay 0.1, cosine without warm-up, gradient-norm clip 1.0, fp16 autocast. Another target: move it "
               "from pool.experts to pool.unseen_tasks, put sun397 back among the experts (data.source.tasks keeps "
               "all 8), and set trainer.max_steps to 10 x ceil(classes x shots / 128) (at least 10 batches an "
               "epoch). Not reproduced: augmentation (RandomResizedCrop 0.5-1, flip), the 10 % validation hold-out "
               "and best-epoch selection (docs/fidelity.md).",
               model={"prior": (0.0, "aTLAS: coefficients start at 0, the zero-shot model (src/composition.py L66-67)"),
                      "clamp": (False, "aTLAS: coefficients not clamped"),
                      "lr": (0.1, "aTLAS: lr 0.1 (learn_few_shots.py, args.lr = 1e-1)"),
                      "optimizer": ("adamw", "aTLAS: AdamW"),
                      "weight_decay": (0.1, "aTLAS: weight decay 0.1 (args.wd)"),
                      "lr_schedule": ("cosine", "aTLAS: cosine_lr without warm-up over all steps"),
                      "adapt_tasks": ("unseen", "learn on the target (pool.unseen_tasks) only, over the others' vectors")},
               data={"shots": (4, "labeled images per class of the target (aTLAS: --subsample k; 1-16 in the paper)"),
                     "shots_split": ("train", "aTLAS: shots from the train split"),
                     "batch_size": (128, "aTLAS: batch 128 (ViT-L-14: 64 x 2 accumulation)")},
               steps=130, steps_note="aTLAS: 10 epochs x ceil(397 x 4 / 128) = 13 batches (sun397, 4 shots)",
               stem="atlas_fewshot", unseen=("sun397",), gradient_clip_val=1.0, precision="16-mixed")}),
    Method("wemoe", "learned",
           "WEMoE: task arithmetic (0.3) outside the MLPs; each MLP mixes its task vectors per "
           "sample by a trained router (entropy)", WEMoE, bench=True, demo=False, models="per input",
           storage="K MLP task vectors per block + routers",
           source="Tang et al., ICML 2024 (WEMoE); tanganke/weight-ensembling_MoE src/module/dict_moe.py",
           note=("WEMoE (Tang et al., ICML 2024; tanganke/weight-ensembling_MoE): task arithmetic 0.3 outside the "
                 "MLPs, a router per block mixing the MLP task vectors per sample, Adam lr 1e-3 + cosine, entropy. "
                 "Differences from the official code: docs/fidelity.md."),
           steps=1000, steps_note="official: 1000 (scripts/clip_dictmoe.py)",
           paper_batch=16, paper_steps=1000,
           paper_note=("tanganke/weight-ensembling_MoE scripts/clip_dictmoe.py L75-101: 1000 steps, tta_batch_size 16 "
                       "per task, one step"),
           recipes={"paper": Recipe(
               "The official recipe of WEMoE (tanganke/weight-ensembling_MoE scripts/clip_dictmoe.py), our defaults "
               "already: per-sample routing, Adam 1e-3 cosine over 1000 steps, batch 16; evaluated at 500 and 1000.",
               val_every=500, val_note="evaluate at step 500 and at the end, as the official script (scripts/clip_dictmoe.py L115)"),
               "fusionbench": Recipe(
               "FusionBench's WEMoE (fusion_bench/method/we_moe/): routing reduced over each task batch in training "
               "(per sample at evaluation), Adam 1e-4 without schedule, 1000 steps of 16 images per task.",
               model={"lr": (0.0001, "FusionBench: lr 1e-4 (config/method/wemoe/weight_ensembling_moe.yaml L11)"),
                      "lr_schedule": ("constant", "FusionBench: no schedule"),
                      "batch_reduce": (True, "FusionBench: batch_reduce true (L8), in training only")},
               steps=1000, steps_note="FusionBench: max_steps 1000 (L17)")}),
    Method("wemoe_sparse", "learned",
           "E-WEMoE (sparse WEMoE): WEMoE whose routed MLP task vectors keep the top 10% magnitudes of each "
           "tensor, one router shared by every block (FusionBench's recipe)", WEMoE,
           {"tv_prune_ratio": 0.9, "shared_router": True, "lr": 1e-4, "lr_schedule": "constant",
            "batch_reduce": True}, demo=False, models="per input",
           storage="K MLP task vectors per block, 90% of each tensor zero (stored dense) + one router",
           source="Shen, Tang, Yang et al., 2024 (E-WEMoE, arXiv 2410.21804); tanganke/fusion_bench "
                  "fusion_bench/models/sparse_we_moe.py L97-126, L186-190; config/method/wemoe/"
                  "sparse_weight_ensembling_moe.yaml L8-27",
           note=("E-WEMoE (Shen, Tang, Yang et al., 2024; FusionBench method/sparse_we_moe): WEMoE whose routed MLP "
                 "task vectors are magnitude-pruned per task and per tensor to 10% (tv_prune_ratio 0.9, no "
                 "rescaling), one router shared by every block, routing averaged over each task batch in training, "
                 "Adam lr 1e-4 without schedule, entropy. Differences: docs/fidelity.md."),
           steps=1000, steps_note="FusionBench: max_steps 1000 (sparse_weight_ensembling_moe.yaml L27)",
           paper_batch=16, paper_steps=1000,
           paper_note=("tanganke/fusion_bench config/method/wemoe/sparse_weight_ensembling_moe.yaml L25, L27: "
                       "batch_size 16 per task, max_steps 1000, one step over every task's batch")),
    Method("smile", "learned",
           "SMILE: the pretrained model whose linear layers add, per token, the top-1 of K rank-128 experts (each "
           "task vector's SVD truncation), routed by the token's norm on each task vector's top singular vector "
           "(training-free)", Smile, demo=False, models="per input", uses="- (training-free: no data, no training)",
           storage="K rank-k experts (SVD factors) + K x gate_k gate vectors per linear layer",
           source="Tang et al., 2024 (SMILE, arXiv 2408.10174); tanganke/fusion_bench fusion_bench/method/"
                  "smile_upscaling/smile_upscaling.py L224-254, fusion_bench/models/smile_moe/linear_from_module.py "
                  "L17-303, config/method/smile_upscaling/smile_upscaling.yaml L10-12",
           note=("SMILE upscaling (Tang et al., 2024; FusionBench method/smile_upscaling): training-free; every "
                 "linear layer adds the top-1 of K rank-128 SVD experts per token, gated by each task vector's top "
                 "gate_k = 1 right singular vectors. `adamerge test --config` evaluates it and `adamerge export "
                 "--config` writes it, without fit. Differences: docs/fidelity.md."),
           steps_note="training-free: no steps", paper_note="training-free: no schedule"),
    Method("twin_merging", "learned",
           "Twin-Merging: task arithmetic (0.29) as shared expert + each expert's exclusive part (10%-rank "
           "SVD) in the linear layers, mixed per input by a router trained on task identity", TwinMerging,
           data={"shots": 16, "shots_split": "train"}, demo=False, bench=True, models="per input",
           storage="K rank-10% exclusive parts per linear layer + a router MLP",
           uses="task identity of 16 train images per class (no class labels)",
           source="Lu et al., NeurIPS 2024 (Twin-Merging); LZY-the-boys/Twin-Merging discriminative/"
                  "twin_merge.py, router.py, sparsify.py",
           note=_TWIN_NOTE, steps_note="ours; official: 50 epochs of its router trainer",
           paper_note=_TWIN_PAPER),
    Method("twin_merging_entropy", "learned",
           "Twin-Merging with its router trained by the heads' entropy on unlabeled test batches", TwinMerging,
           {"objective": "entropy"}, demo=False, models="per input",
           storage="K rank-10% exclusive parts per linear layer + a router MLP",
           source="Twin-Merging (Lu et al., NeurIPS 2024) with AdaMerging's entropy objective: our row",
           note=_TWIN_NOTE, steps_note="ours; official: 50 epochs of its router trainer",
           paper_note=_TWIN_PAPER),
    Method("task_arithmetic_surgery", "learned",
           "Representation Surgery on task arithmetic (scaling 0.3): per-task feature adapters, L1 "
           "to the experts' features", Surgery, {"granularity": "taskwise", "prior": 0.3}, demo=False,
           **_SURGERY_ROW),
    Method("adamerging_layerwise_surgery", "learned",
           "Representation Surgery on the coefficients of a finished layer-wise AdaMerging run",
           Surgery, {"granularity": "layerwise"}, starts_from="adamerging_layerwise", demo=False,
           **_SURGERY_ROW,
           recipes={"paper": Recipe(
               "The official recipe of Representation Surgery (EnnengYang/RepresentationSurgery "
               "src/main_AdaMerging_with_surgery.py), our defaults already: 1000 updates of 16 images per adapter, "
               "on the official recipe's layer-wise AdaMerging (configs/paper/*_layerwise.yaml first).",
               steps_note="official: 500 iterations x 2 batches of 16, a step per task batch"),
               "fusionbench": Recipe(
               "FusionBench's Surgery (fusion_bench/method/surgery/clip_layer_wise_adamerging_surgery.py) on its "
               "layer-wise AdaMerging (configs/fusionbench/*_layerwise.yaml first): L2-normalised features.",
               model={"feature_norm": ("fusionbench", "FusionBench: L2-normalised features into the adapters and the L1 loss")},
               steps=1000, steps_note="FusionBench: surgery_steps 1000 (config/method/surgery/adamerging_surgery.yaml L26)",
               val_every=200, val_note="FusionBench: eval_iterations 200 (L25)")}),
    Method("tinting", "learned",
           "Model Tinting: layer-wise coefficients + a trainable head per task, CE to confident "
           "expert pseudo-labels", Tinting, bench=True, demo=False, storage="K tinted heads",
           uses="unlabeled test images + the experts",
           source="Model Tinting / SyMerge; AIM-SKKU/SyMerge src/main_symerge.py",
           note=("Model Tinting (AIM-SKKU/SyMerge, src/main_symerge.py): layer-wise coefficients + one trainable "
                 "head per task, CE to confident expert pseudo-labels, Adam lr 1e-2. Differences from the official "
                 "schedule: docs/fidelity.md."), steps_note="official: 500 epochs of one step per task",
           paper_batch=32, paper_steps=500,
           paper_note=("AIM-SKKU/SyMerge configs/symerge.yaml L30-31: epochs 500, batch_size 32; src/main_symerge.py L288-300 "
                       "(one step per task batch there, one step on every task's batch here)"),
           recipes={"paper": Recipe(
               "The official recipe of Model Tinting / SyMerge (AIM-SKKU/SyMerge src/main_symerge.py L288-300): 500 "
               "epochs, each one optimizer step per task batch of 32, under AMP (16-mixed needs a GPU).",
               data={"batch_size": (32, "official: batch_size 32 (configs/symerge.yaml)"),
                     "task_steps": (True, "official: one optimizer step per task batch, tasks in turn")},
               steps=500, steps_note="official: 500 epochs x one step per task", precision="16-mixed")}),
    Method("adarank", "learned",
           "AdaRank: layer-wise coefficients + learned masks over the singular components of each "
           "task vector's attention/MLP matrices (entropy, straight-through)", AdaRank, bench=True, demo=False,
           source="Lee et al., 2025 (AdaRank, arXiv 2503.22178); david3684/AdaRank "
                  "vision/src/models/merge_vit/adaptive.py",
           note=("AdaRank (Lee et al., 2025; david3684/AdaRank): layer-wise coefficients + straight-through masks "
                 "over the singular components of the blocks' attention/MLP task vectors, entropy, Adam lr 1e-3. "
                 "Differences from the official code (CART variant, oracle step selection): docs/fidelity.md."),
           steps=10000, steps_note="official: 10000 (configs/hydra_default.yaml)",
           paper_batch={"*": 16, "ViT-L-14": 4}, paper_steps=10000,
           paper_note=("david3684/AdaRank vision/configs/adarank_B_T8/adarank_TA.yaml L27-29: tta_batch_size 16, "
                       "tta_steps 10000; adarank_L_T8/adarank_TA.yaml L41, L44: ViT-L-14 batch 4, 10000 steps. The "
                       "8-task configs: the 14/20-task ones differ (L/14, 14 tasks: batch 2, 100000 steps) and are "
                       "not applied"),
           recipes={"paper": Recipe(
               "The official recipe of AdaRank (david3684/AdaRank vision/configs/adarank_*_T8/adarank_TA.yaml): 10000 "
               "steps, unclamped coefficients, bf16 (GPU); its best-step selection on test labels is not reproduced.",
               model={"initial_rank_ratio": (0.125, "official: mask logits 0 (mask_init), i.e. 1/K kept at K = 8"),
                      "clamp": (False, "official: coefficients unclamped")},
               data={"batch_size": ({"*": 16, "ViT-L-14": 4}, "official: 16 (ViT-B/32 config), 4 (ViT-L/14 config)")},
               steps=10000, steps_note="official: 10000 (adarank_TA.yaml); no oracle selection",
               val_every=500, val_note="the accuracy curve every 500 steps (logged, not used to pick)",
               precision="bf16-mixed")}),
    Method("concrete_adamerging", "learned",
           "Concrete AdaMerging: a shared Concrete mask over every task-vector entry meta-learned by entropy, "
           "then layer-wise AdaMerging under it", ConcreteAdaMerging, demo=False,
           source="Tang et al., 2023 (arXiv 2312.06173); tanganke/fusion_bench "
                  "fusion_bench/method/concrete_subspace/clip_concrete_adamerging.py:324 (ConcreteLayerWiseAdaMergingForCLIP)",
           note=("Concrete AdaMerging (Tang et al., 2023; FusionBench clip_concrete_layer_wise_adamerging.yaml): a "
                 "Concrete mask (T 0.5, logits 0) shared by the tasks, meta-learned for mask_steps steps (inner Adam "
                 "lr 1 from 0.3, outer Adam lr 1e-3 on the logits), then layer-wise AdaMerging (Adam 1e-3, "
                 "unclamped) under one draw of it. Differences from FusionBench: docs/fidelity.md."),
           steps=2000, steps_note=("FusionBench: max_steps 1000 (mask) + max_adamerging_steps 1000 (AdaMerging), "
                                   "clip_concrete_layer_wise_adamerging.yaml L12-13; mask_steps: half the run"),
           paper_batch=16, paper_steps=2000,
           paper_note=("FusionBench config/method/concrete_subspace/clip_concrete_layer_wise_adamerging.yaml L4, "
                       "L12-13: batch_size 16 per task, 1000 mask steps + 1000 AdaMerging steps (each mask step "
                       "draws two batches per task; ours reuses the step's one)")),
)})


def with_prerequisites(chosen: Sequence[str]) -> list[str]:
    """``chosen`` with every method's ``starts_from`` placed before it when missing."""
    out: list[str] = []

    def add(name: str) -> None:
        first = REGISTRY[name].starts_from
        if first is not None and first not in out:
            add(first)
        if name not in out:
            out.append(name)
    for name in chosen:
        add(name)
    return out


def _identity_mismatch(method: Method, cls: type, hp: Mapping[str, Any]) -> dict[str, Any]:
    """The identity hyper-parameters (``cls.identity`` and the row's own ``hparams``) on which
    ``hp`` differs from learned row ``method``: ``{key: hp's value}``."""
    defaults = method.defaults()
    out = {}
    for key in dict.fromkeys([*getattr(cls, "identity", ()), *method.hparams]):
        if key not in defaults:
            continue
        value = hp.get(key, defaults[key])
        if key == "init_from":  # a row that starts from another takes any checkpoint path
            if (value is not None) != (method.starts_from is not None):
                out[key] = value
        elif value != defaults[key]:
            out[key] = value
    return out


def row_of(module: Any) -> tuple[str, str]:
    """The registry row a learned module is, as ``(name, description)``.

    The row built by the module's class whose identity hyper-parameters (the class's
    ``identity`` and the row's own ``hparams``) the module keeps; other settings (learning rate,
    batch size, ...) do not change a row. A module that is no row (e.g. AdaMerging on
    Breadcrumbs-transformed vectors, which has no row of its own) is named after the nearest row
    of its class with its differences: ``adamerging_layerwise (preprocess='breadcrumbs')``. A
    class with no row: the module's ``method``."""
    cls, hp = type(module), dict(getattr(module, "hparams", {}) or {})
    rows = [m for m in REGISTRY.values() if m.kind == "learned" and m.build is cls]
    if not rows:
        doc = (cls.__doc__ or "").strip().splitlines()
        return str(getattr(module, "method", cls.__name__)), doc[0] if doc else ""
    scored = sorted(rows, key=lambda m: len(_identity_mismatch(m, cls, hp)))
    best = scored[0]
    diff = _identity_mismatch(best, cls, hp)
    if not diff:
        return best.name, best.description
    shown = ", ".join(f"{k}={v!r}" for k, v in diff.items())
    return f"{best.name} ({shown})", f"{best.description}; with {shown}"


class RecordRow(L.Callback):
    """Writes the registry row of the module (:func:`row_of`) into every checkpoint, as
    ``checkpoint["adamerge"]["row"]``: what ``adamerge test`` names its result row after.
    ``adamerge fit`` and ``compare`` add it to their trainers."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("adamerge", {})["row"] = row_of(pl_module)[0]


def export_reader(method_id: str | None) -> type:
    """The learned module class whose ``method`` (the identity written in ``export.json`` and
    checkpoints) is ``method_id``: the reader of that method's export files
    (``load_export`` / ``load_export_task_modules``). Static and per-task rows, and exports that
    name no method, are plain merged weights: :class:`AdaMerging`'s reader."""
    for m in REGISTRY.values():
        if m.kind == "learned" and getattr(m.build, "method", None) == method_id:
            return m.build
    return AdaMerging


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is an error with the nearest known one."""
    if name not in REGISTRY:
        raise ValueError(unknown_name("method", name, REGISTRY))
    return REGISTRY[name]


def names(kind: str | None = None) -> list[str]:
    """Registered method names in registry order (of one kind if given)."""
    return [n for n, m in REGISTRY.items() if kind is None or m.kind == kind]


def demo_methods() -> list[str]:
    """The methods the default ``adamerge demo`` (and ``compare``) run."""
    return [n for n, m in REGISTRY.items() if m.demo]


def text_methods() -> list[str]:
    """The methods ``adamerge demo --suite text`` runs (language-model pools)."""
    return [n for n, m in REGISTRY.items() if m.text]


def select(requested: Sequence[str] | None, default: Sequence[str] | None = None) -> list[str]:
    """Method names for a ``--methods`` value: ``None`` -> ``default`` (:func:`demo_methods`
    unless given); ``["all"]`` -> every method; otherwise the names given, checked, in the
    order given, without repeats."""
    if requested is None:
        return list(default) if default is not None else demo_methods()
    if list(requested) == [ALL]:
        return names()
    chosen: list[str] = []
    for name in requested:
        if name == ALL:
            raise ValueError(f"'{ALL}' cannot be combined with method names, got {list(requested)}")
        get(name)
        if name not in chosen:
            chosen.append(name)
    return chosen


def _value(v: Any) -> str:
    return f"{v[0]}..{v[-1]} ({len(v)} values)" if isinstance(v, tuple) and len(v) > 3 else repr(v)


def describe(methods: Iterable[str] | None = None, hparams: bool = True) -> str:
    """A plain-text listing of the registry (``adamerge compare --methods``)."""
    chosen = list(methods) if methods is not None else names()
    width = max(len(n) for n in chosen)
    lines = [f"{'method':<{width}}  {'kind':<8}  demo  description"]
    for name in chosen:
        m = REGISTRY[name]
        lines.append(f"{name:<{width}}  {m.kind:<8}  {'yes' if m.demo else 'no ':<4}  {m.description}")
        if hparams:
            indent = " " * (width + 2)
            shown = ", ".join(f"{k}={v!r}" for k, v in m.defaults().items())
            tuned = ", ".join(f"{k} picked on a labeled split from {_value(g)}" for k, g in m.tune.items())
            first = f"the final coefficients of {m.starts_from} (run first)" if m.starts_from else ""
            data = ", ".join(f"{k}={v!r}" for k, v in m.data.items())
            for label, text in (("hparams", shown), ("tuned", tuned), ("starts from", first), ("data", data)):
                if text:
                    lines += textwrap.wrap(text, 100, initial_indent=f"{indent}{label}: ",
                                           subsequent_indent=indent + " " * (len(label) + 2))
    return "\n".join(lines)
