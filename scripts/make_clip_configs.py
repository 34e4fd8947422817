"""Write configs/clip-<model>_<N>tasks_<method>.yaml (the shipped CLIP benchmark configs).

Run from the repository root after changing the template: python scripts/make_clip_configs.py
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from adamerge.methods import AdaMerging, registry

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vit-b-32": "ViT-B-32", "vit-l-14": "ViT-L-14"}
SUITES = yaml.safe_load((ROOT / "adamerge" / "data" / "tasks.yaml").read_text())["suites"]
COUNTS = {8: "tall8", 14: "tall14", 20: "tall20"}

TEMPLATE = """\
# {title}
# {method_doc}; {n} tasks, CLIP {model} (open_clip, `{pretrained}` weights).
{defaults_note}
#
{commands}
#
# Downloads on first use: the open_clip `{pretrained}` weights (open_clip's cache) and the test splits
# of the Hugging Face datasets named in adamerge/data/tasks.yaml (the datasets cache); zero-shot heads and
# decoded images are cached under $ADAMERGE_CACHE (default ~/.cache/adamerge).
# Experts: one fine-tuned image encoder per task under experts/{model}/<task>.safetensors, from
# `adamerge finetune`, `adamerge convert` (task-vectors pickles, Hugging Face CLIPVisionModel fine-tunes),
# or any open_clip image-tower / CLIP state dict (converted on the fly). Edit the paths to yours.
seed_everything: 0
model:
{model_block}
data:
  source:
    class_path: adamerge.data.HFSource
    init_args:
      tasks: [{tasks}]
      model: {model}
      pretrained: {pretrained}
      paths: {{}}                # task -> local save_to_disk folder or image folder, instead of the HF id
      image_cache: disk        # decode every image once (uint8 after resize/crop) under $ADAMERGE_CACHE/images
      decode_threads: 8
  batch_size: 16               # {batch_comment}
  eval_batch_size: 256
  adapt_split: test            # the paper adapts on the test images themselves
  eval_split: test
  num_workers: 8{data_extra}
trainer:
  max_steps: {steps:<18}# {steps_note}
  val_check_interval: {steps:<9}# evaluate once, at the end
  check_val_every_n_epoch: null
  log_every_n_steps: 10
  accelerator: auto
  devices: 1
  precision: 32-true           # bf16-mixed is faster on recent GPUs (not the paper's setting)
checkpoint:
  every_n_train_steps: 50      # checkpoints of the learned tensors only; resume with --ckpt_path last
  save_last: true
  save_top_k: -1
"""


POOL = """\
pool:
  class_path: adamerge.models.OpenCLIPPool
  init_args:
    model: {model}
    pretrained: {pretrained}
    experts:                 # task -> fine-tuned image encoder (same order as data.source.tasks)
{experts}{unseen}
    tasks_file: null         # YAML of extra / overriding tasks (see adamerge/data/tasks.yaml)
    allow_pickle: false      # true only for trusted pickled checkpoints; better: adamerge convert
    text_device: cpu         # where the text tower runs once to build the zero-shot heads (cached)"""

# Comments of the model arguments written into the configs.
COMMENTS = {
    "granularity": "taskwise: one coefficient per task; layerwise: one per task per tensor",
    "prior": "initial coefficient",
    "clamp": "coefficients clamped to [0, 1]",
    "lr": "Adam learning rate",
    "per_task_backward": "true: back-propagate task by task (activation memory of one task)",
    "learn_coefficients": "false: coefficients fixed (prior, or init_from's)",
    "rank": "adapter bottleneck width (paper: 16)",
    "split_qkv": "true: q, k and v of each fused in_proj get a coefficient row each (FusionBench's HF CLIP rows)",
    "feature_norm": "none: raw features (official Surgery); fusionbench: L2-normalised (FusionBench)",
    "loss": "pseudo_confidence (official crosspseudoconf) or entropy",
    "objective": "entropy (the paper), pseudo_label (CE to experts' predictions), cross_entropy (data.shots labels)",
    "min_confidence": "pseudo_label: drop images the expert is less sure of (0 keeps all)",
    "offload": "true: task vectors stay in (pinned) CPU memory, streamed per merge",
    "expert_chunk": "adaptation images per expert forward (expert features cached per image)",
    "scaling": "task arithmetic outside the routed MLPs (official 0.3)",
    "init_lambda": "routers' output bias at the start: the MLPs start near task arithmetic",
    "router_hidden_layers": "2: Linear(D, D), ReLU, Linear(D, K) per block (official)",
    "lr_schedule": "constant, or cosine: annealed to 0 over max_steps",
    "mlps": "null: every MLP (c_fc/c_proj pairs) is routed",
    "batch_first": "open_clip >= 2.23 runs its transformer batch-first",
    "routing_block_numel": "null: 2^21 values per block on CPU, 2^26 on GPU",
    "batch_reduce": "true: one routing vector per task batch in training (FusionBench); evaluation per sample",
    "tv_prune_ratio": "E-WEMoE: the fraction of each routed MLP task vector pruned by magnitude (0: none)",
    "shared_router": "E-WEMoE: one router for every block, each routing on its own MLP input",
    "initial_rank_ratio": "fraction of singular components kept at the start (TA variant: 1.0)",
    "mask_temp": "mask probability sigmoid(logit / mask_temp) (official 10)",
    "masked": "attn_mlp: the blocks' attention and MLP matrices (official)",
    "cache_dir": "null: SVD factors cached under $ADAMERGE_CACHE/svd",
    "rank_fraction": "fraction of each exclusive part's rank kept (official 0.1)",
    "storage": "auto: low-rank factors or dense, whichever is smaller per layer",
    "layers": "linear: every nn.Linear; mlp: the MLPs only",
    "router_hidden": "null: 2 x the feature width (official)",
    "router_norm": "batch: BatchNorm in the router (official)",
    "router_dropout": "official 0.5",
    "preprocess": "learn on transformed task vectors: ties, dare, breadcrumbs, consensus, tsv_m",
    "preprocess_options": "the transform's options (null: its defaults)",
    "optimizer": "adam (the paper) or adamw (decoupled weight decay)",
    "weight_decay": "the optimizer's weight decay (0: none)",
    "adapt_tasks": "merged: adapt on the tasks with an expert; unseen: the pool's unseen_tasks only; all: both",
    "mask_steps": "steps learning the Concrete mask before AdaMerging (null: half the run; FusionBench 1000 + 1000)",
    "temperature": "Concrete (Gumbel-sigmoid) temperature of the mask samples (FusionBench 0.5)",
    "initial_logits": "the mask logits' start (FusionBench 0: keep probability 1/2)",
    "mask_lr": "Adam learning rate of the mask logits (FusionBench lr 1e-3)",
    "base_lr": "Adam learning rate of the inner coefficient step while learning the mask (FusionBench 1)",
    "eval_mask_type": "continuous (FusionBench) or discrete: the draw of the mask fixed for AdaMerging and export",
    "mask_seed": "mixed into the seed of every mask draw",
}

# Comments of a method class's own meaning of a shared argument name (class name -> key -> comment).
CLASS_COMMENTS = {
    "AdaMerging": {"lr": "learning rate of model.optimizer"},
    "WEMoE": {"lr_schedule": "cosine over max_steps (official) or constant (FusionBench)"},
    "ConcreteAdaMerging": {"lr": "Adam learning rate of the coefficients after mask_steps (FusionBench adamerging_lr 1e-3)"},
    "TwinMerging": {
        "scaling": "task arithmetic of the shared expert (official 0.29)",
        "objective": "task_id: the router learns each image's task (official); entropy: the heads' entropy",
        "lr": "Adam learning rate of the router (official 5e-4)",
        "lr_schedule": "linear: decay to 0 over max_steps (official) or constant",
    },
}

# Data settings of rows that need them (Method.data), with their comments.
DATA_COMMENTS = {"shots": "labeled images per class per task (few-shot supervised objective)",
                 "shots_split": "where the shots come from (not the evaluated test split)"}

def commands(name: str, config: str, stem: str) -> str:
    """The header's commands: fit, test and export of the run's checkpoint; a training-free row
    (its module's ``learns`` is false: SMILE) is tested and exported as built."""
    if not getattr(registry.get(name).build, "learns", True):
        return (f"#   adamerge test   --config configs/{config} --trainer.default_root_dir runs/{stem}   (nothing to fit)\n"
                f"#   adamerge export --config configs/{config} --out runs/{stem}/export")
    return (f"#   adamerge fit  --config configs/{config} --trainer.default_root_dir runs/{stem}\n"
            f"#   adamerge test --config configs/{config} --ckpt_path runs/{stem}/checkpoints/last.ckpt\n"
            f"#   adamerge export --config configs/{config} --ckpt_path runs/{stem}/checkpoints/last.ckpt --out runs/{stem}/export")


def header(name: str) -> tuple[str, int, str]:
    """A learned row's config header, its steps and their source, from its registry entry."""
    method = registry.get(name)
    note = "\n".join(textwrap.wrap(method.note, 100, initial_indent="# ", subsequent_indent="# "))
    return note, method.steps, method.steps_note


def model_block(name: str, model: str, experts: str, n: int, big: bool, stem_of,
                unseen: list[str] | None = None, overrides: dict[str, tuple[object, str]] | None = None) -> str:
    """The ``model:`` section of one method's config (``unseen``: tasks evaluated, not merged;
    ``overrides``: key -> (value, comment) replacing the row's defaults)."""
    method = registry.get(name)
    hp = method.defaults()
    if "per_task_backward" in hp:  # only where the method's constructor takes it
        hp["per_task_backward"] = big
    overrides = overrides or {}
    unknown = [k for k in overrides if k not in hp]
    if unknown:
        raise KeyError(f"{name} has no hyper-parameters {unknown}")
    hp.update({k: v for k, (v, _) in overrides.items()})
    adapted = hp.get("adapt_tasks", "merged") != "merged"  # the unseen tasks are adapted on (aTLAS's target)
    unseen_line = (f"\n    unseen_tasks: [{', '.join(unseen)}]" + (
        "   # the target: zero-shot head, no expert (its task vector unused); adapted on (model.adapt_tasks)"
        if adapted else "   # zero-shot heads only: evaluated, not merged, not adapted on") if unseen else "")
    pool = POOL.format(model=model, pretrained="openai", experts=experts, unseen=unseen_line)
    lines = []
    for key, value in hp.items():
        if key == "init_from" and method.starts_from:
            value = f"runs/{stem_of(method.starts_from)}/checkpoints/last.ckpt"
            comment = f"the finished {method.starts_from} run (run its config first)"
        elif key in overrides:
            comment = overrides[key][1]
        elif key == "trim":
            comment = ("AdaMerging++: keep the top 20% of each task vector (TIES)" if value
                       else "AdaMerging++ sets 0.2")
        elif key == "task_vector_dtype":
            comment = f"bfloat16 halves task-vector memory ({n} x the image tower in float32 otherwise)"
        elif key == "init_from":
            comment = "a checkpoint whose coefficients to start from (e.g. an AdaMerging run)"
        else:
            comment = CLASS_COMMENTS.get(method.build.__name__, {}).get(key, COMMENTS.get(key, ""))
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        pad = max(27 - len(key), len(text) + 1)
        lines.append(f"{key}: {text:<{pad}}# {comment}" if comment else f"{key}: {text}")
    body = pool.splitlines() + lines
    if method.build is AdaMerging:  # the plain form: no class_path needed
        return "\n".join("  " + line for line in body)
    return "\n".join([f"  class_path: adamerge.methods.{method.build.__name__}", "  init_args:"]
                     + ["    " + line for line in body])


def data_extra(name: str) -> str:
    """Lines of the ``data:`` section for a method's own data settings (``Method.data``)."""
    return "".join(f"\n  {k}: {str(v):<{max(25 - len(k), len(str(v)) + 1)}}# {DATA_COMMENTS.get(k, '')}"
                   for k, v in registry.get(name).data.items())


def batch_comment(name: str) -> str:
    """The comment of ``data.batch_size``: a row that learns from labeled shots steps on them."""
    if "shots" in registry.get(name).data:
        return "images per task per step, drawn from the shots"
    return "unlabeled test images per task per step (paper: 16)"


def config_methods() -> dict[str, str]:
    """Config suffix -> registry name of every learned method with a CLIP config."""
    out = {}
    for name in registry.names("learned"):
        suffix = name.removeprefix("adamerging_")
        out[suffix] = name
    return out


ADD_ON_COUNTS = (8,)  # Surgery / Tinting / WEMoE / AdaRank configs: the 8-task benchmark of their papers


def main() -> None:
    suffix_of = {v: k for k, v in config_methods().items()}
    for key, model in MODELS.items():
        for n, suite in COUNTS.items():
            tasks = SUITES[suite]
            stem_of = lambda name: f"clip-{key}_{n}tasks_{suffix_of[name]}"
            for method in config_methods().values():
                if registry.get(method).build is not AdaMerging and n not in ADD_ON_COUNTS:
                    continue
                name = f"{stem_of(method)}.yaml"
                experts = "\n".join(f"      {t}: experts/{model}/{t}.safetensors" for t in tasks)
                big = key == "vit-l-14" or n > 8
                note, steps, steps_note = header(method)
                text = TEMPLATE.format(
                    title=name, method_doc=registry.get(method).description, n=n, model=model,
                    pretrained="openai", name=name, stem=name.removesuffix(".yaml"),
                    defaults_note=note, steps=steps, steps_note=steps_note,
                    commands=commands(method, name, name.removesuffix(".yaml")),
                    model_block=model_block(method, model, experts, n, big, stem_of),
                    tasks=", ".join(tasks), data_extra=data_extra(method), batch_comment=batch_comment(method))
                official = registry.get(method).recipes.get("paper")
                if official and official.val_every and not (official.model or official.data):
                    # our defaults are the official recipe: evaluate when it does too (WEMoE: 500 and 1000)
                    line = next(x for x in text.splitlines() if x.startswith("  val_check_interval:"))
                    text = text.replace(line, f"  val_check_interval: {official.val_every:<9}# {official.val_note}")
                (ROOT / "configs" / name).write_text(text)
                print("wrote", name)


# The AdaMerging paper's two other protocols on ViT-B/32 (layer-wise AdaMerging; run every method
# on them with `adamerge compare --config ... --methods ...`).
# Generalisation (paper Table 5): merge 6 tasks, evaluate the 2 others with their zero-shot heads.
# Splits as in FusionBench config/modelpool/CLIPVisionModelPool/clip-vit-base-patch32_generalization_exp{1,2}.yaml.
# Robustness (paper Table 6): 4 tasks, adaptation and test on corrupted test images; tasks as in
# FusionBench config/modelpool/CLIPVisionModelPool/clip-vit-base-patch32_robustness_corrupted.yaml.
PROTOCOLS = {
    "unseen-mnist-eurosat": {"tasks": ["sun397", "stanford_cars", "resisc45", "dtd", "svhn", "gtsrb"],
                             "unseen": ["mnist", "eurosat"],
                             "note": "# Generalisation protocol of the AdaMerging paper (Table 5, first split): merge 6 tasks and also\n"
                                     "# evaluate MNIST and EuroSAT, which have zero-shot heads but no expert (reported as unseen)."},
    "unseen-resisc45-svhn": {"tasks": ["sun397", "stanford_cars", "gtsrb", "eurosat", "dtd", "mnist"],
                             "unseen": ["resisc45", "svhn"],
                             "note": "# Generalisation protocol of the AdaMerging paper (Table 5, second split): merge 6 tasks and also\n"
                                     "# evaluate RESISC45 and SVHN, which have zero-shot heads but no expert (reported as unseen)."},
    "corrupted-4tasks": {"tasks": ["stanford_cars", "eurosat", "resisc45", "gtsrb"], "unseen": [],
                         "data": "\n  corruption: motion_blur       # motion_blur, impulse_noise, gaussian_noise, pixelate, spatter,\n"
                                 "                                # contrast, jpeg_compression (adapt and test on corrupted test images)\n"
                                 "  severity: 3                   # 1-5; not stated by the paper's code we read (docs/fidelity.md)",
                         "note": "# Robustness protocol of the AdaMerging paper (Table 6): 4 tasks, adaptation and evaluation on\n"
                                 "# corrupted test images; change data.corruption for the 7 corruption types."},
}


def protocol_configs() -> None:
    """The generalisation and robustness configs of :data:`PROTOCOLS` (ViT-B/32, layer-wise)."""
    key, model, method = "vit-b-32", "ViT-B-32", "adamerging_layerwise"
    for tag, spec in PROTOCOLS.items():
        name = f"clip-{key}_{tag}_layerwise.yaml"
        experts = "\n".join(f"      {t}: experts/{model}/{t}.safetensors" for t in spec["tasks"])
        note, steps, steps_note = header(method)
        text = TEMPLATE.format(
            title=name, method_doc=registry.get(method).description, n=len(spec["tasks"]), model=model,
            pretrained="openai", name=name, stem=name.removesuffix(".yaml"),
            defaults_note=spec["note"] + "\n" + note, steps=steps, steps_note=steps_note,
            commands=commands(method, name, name.removesuffix(".yaml")),
            model_block=model_block(method, model, experts, len(spec["tasks"]), False,
                                    lambda m: m, spec["unseen"]),
            tasks=", ".join(spec["tasks"] + spec["unseen"]), data_extra=spec.get("data", ""),
            batch_comment=batch_comment(method))
        (ROOT / "configs" / name).write_text(text)
        print("wrote", name)


# The official AdaMerging code's own recipe (EnnengYang/AdaMerging, src/), where it differs from
# our defaults (docs/fidelity.md): each step sums the mean entropies of two shuffled batches of 16
# per task (main_*_adamerging*.py break after `if i > 0`), i.e. one batch of 32 (Adam is invariant
# to the factor 2 of the loss, up to its eps); AdaMerging++ keeps the top 20 % of one flat vector
# that also holds the six text-side tensors of the checkpoints (token and positional embeddings,
# ln_final, text_projection, logit_scale), whose task vectors are zero: the visual entries kept are
# 0.2 * (visual + text-side) / visual of them, computed from open_clip's architectures.
PAPER_TRIM = {"vit-b-32": 0.2583,   # 0.2 * (87,849,216 + 25,599,489) / 87,849,216
              "vit-l-14": 0.2254}   # 0.2 * (303,966,208 + 38,595,841) / 303,966,208
PAPER_METHODS = {"taskwise": ("adamerging_taskwise", False), "layerwise": ("adamerging_layerwise", False),
                 "taskwise_pp": ("adamerging_taskwise", True), "layerwise_pp": ("adamerging_layerwise_pp", True)}
PAPER_SOURCES = {"taskwise": "main_task_wise_adamerging.py", "layerwise": "main_layer_wise_adamerging.py",
                 "taskwise_pp": "main_task_wise_adamergingpp.py", "layerwise_pp": "main_layer_wise_adamergingpp.py"}


def paper_configs() -> None:
    """configs/paper/: the 8-task CLIP runs with the official code's recipe (:data:`PAPER_TRIM`)."""
    (ROOT / "configs" / "paper").mkdir(exist_ok=True)
    tasks = SUITES[COUNTS[8]]
    for key, model in MODELS.items():
        for suffix, (method, pp) in PAPER_METHODS.items():
            name = f"paper/clip-{key}_8tasks_{suffix}.yaml"
            experts = "\n".join(f"      {t}: experts/{model}/{t}.safetensors" for t in tasks)
            note = ("# The official code's recipe (EnnengYang/AdaMerging src/" + PAPER_SOURCES[suffix] + "): prior 0.3,\n"
                    "# Adam lr 1e-3, 500 steps, coefficients clamped to [0, 1], two batches of 16 unlabeled test images\n"
                    "# per task per step" + (f", TIES trim keeping {PAPER_TRIM[key]:.2%} of the visual entries" if pp else "")
                    + ".\n# Our defaults: configs/clip-" + key + "_8tasks_*.yaml; differences: docs/fidelity.md.")
            text = TEMPLATE.format(
                title=name, method_doc=registry.get(method).description + (" + TIES trim (AdaMerging++)" if suffix == "taskwise_pp" else ""),
                n=8, model=model, pretrained="openai", name=name, stem=name.removesuffix(".yaml"),
                defaults_note=note, steps=500, steps_note="official: epochs = 500",
                commands=commands(method, name, name.removesuffix(".yaml")),
                model_block=model_block(method, model, experts, 8, key == "vit-l-14", lambda m: m),
                tasks=", ".join(tasks), data_extra="", batch_comment=batch_comment(method))
            text = text.replace("  batch_size: 16               # unlabeled test images per task per step (paper: 16)",
                                "  batch_size: 32               # two batches of 16 per task per step, their mean entropies summed (official)")
            trim_lines = [line for line in text.splitlines() if line.lstrip().startswith("trim:")]
            assert len(trim_lines) == 1, name
            if pp:
                value = f"trim: {PAPER_TRIM[key]}"
                text = text.replace(trim_lines[0], " " * (len(trim_lines[0]) - len(trim_lines[0].lstrip()))
                                    + f"{value:<29}# official-equivalent: top 20% of the checkpoints' flat vector")
            (ROOT / "configs" / name).write_text(text)
            print("wrote", name)


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_configs() -> None:
    """configs/paper/ and configs/fusionbench/: every learned row's published recipes
    (``Method.recipes``: the official code's and FusionBench's) for ViT-B/32 and ViT-L/14, 8 tasks."""
    tasks = SUITES[COUNTS[8]]
    rows = [n for n in registry.names("learned") if registry.get(n).recipes]
    for key, model in MODELS.items():
        for name in rows:
            for folder, recipe in registry.get(name).recipes.items():
                (ROOT / "configs" / folder).mkdir(exist_ok=True)
                experts_dir = f"experts/{'fusionbench/' if folder == 'fusionbench' else ''}{model}"
                experts = "\n".join(f"      {t}: {experts_dir}/{t}.safetensors" for t in tasks if t not in recipe.unseen)

                def stem_of(row: str, folder: str = folder) -> str:  # the run a row starts from: same folder
                    return f"{folder}/clip-{key}_8tasks_{row.removeprefix('adamerging_')}"
                stem = f"clip-{key}_8tasks_{recipe.stem}" if recipe.stem else stem_of(name).split("/", 1)[1]
                pick = lambda v: v.get(model, v["*"]) if isinstance(v, dict) else v  # noqa: E731
                data = {k: (pick(v), c) for k, (v, c) in recipe.data.items()}
                steps = (recipe.steps or registry.get(name).steps) * (len(tasks) if data.get("task_steps", (0,))[0] else 1)
                note = "\n".join(textwrap.wrap(recipe.note, 100, initial_indent="# ", subsequent_indent="# "))
                if folder == "fusionbench":
                    note += ("\n# Experts: FusionBench's tanganke/clip-vit-*_<task> fine-tunes, converted with\n"
                             f"#   adamerge convert --fusionbench DIR --out experts/fusionbench/{model} (docs/offline.md);\n"
                             "# heads: our zero-shot heads (FusionBench's templates may differ).")
                file = f"{folder}/{stem}.yaml"
                text = TEMPLATE.format(
                    title=file, method_doc=registry.get(name).description, n=8, model=model,
                    pretrained="openai", name=file, stem=file.removesuffix(".yaml"), defaults_note=note,
                    steps=steps, steps_note=recipe.steps_note or registry.get(name).steps_note,
                    commands=commands(name, file, file.removesuffix(".yaml")),
                    model_block=model_block(name, model, experts, 8, key == "vit-l-14", stem_of,
                                            unseen=list(recipe.unseen), overrides=recipe.model),
                    tasks=", ".join(tasks), batch_comment=batch_comment(name),
                    data_extra="".join(f"\n  {k}: {_yaml(v):<{max(25 - len(k), 1)}}# {c}"
                                       for k, (v, c) in data.items() if k != "batch_size"))
                replace = {"  batch_size:": (f"  batch_size: {_yaml(data['batch_size'][0]):<17}# {data['batch_size'][1]}"
                                             if "batch_size" in data else None),
                           "  val_check_interval:": (f"  val_check_interval: {recipe.val_every:<9}# {recipe.val_note}"
                                                     if recipe.val_every else None),
                           "  precision:": (f"  precision: {recipe.precision:<17}# the recipe's (needs a GPU; 32-true on a CPU)"
                                            if recipe.precision else None)}
                for start, line in replace.items():
                    if line:
                        text = text.replace(next(x for x in text.splitlines() if x.startswith(start)), line)
                if recipe.gradient_clip_val is not None:  # after the precision line
                    line = next(x for x in text.splitlines() if x.startswith("  precision:"))
                    text = text.replace(line, f"{line}\n  gradient_clip_val: {recipe.gradient_clip_val:<10}"
                                              "# the recipe's gradient-norm clipping")
                (ROOT / "configs" / file).write_text(text)
                print("wrote", file)


if __name__ == "__main__":
    main()
    protocol_configs()
    paper_configs()
    recipe_configs()
