"""``adamerge export``: the merged model of a coefficient checkpoint as safetensors files
(:func:`adamerge.io.export.export` does the writing)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..io.export import export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge export",
        description="Write the merged model of an adamerge checkpoint as safetensors: the merged "
                    "encoder (merged.safetensors), the task heads (heads.safetensors; Tinting's "
                    "learned heads), Surgery's per-task adapters (task_modules.safetensors) and the "
                    "coefficients (coefficients.json).")
    p.add_argument("--config", required=True, action="append",
                   help="the run's config file(s), as given to `adamerge fit`")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", required=True,
                   help="checkpoint of the run (e.g. RUN/checkpoints/last.ckpt); its method must be the config's")
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


def export_main(argv: Sequence[str]) -> None:
    args, overrides = build_parser().parse_known_args(list(argv))
    model = build_model(args.config, overrides)
    paths = export(model, args.ckpt_path, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
