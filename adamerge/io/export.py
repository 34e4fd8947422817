"""Export: write the merged model of a coefficient checkpoint as plain weight files.

The config builds the same model pool as the run did (any pool: open_clip, checkpoint files, the
built-in suite); the checkpoint's pool fingerprint is checked against it; the merged module's full
state dict goes to ``merged.safetensors`` (for open_clip: keys of ``model.visual``, loadable with
``model.visual.load_state_dict``), the heads to ``heads.safetensors`` (``{task}.weight`` and
optional ``{task}.bias``) and the effective coefficients to ``coefficients.json``.
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


def export(model, ckpt_path: str | Path, out: str | Path) -> dict[str, Path]:
    """Load the coefficients of ``ckpt_path`` into ``model`` and write the merged files to ``out``.

    Args:
        model: a learned-coefficient module built from the run's config (e.g.
            :class:`adamerge.methods.AdaMerging`): it must offer ``load_coefficients(path)``
            (which checks the checkpoint's pool fingerprint), ``merged`` (the merged model) and
            ``heads``. Heads that L2-normalise features first (zero-shot heads) say so with a
            ``normalizes_features = True`` attribute.
        ckpt_path: the coefficient checkpoint.
        out: output folder.
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    checkpoint = model.load_coefficients(ckpt_path)
    merged = model.merged
    meta = {"checkpoint": ckpt_path.name, "tasks": ",".join(merged.task_names),
            "granularity": merged.granularity, "global_step": str(checkpoint.get("global_step", ""))}
    paths = {"merged": out / "merged.safetensors", "heads": out / "heads.safetensors",
             "coefficients": out / "coefficients.json"}
    save_state_dict(merged.merged_state_dict(), paths["merged"], metadata=meta)
    normalized = all(getattr(h, "normalizes_features", False) for h in model.heads.values())
    save_state_dict(head_tensors(dict(model.heads)), paths["heads"],
                    metadata={**meta, "normalize_features": str(normalized).lower()})
    table = {"granularity": merged.granularity, "parameters": list(merged.task_vectors.names)
             if merged.granularity == "layerwise" else ["*"],
             "coefficients": merged.coefficient_table()}
    with atomic_write(paths["coefficients"]) as tmp:
        tmp.write_text(json.dumps(table, indent=1))
    return paths
