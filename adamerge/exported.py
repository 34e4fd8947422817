"""Use an ``adamerge export`` folder without the pool: merged weights + heads (+ method files).

``export.json`` (written by :func:`adamerge.io.export.export`) records the tasks, the method and,
for pools that can describe their encoder (the built-in suites, open_clip), a *recipe* that
rebuilds the architecture without any pool file: ``{"kind": "suite", "spec": {...}}`` or
``{"kind": "open_clip", "model": ..., "pretrained": ...}`` (the architecture is created with
random weights, nothing is downloaded, then ``merged.safetensors`` is loaded strictly). For any
other encoder pass the architecture yourself: ``ExportedModel.from_folder(folder, encoder=MyNet())``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .io.checkpoints import load_state_dict

MANIFEST = "export.json"


def build_encoder(recipe: Mapping[str, Any]) -> nn.Module:
    """The encoder architecture a recipe describes, with random weights (see the module doc)."""
    kind = recipe.get("kind")
    if kind == "suite":
        from .suites.synthetic import SuiteSpec, make_encoder
        spec = dict(recipe["spec"])
        spec["tasks"] = tuple(spec["tasks"])
        return make_encoder(SuiteSpec(**spec))
    if kind == "open_clip":
        from .models.clip import create_clip
        return create_clip(recipe["model"], pretrained=None).visual
    raise ValueError(f"unknown encoder recipe kind {kind!r} (known: suite, open_clip)")


class ExportedModel(nn.Module):
    """The merged encoder of an export folder with each task's head (and the per-task modules or
    the routing of methods that have them); ``model(images, task)`` gives that task's logits.

    Which files a method wrote and how they are read back is the method's own business: the
    method recorded in ``export.json`` names, through the registry
    (:func:`adamerge.methods.registry.export_reader`), the class whose ``load_export`` rebuilds the
    encoder (WEMoE's and Twin-Merging's routing included) and whose ``load_export_task_modules``
    rebuilds the per-task modules (Surgery's adapters).

    Attributes:
        tasks: every task with a head (merged ones first, then unseen ones).
        unseen_tasks: tasks with a head whose expert was not merged.
        manifest: the folder's ``export.json``.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, torch.Tensor], normalize: bool,
                 task_modules: Mapping[str, nn.Module] | None = None,
                 manifest: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.manifest = dict(manifest or {})
        self.normalize = normalize
        found = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in heads))
        listed = [t for t in self.manifest.get("tasks", []) + self.manifest.get("unseen_tasks", []) if t in found]
        self.tasks = listed + [t for t in found if t not in listed]
        self.unseen_tasks = list(self.manifest.get("unseen_tasks", []))
        self.heads = nn.Module()
        for k, v in heads.items():
            self.heads.register_buffer(k.replace(".", "__"), v)
        self.task_modules = nn.ModuleDict(dict(task_modules or {})).eval().requires_grad_(False)

    def _head(self, key: str) -> torch.Tensor | None:
        return getattr(self.heads, key.replace(".", "__"), None)

    @classmethod
    def from_folder(cls, folder: str | Path, encoder: nn.Module | None = None) -> "ExportedModel":
        """Load ``folder`` (``merged.safetensors``, ``heads.safetensors``, ``export.json`` and
        the method's own files); ``encoder`` is the architecture when the export has no recipe
        for it."""
        from .methods.registry import export_reader
        folder = Path(folder)
        for f in ("merged.safetensors", "heads.safetensors"):
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{folder / f}: not found (is {folder} an `adamerge export` folder?)")
        manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
        if encoder is None:
            recipe = manifest.get("encoder")
            if not recipe:
                raise ValueError(f"{folder / MANIFEST}: no encoder recipe (the pool's encoder is a "
                                 "custom module); pass the architecture: "
                                 "ExportedModel.from_folder(folder, encoder=MyEncoder(...))")
            encoder = build_encoder(recipe)
        reader = export_reader(manifest.get("method"))
        encoder = reader.load_export(encoder, folder)
        from safetensors import safe_open
        with safe_open(str(folder / "heads.safetensors"), "pt") as f:
            normalize = (f.metadata() or {}).get("normalize_features") == "true"
        heads = load_state_dict(folder / "heads.safetensors")
        mods = (reader.load_export_task_modules(load_state_dict(folder / "task_modules.safetensors"))
                if (folder / "task_modules.safetensors").is_file() else None)
        return cls(encoder, heads, normalize, mods, manifest)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.tasks:
            from .errors import unknown_name
            raise ValueError(unknown_name("task", task, self.tasks, where=" in this export"))
        f = self.encoder(images)
        if task in self.task_modules:  # e.g. Surgery: the task's representation bias removed
            f = self.task_modules[task](f)
        if self.normalize:
            f = F.normalize(f, dim=-1)
        w, b = self._head(f"{task}.weight"), self._head(f"{task}.bias")
        z = f.to(w.dtype) @ w.T
        return z + b if b is not None else z
