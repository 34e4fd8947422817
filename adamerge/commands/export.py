"""``adamerge export``: the merged model of a coefficient checkpoint as safetensors files
(:func:`adamerge.io.export.export` does the writing)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..io.export import export, export_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge export",
        description="Write the merged model of a learned run's checkpoint (--ckpt_path), or of a static "
                    "or fitted registry row (--method), as safetensors: the merged encoder "
                    "(merged.safetensors), the task heads (heads.safetensors; Tinting's learned heads), "
                    "the method's own files (Surgery's adapters, WEMoE's and Twin-Merging's routing), "
                    "the coefficients of a learned run (coefficients.json) and export.json, with which "
                    "`adamerge predict --export` and adamerge.ExportedModel use the folder without the pool.")
    p.add_argument("--config", required=True, action="append",
                   help="the run's config file(s), as given to `adamerge fit`")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                   help="checkpoint of the run (e.g. RUN/checkpoints/last.ckpt); its method must be the config's. "
                        "A training-free row's config (e.g. smile) needs none: it is exported as built")
    p.add_argument("--method", default=None,
                   help="instead of a checkpoint: a static, fitted or training-free registry row (e.g. ties, tsv_m, smile), merged "
                        "on the config's pool with its defaults and --hparam values (`adamerge compare "
                        "--methods` lists them; a tuned value of compare's results.json is passed with --hparam)")
    p.add_argument("--hparam", nargs="+", default=[], metavar="KEY=VALUE",
                   help="--method: hyper-parameters of the row (JSON values), e.g. scaling=0.4 keep=0.1")
    p.add_argument("--out", required=True, help="output folder")
    p.epilog = ("Other options are config overrides as for fit, e.g. "
                "--model.pool.init_args.head_cache DIR.")
    return p


def build_from_config(configs: Sequence[str], overrides: Sequence[str] = ()):
    """``(module, data module)`` a config describes (``AdaMerging`` or the ``model.class_path``
    subclass; the pool is loaded, nothing is trained): what export, predict and online start from."""
    from ..data.datamodule import MultiTaskDataModule
    from ..methods.adamerging import AdaMerging
    from .fit import AdaMergeCLI, names_model_class
    args = [a for c in configs for a in ("--config", c)] + list(overrides) + ["--trainer.logger", "false"]
    cli = AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=args, run=False, save_config_callback=None,
                      subclass_mode_model=names_model_class(args))
    return cli.model, cli.datamodule


def build_model(configs: Sequence[str], overrides: Sequence[str] = ()):
    """The learned module a config describes (see :func:`build_from_config`)."""
    return build_from_config(configs, overrides)[0]


def export_method(configs: Sequence[str], overrides: Sequence[str], name: str, hparams: dict,
                  out: str) -> dict:
    """``adamerge export --method NAME``: the one model of a static or fitted row, or the module of a
    training-free learned row (SMILE), built on the config's pool, as weight files."""
    from ..compare import one_model
    from ..methods import registry
    from ..models.pool import PreloadedPool
    method = registry.get(name)
    reason = method.refusal("export")
    if reason:
        raise ValueError(f"--method {name}: {reason}")
    hp = method.resolve(hparams)
    model, dm = build_from_config(configs, overrides)
    loaded = model.loaded
    if method.kind == "learned":  # only a training-free one, built on the config's pool
        module = method.build(PreloadedPool(loaded), **hp)
        if module.learns:
            raise ValueError(f"--method {name}: a learned row exports a finished run: fit its config, then "
                             "give --ckpt_path (without --method)")
        return export(module, None, out, row=name)
    dm.select_tasks(loaded.task_vectors.task_names, loaded.unseen_tasks)
    params = one_model(method, loaded, dm, hp)
    manifest = {"method": name, "row": name, "tasks": list(loaded.task_vectors.task_names),
                "unseen_tasks": list(loaded.unseen_tasks), "hparams": hp,
                "encoder": getattr(loaded, "encoder_recipe", None)}
    return export_weights(loaded.encoder, params, {**loaded.heads, **loaded.unseen_heads}, out, manifest)


def export_main(argv: Sequence[str]) -> None:
    from ..options import parse_overrides
    args, overrides = build_parser().parse_known_args(list(argv))
    if args.ckpt_path and args.method:
        raise ValueError("give --ckpt_path (a learned run's checkpoint) or --method (a static or fitted row), not both")
    if args.hparam and not args.method:
        raise ValueError("--hparam sets a --method row's hyper-parameters; a checkpoint's come from its config")
    if args.method:
        paths = export_method(args.config, overrides, args.method,
                              parse_overrides(args.hparam, "--hparam", "KEY=VALUE"), args.out)
    else:
        from ..methods.registry import row_of
        model = build_model(args.config, overrides)
        row = row_of(model)[0]
        reason = model.refusal("export")
        if reason:
            raise ValueError(f"{row} cannot be exported: {reason}")
        if not args.ckpt_path and getattr(model, "learns", True):
            raise ValueError("give --ckpt_path (a learned run's checkpoint) or --method (a static or fitted row); "
                             f"only a training-free row ({row} is not) is exported from its config alone")
        paths = export(model, args.ckpt_path, args.out, row=row)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
