"""``adamerge compare``: methods of the registry on the pool and data of a fit config
(:func:`adamerge.compare.compare`); the options it shares with ``adamerge demo``."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any, Sequence

from ..compare import CompareSettings, compare
from ..data.datamodule import MultiTaskDataModule
from ..methods import registry
from ..options import parse_overrides


class _ListMethods(argparse.Action):
    """``--methods`` given without names: print the registry and exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not values:
            print(registry.describe())
            parser.exit(0)
        setattr(namespace, self.dest, values)


def parser(prog: str, demo: bool) -> argparse.ArgumentParser:
    """The options shared by ``adamerge demo`` and ``adamerge compare``."""
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, description=textwrap.fill(
        "Build the offline demo suite (a small ViT 'pretrained' on synthetic 16x16 colour images and 6 "
        "experts: scikit-learn digits, shapes, gratings, dot counts, letters, textures; cached "
        "under $ADAMERGE_CACHE or ~/.cache/adamerge) and compare merging methods on it."
        if demo else
        "Run merging methods on the model pool and data of a fit config (LightningCLI "
        "options such as --config, --model.*, --data.* are accepted) and write the report.", 100)
        + "\n\nmethods (run by default: demo = yes):\n" + registry.describe(hparams=False))
    if not demo:
        p.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="the fit config(s) whose model pool and data the methods run on (repeatable; "
                            "other LightningCLI options such as --model.* or --data.* are passed on too)")
    p.add_argument("--out", default="runs/demo" if demo else None, required=not demo,
                   help="output folder: results.json, results.md, coefficient heatmaps, TensorBoard runs"
                        + (" (default: runs/demo)" if demo else ""))
    p.add_argument("--methods", nargs="*", default=None, action=_ListMethods, metavar="METHOD",
                   help=f"methods to run: names from the list above, or '{registry.ALL}' (default: "
                        "those marked demo); --methods alone lists every method with its hyper-parameters")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of learned methods (default: 500 for the demo, trainer.max_steps of the config; "
                        "--protocol paper: each row's official count)")
    p.add_argument("--val-split", default="val",
                   help="labeled split on which static methods pick their tuned hyper-parameters "
                        "(task arithmetic / TIES: the scaling) from a grid ('none': use the defaults, "
                        "0.3 / 1.0) (default: val)")
    p.add_argument("--ta-scaling", type=float, default=None,
                   help="fixed task-arithmetic scaling (same as --hparam task_arithmetic.scaling=X)")
    p.add_argument("--ties-scaling", type=float, default=None,
                   help="fixed TIES scaling (same as --hparam ties.scaling=X)")
    p.add_argument("--protocol", choices=["ours", "paper"], default="ours",
                   help="ours: our defaults (scalings picked on --val-split, TIES disjoint mean, one "
                        "batch of 16 per task per step, --steps for every learned row); paper: the official "
                        "recipes (task arithmetic and TIES at a fixed 0.3, TIES as the disjoint sum, "
                        "AdaMerging++ with the official-equivalent trim, and each learned row with its own "
                        "official batch size and steps: AdaMerging 32 (two of 16) x 500, WEMoE 16 x 1000, "
                        "AdaRank 16 x 10000 (ViT-L-14: 4), ...; see docs/usage.md); --hparam and --steps "
                        "still override. docs/fidelity.md lists each difference")
    p.add_argument("--hparam", nargs="+", default=[], metavar="METHOD.KEY=VALUE",
                   help="set a method's hyper-parameter (JSON value), e.g. --hparam ties.keep=0.1 "
                        "adamerging_layerwise.lr=0.002; see --methods for the keys")
    if demo:
        from ..data.corruptions import CORRUPTIONS
        p.add_argument("--suite", choices=["vision", "text"], default="vision",
                       help="vision: 16-px images, a small ViT and 6 experts (default); text: a tiny "
                            "Llama-style LM with one LoRA expert per procedural text task (needs the "
                            "[llm] extra); its default methods are those the registry marks for text")
        p.add_argument("--corruption", choices=list(CORRUPTIONS), default=None,
                       help="adapt and evaluate on corrupted test images (the paper's robustness protocol)")
        p.add_argument("--severity", type=int, choices=range(1, 6), default=3,
                       help="corruption severity 1-5 (default: 3)")
        p.add_argument("--unseen", nargs="+", default=[], metavar="TASK",
                       help="tasks of the suite left out of the merge (no expert, no adaptation data) "
                            "but still evaluated with their heads, marked unseen in the report (the "
                            "paper's generalisation protocol), e.g. --unseen dots textures")
        p.add_argument("--cache-dir", default=None, help="where the built suite is cached")
        p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                       help="change fields of the demo suite's spec (JSON values; a changed suite "
                            "is built and cached under its own hash), e.g. --set head_shift=0.4 "
                            "colour=false; fields: see adamerge.suites.SuiteSpec")
    return p


def hparam_overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--hparam METHOD.KEY=VALUE`` and the scaling shortcuts as ``{method: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_overrides(ns.hparam, "--hparam", "METHOD.KEY=VALUE").items():
        method, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(f"--hparam expects METHOD.KEY=VALUE, got {key!r}")
        registry.get(method).resolve({name: value})  # names an unknown method or key
        out.setdefault(method, {})[name] = value
    if ns.ta_scaling is not None:
        out.setdefault("task_arithmetic", {})["scaling"] = ns.ta_scaling
    if ns.ties_scaling is not None:
        out.setdefault("ties", {})["scaling"] = ns.ties_scaling
    return out


# --protocol paper: the data module's batch (AdaMerging's: two batches of 16 per task per step, official
# `if i > 0: break`); each learned row runs with its own (paper_schedules)
PAPER_BATCH_SIZE = registry.PAPER_BATCH


def paper_protocol(loaded: Any, hparams: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``hparams`` over the official code's recipe of every registry row that has one
    (``Method.paper``; ``--protocol paper``, docs/fidelity.md): e.g. task arithmetic and TIES at
    a fixed 0.3, TIES as the disjoint sum. ``OFFICIAL_TRIM`` (AdaMerging++) becomes the fraction
    the official code keeps: for open_clip pools the checkpoints' zero text-side tensors counted
    (:func:`adamerge.models.clip.official_trim`), else the row's own trim."""
    out: dict[str, dict[str, Any]] = {}
    recipe = getattr(loaded, "encoder_recipe", None) or {}
    for name in registry.names():
        method = registry.get(name)
        for key, value in method.paper.items():
            if value == registry.OFFICIAL_TRIM:
                if recipe.get("kind") != "open_clip":
                    continue  # no text-side tensors: the official fraction is the row's own
                from ..models.clip import official_trim
                value = official_trim(recipe["model"], sum(p.numel() for p in loaded.encoder.parameters()))
            out.setdefault(name, {})[key] = value
    for method, values in hparams.items():
        out.setdefault(method, {}).update(values)
    return out


def paper_schedules(loaded: Any, methods: Sequence[str], steps: int | None = None) -> dict[str, dict[str, int]]:
    """``{row: {"batch_size", "steps"}}`` of the official recipe of every learned row of ``methods``
    (and of the rows they start from) on ``loaded``'s architecture (``Method.paper_schedule``: the
    open_clip model name, e.g. AdaRank's batch 4 on ViT-L-14; any other pool: the row's ``"*"``
    value); ``steps`` (``--steps``) replaces every row's steps. ``--protocol paper`` runs each row so
    (``CompareSettings.schedules``)."""
    recipe = getattr(loaded, "encoder_recipe", None) or {}
    model = recipe.get("model") if recipe.get("kind") == "open_clip" else None
    out = {}
    for name in registry.with_prerequisites(list(methods)):
        method = registry.get(name)
        if method.kind == "learned":
            out[name] = {**method.paper_schedule(model), **({"steps": steps} if steps else {})}
    return out


def config_hparams(model: Any, hparams: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``hparams`` with the config's model settings carried to the registry rows of the config's
    class (an AdaMerging config's lr, prior, per_task_backward ... to every AdaMerging row; a
    WEMoE config's to the WEMoE row): every argument of the row's builder except the class's
    ``identity`` (what makes a row that row: granularity, trim, objective, init_from, ...) and
    what the row itself sets. Rows of other classes keep their registry defaults (Surgery's and
    Tinting's official learning rates, say); ``--hparam`` overrides both."""
    config = dict(model.hparams)
    out = {k: dict(v) for k, v in hparams.items()}
    for name in registry.names("learned"):
        method = registry.get(name)
        if method.build is not type(model):
            continue
        keep = set(getattr(type(model), "identity", ())) | set(method.hparams)
        carried = {k: v for k, v in config.items()
                   if k in method.builder_defaults() and k not in keep}
        out[name] = {**carried, **out.get(name, {})}
    return out


def compare_main(args: Sequence[str]) -> None:
    """``adamerge compare``: methods of the registry on the pool and data of a fit config."""
    from ..methods.adamerging import AdaMerging
    from .fit import AdaMergeCLI, names_model_class
    ns, rest = parser("adamerge compare", demo=False).parse_known_args(list(args))
    if not ns.config and "-c" not in rest:
        raise ValueError("adamerge compare needs --config FILE: the fit config of the pool and data")
    rest = [a for c in ns.config for a in ("--config", c)] + rest
    methods = registry.select(ns.methods)
    hparams = hparam_overrides(ns)
    cli = AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=rest, run=False,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False},
                      subclass_mode_model=names_model_class(rest))
    model, dm = cli.model, cli.datamodule
    hparams = config_hparams(model, hparams)
    schedules: dict[str, dict[str, int]] = {}
    if ns.protocol == "paper":
        hparams = paper_protocol(model.loaded, hparams)
        dm = dm.with_options(batch_size=PAPER_BATCH_SIZE)
        schedules = paper_schedules(model.loaded, methods, ns.steps)
    default_steps = registry.PAPER_STEPS if ns.protocol == "paper" else int(cli.trainer.max_steps)
    settings = CompareSettings(steps=ns.steps or default_steps,
                               val_split=None if ns.val_split == "none" else ns.val_split,
                               hparams=hparams, accelerator="auto", schedules=schedules)
    settings.extra = {"protocol": ns.protocol, **({"paper_schedules": schedules} if schedules else {})}
    compare(model.loaded, dm, Path(ns.out), settings, methods, suite="custom")
