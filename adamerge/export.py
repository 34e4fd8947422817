"""``adamerge export``: write the merged model of a coefficient checkpoint as plain weight files.

The config builds the same model pool as the run did (any pool: open_clip, checkpoint files, the
built-in suite); the checkpoint's pool fingerprint is checked against it; the merged module's full
state dict goes to ``merged.safetensors`` (for open_clip: keys of ``model.visual``, loadable with
``model.visual.load_state_dict``), the heads to ``heads.safetensors`` (``{task}.weight`` and
optional ``{task}.bias``) and the effective coefficients to ``coefficients.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .checkpoints import atomic_write, save_state_dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge export",
        description="Write the merged model of an adamerge checkpoint as safetensors: the merged "
                    "encoder (merged.safetensors), the task heads (heads.safetensors) and the "
                    "coefficients (coefficients.json).")
    p.add_argument("--config", required=True, action="append",
                   help="the run's config file(s), as given to `adamerge fit`")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", required=True,
                   help="coefficient checkpoint (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="output folder")
    p.epilog = ("Other options are config overrides as for fit, e.g. "
                "--model.pool.init_args.head_cache DIR.")
    return p


def build_model(configs: Sequence[str], overrides: Sequence[str] = ()):
    """The ``AdaMerging`` module a config describes (the pool is loaded; nothing is trained)."""
    from .adamerging import AdaMerging
    from .cli import AdaMergeCLI
    from .data import MultiTaskDataModule
    args = [a for c in configs for a in ("--config", c)] + list(overrides) + ["--trainer.logger", "false"]
    cli = AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=args, run=False,
                      save_config_callback=None)
    return cli.model


def head_tensors(heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{task}.weight`` / ``{task}.bias`` of heads that are (or wrap) one linear layer."""
    out = {}
    for task, head in heads.items():
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if len(linears) != 1:
            state = head.state_dict()
            out.update({f"{task}.{k}": v for k, v in state.items()})
            continue
        out[f"{task}.weight"] = linears[0].weight.detach()
        if linears[0].bias is not None:
            out[f"{task}.bias"] = linears[0].bias.detach()
    return out


def export(model, ckpt_path: str | Path, out: str | Path) -> dict[str, Path]:
    """Load the coefficients of ``ckpt_path`` into ``model`` and write the merged files to ``out``."""
    from .adamerging import COEFFICIENTS_KEY, check_checkpoint
    from .clip import ZeroShotHead
    ckpt_path, out = Path(ckpt_path), Path(out)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    check_checkpoint(checkpoint, model.fingerprint, tuple(model.merged.coefficients.shape),
                     source=str(ckpt_path))
    with torch.no_grad():
        model.merged.coefficients.copy_(checkpoint["state_dict"][COEFFICIENTS_KEY])
    tasks = model.task_names
    meta = {"checkpoint": ckpt_path.name, "tasks": ",".join(tasks),
            "granularity": model.merged.granularity, "global_step": str(checkpoint.get("global_step", ""))}
    paths = {"merged": out / "merged.safetensors", "heads": out / "heads.safetensors",
             "coefficients": out / "coefficients.json"}
    save_state_dict(model.merged.merged_state_dict(), paths["merged"], metadata=meta)
    zero_shot = all(isinstance(h, ZeroShotHead) for h in model.heads.values())
    save_state_dict(head_tensors(dict(model.heads)), paths["heads"],
                    metadata={**meta, "normalize_features": str(zero_shot).lower()})
    table = {"granularity": model.merged.granularity, "parameters": list(model.merged.task_vectors.names)
             if model.merged.granularity == "layerwise" else ["*"],
             "coefficients": model.merged.coefficient_table()}
    with atomic_write(paths["coefficients"]) as tmp:
        tmp.write_text(json.dumps(table, indent=1))
    return paths


def export_main(argv: Sequence[str]) -> None:
    args, overrides = build_parser().parse_known_args(list(argv))
    model = build_model(args.config, overrides)
    paths = export(model, args.ckpt_path, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
