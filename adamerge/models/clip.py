"""open_clip CLIP models: the image tower is merged, each task's head is a frozen zero-shot head.

* :func:`create_clip` builds an open_clip model from a name and a pretrained tag or file.
* :func:`zero_shot_heads` builds one :class:`ZeroShotHead` per task with the text tower from the
  task's class names and templates, cached on disk (safetensors) under a key that hashes the
  model's identity (name, architecture config, text-tower weights and logit scale), the class
  names and the templates.
* :class:`OpenCLIPPool` is the model pool for AdaMerging: base = ``model.visual`` of the pretrained
  model, experts = fine-tuned image towers in any layout :mod:`adamerge.models.convert` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import TaskSpec, get_task, load_registry
from ..data.transforms import is_file
from ..engine.task_vectors import DTYPES, TaskVectors
from ..io import offline
from ..io.checkpoints import (CheckpointError, StateDict, check_compatible, check_finite, load_state_dict,
                              save_state_dict)
from .convert import load_visual
from .pool import LoadedPool, ModelPool, check_unseen, merged_parameter_names

log = logging.getLogger(__name__)
HEADS_VERSION = 1


def check_pretrained(model: str, pretrained: str | None) -> None:
    """Fail now (no download) on an unknown model name, a missing local file or an unknown tag."""
    import open_clip
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown open_clip model {model!r}; known: "
                         f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))[:400]}")
    if not pretrained:
        return
    if is_file(pretrained) or Path(pretrained).expanduser().exists():
        if not Path(pretrained).expanduser().is_file():
            raise FileNotFoundError(f"{pretrained}: pretrained checkpoint file does not exist")
    elif not open_clip.get_pretrained_cfg(model, pretrained):
        raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of open_clip model {model!r}; "
                         f"tags: {', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'}")


def pretrained_source(model: str, tag: str) -> tuple[str, list[str]]:
    """Where open_clip downloads the weights of ``model``'s pretrained ``tag`` from:
    ``(hub repo id, candidate file names in open_clip's order)``, or ``(url, [file name])`` for a
    tag with no hub repo."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    cfg = open_clip.get_pretrained_cfg(model, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = posixpath.split(hub)  # 'org/name/' (default file) or 'org/name/file'
        filename = filename or HF_WEIGHTS_NAME
        safe = ([HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME
                else [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
        return repo, [*safe, filename]
    url = cfg.get("url", "")
    return url, [url.rsplit("/", 1)[-1]] if url else []


def resolve_pretrained(model: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """``pretrained`` as open_clip should load it, with no wait on a missing network.

    A file or ``None`` is returned as is. A tag whose weights are in the local cache (the hub
    cache, or ``cache_dir``) becomes that file, read with no connection. Otherwise the tag is
    returned for open_clip to download if the network answers; with no network (or
    ``HF_HUB_OFFLINE=1``) an :class:`~adamerge.io.offline.OfflineError` says which download was
    needed and how to give the file instead.
    """
    import open_clip
    check_pretrained(model, pretrained)
    if not pretrained or is_file(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if cfg.get("file"):
        return cfg["file"]
    where, files = pretrained_source(model, pretrained)
    name = files[-1] if files else "weights.bin"
    hint = (f"give a local file instead (`pretrained: /path/to/{name}` in a config, `--pretrained FILE` "
            "on the command line)")
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        found = offline.cached_hub_file(where, files, cache_dir)
        if found:
            log.info("open_clip %s %r: using the cached %s", model, pretrained, found)
            return found
        what = (f"open_clip model {model} with pretrained tag {pretrained!r} needs a download of "
                f"{' or '.join(files)} from the Hugging Face repo {where}")
        offline.require_network(what, f"{hint}, fetched once where there is a network with "
                                      f"`hf download {where} {name} --local-dir DIR`")
        return pretrained
    if where:
        target = Path(cache_dir or "~/.cache/clip").expanduser() / files[0]
        if not target.is_file():
            offline.require_network(f"open_clip model {model} with pretrained tag {pretrained!r} needs a "
                                    f"download of {where}", hint, url=where)
    return pretrained


def create_clip(model: str, pretrained: str | None = None, cache_dir: str | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip model in eval mode.

    Args:
        model: open_clip model name (``ViT-B-32``, ``ViT-L-14``, or one added with
            ``open_clip.add_model_config``).
        pretrained: a pretrained tag (``openai``: downloaded once by open_clip, then read from
            the cache, also with no network) or a local checkpoint file of the whole CLIP model;
            ``None`` keeps the random initialisation.
        cache_dir: where open_clip caches downloads (default: the Hugging Face hub cache).
        device: where the model goes.

    Raises:
        adamerge.io.offline.OfflineError: the tag's weights are not cached and there is no
            network (one line naming the hub repo and file, and how to give a local file).
    """
    import open_clip
    source = resolve_pretrained(model, pretrained, cache_dir)
    try:
        clip = open_clip.create_model(model, pretrained=source, cache_dir=cache_dir, device=device)
    except Exception as exc:
        if not (source and Path(source).is_file()):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{source}: cannot load it as the pretrained weights of open_clip model "
                              f"{model} (a whole-CLIP state dict, e.g. open_clip_pytorch_model.bin): "
                              f"{first}") from exc
    return clip.eval()


class ZeroShotHead(nn.Module):
    """``logits = logit_scale * normalize(features) @ text_embeddings.T`` (frozen).

    ``linear.weight`` holds ``logit_scale * text_embeddings`` (``[classes, dim]``).
    """

    normalizes_features = True  # exported heads apply to L2-normalised features

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
        self.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1).to(self.linear.weight.dtype))


def _digest_tensors(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def text_identity(clip: nn.Module, model: str) -> dict:
    """What zero-shot embeddings depend on besides the prompts: name, config, text weights."""
    import open_clip
    text_state = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    return {"model": model, "config": open_clip.get_model_config(model),
            "text_weights": _digest_tensors(text_state)}


def head_cache_key(identity: Mapping, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """Hex key of one task's head: model identity + class names + templates."""
    blob = json.dumps({"v": HEADS_VERSION, "id": identity, "classnames": list(classnames),
                       "templates": list(templates)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@torch.no_grad()
def text_head_weight(clip: nn.Module, tokenizer, spec: TaskSpec, device: str | torch.device = "cpu",
                     classes_per_batch: int = 16) -> torch.Tensor:
    """``logit_scale * normalised mean prompt embedding`` per class, ``[classes, dim]`` (float32)."""
    from open_clip import build_zero_shot_classifier
    templates = [lambda c, t=t: t.format(c=c) for t in spec.templates]
    clip = clip.to(device)
    w = build_zero_shot_classifier(clip, tokenizer, list(spec.classnames), templates,
                                   num_classes_per_batch=classes_per_batch, device=device)
    return (clip.logit_scale.exp().float() * w.float().t()).cpu().contiguous()


def zero_shot_heads(clip: nn.Module, model: str, specs: Mapping[str, TaskSpec],
                    cache_dir: str | Path | None = None,
                    device: str | torch.device = "cpu") -> dict[str, ZeroShotHead]:
    """One frozen zero-shot head per task, read from / written to ``cache_dir``.

    Args:
        clip: the open_clip model whose text tower embeds the prompts.
        model: its open_clip name (part of the cache key, with its config and text weights).
        specs: task name -> spec (class names and templates).
        cache_dir: cache folder (default ``$ADAMERGE_CACHE/zeroshot_heads``); ``None`` uses it.
        device: where the text tower runs.
    """
    import open_clip
    from ..io.cache import default_cache_dir
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "zeroshot_heads"
    identity = text_identity(clip, model)
    tokenizer = None
    heads = {}
    for task, spec in specs.items():
        key = head_cache_key(identity, spec.classnames, spec.templates)
        path = folder / f"{spec.name}-{key}.safetensors"
        if path.is_file():
            weight = load_state_dict(path)["weight"]
            log.info("zero-shot head of %s read from %s", task, path)
        else:
            tokenizer = tokenizer or open_clip.get_tokenizer(model)
            weight = text_head_weight(clip, tokenizer, spec, device)
            save_state_dict({"weight": weight}, path,
                            metadata={"model": model, "task": spec.name, "classes": str(spec.num_classes)})
            log.info("zero-shot head of %s built and cached at %s", task, path)
        if weight.shape[0] != spec.num_classes:
            raise CheckpointError(f"{path}: head has {weight.shape[0]} classes, task {task!r} has "
                                  f"{spec.num_classes}")
        heads[task] = ZeroShotHead(weight)
    return heads


# --------------------------------------------------------------------------------- pool
def complete_visual_state(state: StateDict, base: Mapping[str, torch.Tensor],
                          source: str = "expert") -> StateDict:
    """Check an image-tower state dict against the base's; a missing ``proj`` comes from the base.

    Hugging Face ``CLIPVisionModel`` fine-tunes have no projection (it stays frozen at the
    pretrained value in that recipe), so its task vector there is zero.
    """
    state = dict(state)
    if "proj" in base and "proj" not in state:
        log.info("%s has no 'proj' (Hugging Face CLIPVisionModel layout): using the base's", source)
        state["proj"] = base["proj"].clone()
    state = {k: (v.to(base[k].dtype) if k in base and v.dtype != base[k].dtype
                 and v.is_floating_point() else v) for k, v in state.items()}
    check_compatible(base, state, other_name=source, base_name="the base model's image tower")
    return state


class OpenCLIPPool(ModelPool):
    """An open_clip CLIP model whose image tower is merged; zero-shot heads per task.

    Args:
        model: open_clip model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...).
        pretrained: pretrained tag (``openai``) or a local file with the whole CLIP model's weights.
        experts: task name -> fine-tuned image encoder file: open_clip image tower or whole CLIP
            state dict, Hugging Face ``CLIPVisionModel`` weights, or (with ``allow_pickle``) a
            pickled task-vectors ``ImageEncoder``. Task names are looked up in the task registry
            (class names, templates).
        tasks_file: YAML file of extra / overriding tasks (see ``adamerge/tasks.yaml``).
        head_cache: folder of cached zero-shot heads (default ``$ADAMERGE_CACHE/zeroshot_heads``).
        include: globs of image-tower parameter names to merge (default: all).
        exclude: globs of parameter names that keep the base value.
        task_vector_dtype: storage dtype of the task vectors (float32, bfloat16, float16).
        allow_pickle: allow expert files holding pickled objects (runs code from the file).
        cache_dir: open_clip's download cache.
        text_device: device that runs the text tower when heads are built.
        unseen_tasks: tasks of the task registry evaluated with their zero-shot heads on the merged
            image tower but with no expert in the merge (the AdaMerging paper's generalisation
            protocol: merge 6 of the 8 tasks, test the 2 others too).
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai",
                 experts: dict[str, str] | None = None, tasks_file: str | None = None,
                 head_cache: str | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, task_vector_dtype: str | None = None,
                 allow_pickle: bool = False, cache_dir: str | None = None,
                 text_device: str = "cpu", unseen_tasks: list[str] | None = None) -> None:
        if not experts:
            raise ValueError("OpenCLIPPool needs experts: a mapping of task name -> checkpoint file")
        if task_vector_dtype is not None and task_vector_dtype not in DTYPES:
            raise ValueError(f"task_vector_dtype must be one of {list(DTYPES)}, got {task_vector_dtype!r}")
        self.model, self.pretrained, self.experts = model, pretrained, dict(experts)
        self.tasks_file, self.head_cache = tasks_file, head_cache
        self.include, self.exclude = include, exclude
        self.task_vector_dtype, self.allow_pickle = task_vector_dtype, allow_pickle
        self.cache_dir, self.text_device = cache_dir, text_device
        registry = load_registry(tasks_file)
        self.unseen_tasks = check_unseen(unseen_tasks, list(self.experts))
        # fail early on unknown tasks
        self.specs = {t: get_task(t, registry) for t in [*self.experts, *self.unseen_tasks]}
        missing = [p for p in self.experts.values() if not Path(p).expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"expert checkpoint(s) not found: {missing}")
        check_pretrained(model, pretrained)  # local files and names now, before any download

    def load(self) -> LoadedPool:
        clip = create_clip(self.model, self.pretrained, cache_dir=self.cache_dir)
        every = zero_shot_heads(clip, self.model, self.specs, self.head_cache, self.text_device)
        heads = {t: every[t] for t in self.experts}
        unseen = {t: every[t] for t in self.unseen_tasks}
        visual = clip.visual.cpu()
        del clip  # the text tower is no longer needed
        base = {k: v.detach().clone() for k, v in visual.state_dict().items()}
        names = merged_parameter_names(visual, self.include, self.exclude)
        experts = {t: self._expert(t, base) for t in self.experts}
        for t, state in experts.items():  # NaN/inf named at load, not as a non-finite loss at step 0
            check_finite(state, str(self.experts[t]), names)
        dtype = DTYPES[self.task_vector_dtype] if self.task_vector_dtype else None
        tv = TaskVectors.from_state_dicts(base, experts, names=names, dtype=dtype)
        tv.meta.update({"model": self.model, "pretrained": str(self.pretrained)})
        del experts
        loaders = {t: (lambda t=t: self._expert(t, base)) for t in self.experts}
        recipe = {"kind": "open_clip", "model": self.model, "pretrained": str(self.pretrained)}
        return LoadedPool(visual, tv, heads, loaders, unseen_heads=unseen, encoder_recipe=recipe)

    def _expert(self, task: str, base: Mapping[str, torch.Tensor]) -> StateDict:
        path = self.experts[task]
        return complete_visual_state(load_visual(path, self.allow_pickle), base, source=str(path))


def official_trim(model: str, visual_parameters: int, keep: float = 0.2) -> float:
    """The fraction of the image tower's task-vector entries that the official AdaMerging++ keeps.

    The official code (EnnengYang/AdaMerging ``src/main_layer_wise_adamergingpp.py`` L44-60,
    ``ties_merging_utils.py`` L80-99) keeps the top ``keep`` of one flat vector holding every
    tensor of its checkpoints: the image tower plus six text-side tensors (token and positional
    embeddings, ``ln_final``, ``text_projection``, ``logit_scale``) whose task vectors are zero.
    So ``keep * (visual + text-side) / visual`` of the image tower's entries are kept: 0.2583 for
    ViT-B-32, 0.2254 for ViT-L-14. The text-side sizes come from open_clip's model config.
    """
    import open_clip
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"open_clip has no model config {model!r}")
    text = cfg["text_cfg"]
    width, embed = int(text.get("width", 512)), int(cfg["embed_dim"])
    side = (int(text.get("vocab_size", 49408)) * width + int(text.get("context_length", 77)) * width
            + 2 * width + width * embed + 1)
    return round(keep * (visual_parameters + side) / visual_parameters, 4)


__all__ = ["OpenCLIPPool", "ZeroShotHead", "check_pretrained", "complete_visual_state", "create_clip",
           "head_cache_key", "official_trim", "pretrained_source", "resolve_pretrained", "text_identity",
           "zero_shot_heads"]
