"""Checkpoint formats of CLIP image encoders, and ``adamerge convert``.

Fine-tuned CLIP image towers come in three layouts; :func:`visual_state_dict` turns each into
open_clip's ``model.visual`` keys (``conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``,
``proj``, ...):

* open_clip: the image tower alone, or a whole CLIP state dict (``visual.`` prefix), or the
  task-vectors ``ImageEncoder`` (``model.visual.`` prefix);
* Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` (``vision_model.`` keys, e.g. the public
  ``tanganke/clip-vit-base-patch32_<task>`` fine-tunes; a ``CLIPVisionModel`` saved by
  transformers >= 5 has the same keys without the prefix): q/k/v projections are concatenated into
  ``in_proj``, layer norms and MLPs renamed, ``visual_projection.weight`` transposed into ``proj``
  (a ``CLIPVisionModel`` has no projection: ``proj`` is then absent and taken from the base);
* whole pickled modules (the original task-vectors release): read only with ``allow_pickle``,
  because unpickling runs code from the file. Classes that cannot be imported (the release's
  ``src.modeling.ImageEncoder``) are replaced by empty ``nn.Module`` stand-ins, so no copy of that
  code base is needed to read the weights.

``adamerge convert SRC OUT`` (:mod:`adamerge.commands.convert`) writes any of them once as a
safetensors image tower; :func:`find_fusionbench_experts` finds the FusionBench fine-tunes of a
folder of downloaded Hugging Face repos for ``adamerge convert --fusionbench DIR --out OUTDIR``.
"""

from __future__ import annotations

import pickle
import re
import types
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..io.checkpoints import CheckpointError, StateDict, _unwrap, load_state_dict

_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_RENAMES = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"hf"``, ``"open_clip"`` (image tower keys, possibly under a prefix) or ``"unknown"``."""
    keys = list(state)
    if any(k.startswith("vision_model.") or ".vision_model." in k for k in keys):
        return "hf"
    if "embeddings.patch_embedding.weight" in state:  # CLIPVisionModel saved by transformers >= 5
        return "hf"
    if any(k == "conv1.weight" or k.endswith(".conv1.weight") for k in keys):
        return "open_clip"
    return "unknown"


def hf_to_open_clip(state: Mapping[str, torch.Tensor], source: str = "state dict") -> StateDict:
    """Hugging Face CLIP vision keys -> open_clip ``VisionTransformer`` keys (same computation).

    Text-tower keys of a full ``CLIPModel`` are dropped; ``visual_projection.weight``
    (``[embed, width]``) becomes ``proj`` (``[width, embed]``).
    """
    vision: dict[str, torch.Tensor] = {}
    projection = None
    prefixed = any("vision_model." in key for key in state)  # transformers < 5 (FusionBench's files)
    for key, value in state.items():
        if key.endswith("visual_projection.weight"):
            projection = value
        elif "vision_model." in key:
            vision[key.split("vision_model.", 1)[1]] = value
        elif not prefixed:
            vision[key] = value
    shown = "vision_model." if prefixed else ""
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in vision.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        if key == "embeddings.position_ids":
            continue  # a buffer of indices, not a weight
        m = _HF_LAYER.match(key)
        if not m:
            raise CheckpointError(f"{source}: unexpected Hugging Face vision key '{shown}{key}'")
        layer, rest = int(m.group(1)), m.group(2)
        part = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if part:
            qkv.setdefault(layer, {})[f"{part.group(1)}.{part.group(2)}"] = value
            continue
        for hf_name, oc_name in _HF_RENAMES.items():
            if rest.startswith(hf_name + "."):
                out[f"transformer.resblocks.{layer}.{oc_name}{rest[len(hf_name):]}"] = value
                break
        else:
            raise CheckpointError(f"{source}: unexpected Hugging Face vision key '{shown}{key}'")
    for layer, parts in sorted(qkv.items()):
        for kind in ("weight", "bias"):
            missing = [p for p in "qkv" if f"{p}.{kind}" not in parts]
            if missing:
                raise CheckpointError(f"{source}: layer {layer} lacks self_attn.{missing[0]}_proj.{kind}")
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                [parts[f"{p}.{kind}"] for p in "qkv"], dim=0)
    if projection is not None:
        out["proj"] = projection.t().contiguous()
    if "conv1.weight" not in out:
        raise CheckpointError(f"{source}: Hugging Face layout without "
                              "'vision_model.embeddings.patch_embedding.weight'")
    return out


def visual_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> StateDict:
    """The open_clip image-tower state dict held in ``state``, whatever its layout."""
    layout = detect_layout(state)
    if layout == "hf":
        return hf_to_open_clip(state, source)
    if layout == "unknown":
        raise CheckpointError(f"{source}: not a CLIP image encoder: no 'conv1.weight' (open_clip) or "
                              f"'vision_model.' (Hugging Face) key; keys start with {list(state)[:5]}")
    prefix = next(k for k in state if k == "conv1.weight" or k.endswith(".conv1.weight"))[:-len("conv1.weight")]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------ pickles
class _StandIn(nn.Module):
    """Replaces a class that a pickle names but that cannot be imported here."""

    def __setstate__(self, state: object) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_pickled_state"] = state

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError(f"{type(self).__qualname__} is a stand-in for an unavailable class")


class _LenientUnpickler(pickle.Unpickler):
    stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in self.stand_ins:
                self.stand_ins[key] = type(name, (_StandIn,), {"__module__": f"adamerge.standin.{module}"})
            return self.stand_ins[key]


_lenient_pickle = types.ModuleType("adamerge_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_lenient_pickle.__name__ = "adamerge_lenient_pickle"


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> StateDict:
    """A state dict from safetensors, a torch weights file, or (with ``allow_pickle``) a pickled module."""
    path = Path(path)
    if not allow_pickle or path.suffix == ".safetensors":
        return load_state_dict(path, allow_pickle=False)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read pickled checkpoint: {first}") from exc
    if isinstance(obj, Mapping) and "state_dict" not in obj and any(isinstance(v, nn.Module) for v in obj.values()):
        obj = next(v for v in obj.values() if isinstance(v, nn.Module))
    return _unwrap(obj, path)


def load_visual(path: str | Path, allow_pickle: bool = False) -> StateDict:
    """An open_clip image-tower state dict from a file in any supported layout."""
    return visual_state_dict(read_checkpoint(path, allow_pickle), source=str(path))


# ------------------------------------------------------------------- FusionBench snapshots
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SNAPSHOT_NAME = re.compile(r"^(?:models--(?P<org>[^/]+?)--)?(?P<model>clip[^_]*)_(?P<task>.+)$")


def _weights_in(folder: Path) -> Path | None:
    return next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)


def _snapshot_weights(folder: Path) -> Path | None:
    """The weights file of one downloaded repo: in the folder itself (``hf download --local-dir``)
    or, in the hub cache layout, in the snapshot ``refs/main`` names (else the newest one)."""
    direct = _weights_in(folder)
    if direct is not None or not (folder / "snapshots").is_dir():
        return direct
    ref = folder / "refs" / "main"
    if ref.is_file():
        found = _weights_in(folder / "snapshots" / ref.read_text().strip())
        if found is not None:
            return found
    snaps = sorted((s for s in (folder / "snapshots").iterdir() if _weights_in(s) is not None),
                   key=lambda s: s.stat().st_mtime, reverse=True)
    return _weights_in(snaps[0]) if snaps else None


def find_fusionbench_experts(folder: str | Path, prefix: str | None = None,
                             registry: Mapping | None = None) -> tuple[dict[str, Path], list[str]]:
    """The FusionBench CLIP fine-tunes downloaded under ``folder``: task -> weights file.

    FusionBench publishes one Hugging Face repo per task, ``tanganke/<model>_<task>`` (e.g.
    ``tanganke/clip-vit-base-patch32_stanford-cars``, ``CLIPVisionModel`` weights in
    ``model.safetensors`` or ``pytorch_model.bin``). ``folder`` holds one sub-folder per repo,
    named ``<model>_<task>`` (``hf download REPO --local-dir folder/<model>_<task>``) or in the
    hub cache layout ``models--tanganke--<model>_<task>/snapshots/<hash>/`` (``folder`` may be
    the hub cache itself). Task names given as aliases of the task registry (``stanford-cars``)
    become the registry's names (``stanford_cars``); the tasks come in registry order.

    Args:
        folder: the folder of downloaded repos.
        prefix: keep only repos whose ``<model>`` part is this (``clip-vit-base-patch32``);
            needed when ``folder`` holds the fine-tunes of several models.
        registry: task registry used to name the tasks (default: the built-in one).

    Returns:
        (task -> weights file, notes on the sub-folders that were skipped).
    """
    from ..data.tasks import get_task, load_registry
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder of FusionBench snapshots does not exist")
    registry = load_registry() if registry is None else registry
    found: dict[str, Path] = {}
    notes: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _SNAPSHOT_NAME.match(sub.name)
        if not m:
            continue
        if prefix and m.group("model") != prefix:
            notes.append(f"{sub.name}: model {m.group('model')!r} is not --prefix {prefix!r}")
            continue
        weights = _snapshot_weights(sub)
        if weights is None:
            notes.append(f"{sub.name}: no {' or '.join(HF_WEIGHT_FILES)}")
            continue
        try:
            task = get_task(m.group("task"), registry).name
        except KeyError:
            task = m.group("task")
            notes.append(f"{sub.name}: task {task!r} is not in the task registry (give it in a tasks_file)")
        if task in found:
            raise ValueError(f"{root}: two snapshots for task {task!r}: {found[task]} and {weights}; "
                             "keep one model's fine-tunes (e.g. --prefix clip-vit-base-patch32)")
        found[task] = weights
    if not found:
        raise FileNotFoundError(f"{root}: no FusionBench snapshots (sub-folders <model>_<task> or "
                                f"models--<org>--<model>_<task> holding {' or '.join(HF_WEIGHT_FILES)})")
    order = {name: i for i, name in enumerate(registry)}
    tasks = sorted(found, key=lambda t: (order.get(t, len(order)), t))
    return {t: found[t] for t in tasks}, notes
