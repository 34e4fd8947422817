"""Export: write the merged model of a coefficient checkpoint as plain weight files.

The config builds the same model pool as the run did (any pool: open_clip, checkpoint files, the
built-in suite); the checkpoint's pool fingerprint is checked against it; the merged module's full
state dict goes to ``merged.safetensors`` (for open_clip: keys of ``model.visual``, loadable with
``model.visual.load_state_dict``), the heads to ``heads.safetensors`` (``{task}.weight`` and
optional ``{task}.bias``; a method that learns heads, such as Tinting, writes its learned ones),
the per-task modules of methods that have them (Surgery's adapters: ``{task}.down`` and
``{task}.up``) to ``task_modules.safetensors``, files a method adds with ``export_extra()``
(WEMoE's routers and MLP task vectors: ``wemoe.safetensors``, rebuilt by
:func:`adamerge.methods.wemoe.load_wemoe`), and the effective coefficients to
``coefficients.json``, and ``export.json`` (tasks, method, and a recipe of the encoder's
architecture when the pool has one) with which :class:`adamerge.exported.ExportedModel` uses
the folder without the pool's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .checkpoints import atomic_write, save_state_dict


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


def write_heads(heads: dict[str, nn.Module], path: Path, meta: dict[str, str]) -> None:
    """``heads.safetensors``: :func:`head_tensors`, and whether every head L2-normalises features
    first (zero-shot heads: ``normalizes_features = True``) in the metadata ExportedModel reads."""
    normalized = all(getattr(h, "normalizes_features", False) for h in heads.values())
    save_state_dict(head_tensors(heads), path, metadata={**meta, "normalize_features": str(normalized).lower()})


def export_weights(encoder: nn.Module, params: dict[str, torch.Tensor], heads: dict[str, nn.Module],
                   out: str | Path, manifest: dict) -> dict[str, Path]:
    """Write one merged model that is plain weights (a static or fitted row): ``merged.safetensors``
    (``encoder``'s full state dict with ``params`` in place of its parameters), ``heads.safetensors``
    and ``export.json`` (``manifest``: method, row, tasks, hyper-parameters, encoder recipe).
    :class:`adamerge.exported.ExportedModel` reads it as it reads a learned run's export."""
    out = Path(out)
    meta = {"method": str(manifest.get("method")), "tasks": ",".join(manifest.get("tasks", []))}
    state = {k: v.detach() for k, v in encoder.state_dict().items()}
    unknown = [k for k in params if k not in state]
    if unknown:
        raise ValueError(f"merged parameters {unknown[:3]} are not in {type(encoder).__name__}")
    state.update({k: v.detach().to(state[k].dtype) for k, v in params.items()})
    paths = {"merged": out / "merged.safetensors", "heads": out / "heads.safetensors",
             "manifest": out / "export.json"}
    save_state_dict({k: v.contiguous() for k, v in state.items()}, paths["merged"], metadata=meta)
    write_heads(heads, paths["heads"], meta)
    manifest = {**manifest, "files": ["export.json", "heads.safetensors", "merged.safetensors"]}
    with atomic_write(paths["manifest"]) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return paths


def export(model, ckpt_path: str | Path | None, out: str | Path, row: str | None = None) -> dict[str, Path]:
    """Load the coefficients of ``ckpt_path`` into ``model`` and write the merged files to ``out``
    (``ckpt_path`` ``None``: a training-free module, written as built).

    Args:
        model: a learned module built from the run's config (e.g.
            :class:`adamerge.methods.AdaMerging`): it must offer ``load_coefficients(path)``
            (which loads every learned tensor and checks the checkpoint's method and pool
            fingerprint), ``merged`` (the merged model) and ``heads``; optionally
            ``export_heads()`` (the heads to write, default ``heads``), ``export_task_modules()``
            (per-task tensors) and ``method`` (its name). Heads that L2-normalise features first
            (zero-shot heads) say so with a ``normalizes_features = True`` attribute.
        ckpt_path: the coefficient checkpoint; ``None`` for a module that learns nothing
            (``learns = False``, e.g. SMILE).
        out: output folder.
        row: the registry row the model is (recorded in ``export.json``).
    """
    out = Path(out)
    if ckpt_path is None:
        if getattr(model, "learns", True):
            raise ValueError(f"{type(model).__name__} learns its {row or 'row'}: export a finished run's checkpoint "
                             "(--ckpt_path RUN/checkpoints/last.ckpt)")
        checkpoint: dict = {}
    else:
        ckpt_path = Path(ckpt_path)
        checkpoint = model.load_coefficients(ckpt_path)
    merged = model.merged
    meta = {"checkpoint": ckpt_path.name if ckpt_path else "", "tasks": ",".join(merged.task_names),
            "method": str(getattr(model, "method", "adamerging")),
            "granularity": merged.granularity, "global_step": str(checkpoint.get("global_step", ""))}
    if getattr(model, "unseen_tasks", None):  # heads written for tasks that were not merged
        meta["unseen_tasks"] = ",".join(model.unseen_tasks)
    paths = {"merged": out / "merged.safetensors", "heads": out / "heads.safetensors",
             "coefficients": out / "coefficients.json"}
    state = merged.merged_state_dict()
    save_state_dict(state, paths["merged"], metadata=meta)
    heads = model.export_heads() if hasattr(model, "export_heads") else dict(model.heads)
    if hasattr(merged.module, "save_pretrained_merged"):  # Hugging Face models: from_pretrained folders
        paths["hf"] = merged.module.save_pretrained_merged(out / "hf", state, heads=heads)
    write_heads(heads, paths["heads"], meta)
    modules = model.export_task_modules() if hasattr(model, "export_task_modules") else {}
    if modules:
        paths["task_modules"] = out / "task_modules.safetensors"
        save_state_dict({k: v.detach().contiguous() for k, v in modules.items()}, paths["task_modules"],
                        metadata={**meta, "apply": str(getattr(model, "task_modules_apply", ""))})
    extra = model.export_extra() if hasattr(model, "export_extra") else {}
    for filename, (tensors, more) in extra.items():  # method-specific files, e.g. WEMoE's routers
        paths[Path(filename).stem] = out / filename
        save_state_dict({k: v.detach().contiguous() for k, v in tensors.items()}, out / filename,
                        metadata={**meta, **more})
    loaded = getattr(model, "loaded", None)
    manifest = {"method": meta["method"], "row": row,
                "tasks": list(merged.task_names),
                "unseen_tasks": list(getattr(model, "unseen_tasks", [])),
                "checkpoint": ckpt_path.name if ckpt_path else None, "global_step": checkpoint.get("global_step"),
                "encoder": getattr(loaded, "encoder_recipe", None),
                "files": sorted(p.name for p in paths.values()) + ["coefficients.json"]}
    paths["manifest"] = out / "export.json"
    with atomic_write(paths["manifest"]) as tmp:  # what adamerge.exported needs to use the folder
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    table = {"granularity": merged.granularity, "parameters": merged.row_names(),
             "coefficients": merged.coefficient_table()}
    with atomic_write(paths["coefficients"]) as tmp:
        tmp.write_text(json.dumps(table, indent=1))
    return paths


def read_method_export(module: nn.Module, folder: str | Path, key: str, required: str,
                       what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The start of a routed method's export reader (WEMoE, Twin-Merging, SMILE): loads
    ``folder/merged.safetensors`` into ``module`` (strict) and returns the ``key`` metadata (a JSON
    object holding ``required``) and the tensors of ``folder/<key>.safetensors``; one-line errors
    name a missing file or metadata. ``what``: the method's name in those errors."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    folder = Path(folder)
    extra = folder / f"{key}.safetensors"
    for f in (folder / "merged.safetensors", extra):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (write it with `adamerge export` of a {what} run)")
    module.load_state_dict(load_file(folder / "merged.safetensors"), strict=True)
    with safe_open(str(extra), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(key, "null") or "null")
    if not isinstance(meta, dict) or required not in meta:
        raise ValueError(f"{extra}: no '{key}' metadata (not a {what} export)")
    return meta, load_file(extra)

