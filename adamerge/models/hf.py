"""Hugging Face ``transformers`` causal LMs: the merged "encoder" is the LM answered at its last
position, each task's "head" picks its label words (the verbaliser) from the next-token logits.

* :class:`LastTokenLM` wraps a causal LM so the engine can treat text like images: a batch is one
  tensor ``[B, 2, L]`` (token ids and attention mask, left-padded, so position ``L - 1`` is
  where the answer token comes next); the output is the next-token logits ``[B, V]``.
* :class:`VerbaliserHead` keeps a task's label-word columns: ``[B, V] -> [B, C]``; entropy,
  accuracy and predictions are then over the task's classes, as for an image head.
* :class:`HFCausalLMPool` loads the base (a ``save_pretrained`` folder or a hub id) and the
  experts: PEFT LoRA adapter folders, kept low-rank (``LowRankTaskVectors``: ``B_k A_k`` is never
  materialised for the whole model), or full fine-tunes (dense task vectors). Layer-wise rows
  are the adapted weight matrices (one coefficient per task per LoRA-adapted ``nn.Linear`` /
  GPT-2 ``Conv1D`` weight); parameters no adapter touches keep the base value.

Needs the optional extra ``pip install adamerge[llm]`` (``transformers``, ``peft`` is only needed
to *create* adapters; reading them uses their files).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..engine.lowrank import LowRankTaskVectors
from ..engine.task_vectors import DTYPES, TaskVectors
from ..io.checkpoints import CheckpointError, StateDict, load_state_dict
from .pool import LoadedPool, ModelPool, check_unseen

PREFIX = "lm."  # parameter names of LastTokenLM: "lm." + the transformers model's own names


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # the optional extra
        raise ImportError("language-model pools need transformers: pip install 'adamerge[llm]'") from exc
    return transformers


class LastTokenLM(nn.Module):
    """A causal LM whose output is the next-token logits at the last (left-padded) position.

    Input: ``[B, 2, L]`` integer tensor, ``x[:, 0]`` token ids and ``x[:, 1]`` attention mask.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        import inspect
        # only the last position's logits are read: models that can, compute no others (the
        # vocabulary projection at every position is ~12 % of a GPT-2-small-shaped step)
        self._keep = ({"logits_to_keep": 1}
                      if "logits_to_keep" in inspect.signature(lm.forward).parameters else {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        # positions count real tokens only, so a left-padded prompt is seen as it is unpadded
        # (absolute position embeddings, e.g. GPT-2, depend on it; rotary ones do not)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **self._keep)
        return out.logits[:, -1]

    def save_pretrained_merged(self, folder: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
        """Write the merged LM with ``save_pretrained`` (loadable by plain ``transformers``)."""
        import copy
        lm = copy.deepcopy(self.lm)
        lm.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
        lm.save_pretrained(folder)
        return Path(folder)


class VerbaliserHead(nn.Module):
    """A task's classes = the columns ``token_ids`` of the next-token logits (its label words)."""

    normalizes_features = False

    def __init__(self, token_ids: list[int], words: list[str] | None = None) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.words = list(words or [])

    @property
    def num_classes(self) -> int:
        return int(self.token_ids.numel())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, self.token_ids.to(logits.device))


def verbaliser_ids(tokenizer: Any, words: Sequence[str], task: str = "") -> list[int]:
    """The token id of each label word; each must be exactly one known token of the tokenizer."""
    where = f"task {task!r}: " if task else ""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1 or toks[0] == tokenizer.unk_token_id:
            raise ValueError(f"{where}label word {w!r} is not one token of the vocabulary (tokens: "
                             f"{toks}); a verbaliser needs one token per class (BPE: try ' {w}')")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}label words {list(words)} share tokens {ids}")
    return ids


def load_tasks_file(path: str | Path) -> dict[str, dict]:
    """``{task: {"labels": [word, ...], ...}}`` from a JSON or YAML file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    data = data.get("tasks", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping task -> {{labels: [...]}}")
    for task, spec in data.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("labels"), list) or not spec["labels"]:
            raise ValueError(f"{path}: task {task!r} needs 'labels', a list of label words")
    return data


def _pattern_value(name: str, pattern: Mapping[str, Any], default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key matching the module name."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def read_lora(folder: str | Path, base_state: Mapping[str, torch.Tensor]
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT LoRA adapter folder as ``{base parameter name: (B, A, scale)}`` with
    ``B @ A * scale`` the change of that weight (``fan_in_fan_out`` layers, e.g. GPT-2's
    ``Conv1D``, are transposed here so that the product has the base weight's shape)."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters merge low-rank")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters are not a low-rank weight change; not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: bias={cfg.get('bias')!r}, modules_to_save={cfg.get('modules_to_save')}: "
                         "only pure LoRA adapters (bias 'none', no modules_to_save) are supported")
    files = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    wfile = next((f for f in files if f.is_file()), None)
    if wfile is None:
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    weights = load_state_dict(wfile)
    r_default, alpha_default = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ValueError(f"{wfile}: unexpected tensor {key!r} (not lora_A / lora_B)")
            continue
        module = key.split(".lora_A.")[0]
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"{wfile}: {key!r} has no matching lora_B")
        name = module.removeprefix("base_model.model.")
        param = f"{name}.weight"
        if param not in base_state:
            raise CheckpointError(f"{wfile}: adapter of {name!r}, which the base model does not have "
                                  f"(expected parameter {param!r})")
        r = int(a.shape[0])
        alpha = float(_pattern_value(name, cfg.get("alpha_pattern"), alpha_default))
        if r != _pattern_value(name, cfg.get("rank_pattern"), r_default):
            raise ValueError(f"{wfile}: {key!r} has rank {r}, the config says "
                             f"{_pattern_value(name, cfg.get('rank_pattern'), r_default)}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if cfg.get("fan_in_fan_out"):
            a, b = b.t().contiguous(), a.t().contiguous()  # (B A)^T = A^T B^T
        w = base_state[param]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"{wfile}: adapter of {name!r} makes a {b.shape[0]}x{a.shape[1]} "
                                  f"change, the base weight is {tuple(w.shape)}")
        out[PREFIX + param] = (b.float(), a.float(), scale)
    if not out:
        raise ValueError(f"{wfile}: no LoRA tensors")
    return out


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class HFCausalLMPool(ModelPool):
    """A Hugging Face causal LM and K experts (PEFT LoRA adapters or full fine-tunes).

    Args:
        base: ``save_pretrained`` folder or hub id (downloaded by transformers for users with a
            network) of the pretrained model.
        experts: task -> PEFT adapter folder (``adapter_config.json``) or full model folder.
        tasks_file: JSON/YAML ``{task: {labels: [word, ...]}}``; each label word must be one token.
        tokenizer: folder or id of the tokenizer (default: ``base``).
        dtype: dtype of the loaded base (``float32`` default; ``bfloat16`` halves memory).
        unseen_tasks: tasks with label words but no expert: evaluated, not merged.
    """

    def __init__(self, base: str, experts: dict[str, str], tasks_file: str,
                 tokenizer: str | None = None, dtype: str | None = None,
                 unseen_tasks: list[str] | None = None) -> None:
        if not experts:
            raise ValueError("HFCausalLMPool needs experts: a mapping task -> adapter or model folder")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.base, self.experts = str(base), {t: str(p) for t, p in experts.items()}
        self.tasks_file, self.tokenizer, self.dtype = str(tasks_file), tokenizer, dtype
        self.specs = load_tasks_file(tasks_file)
        missing = [t for t in self.experts if t not in self.specs]
        if missing:
            raise ValueError(f"{tasks_file}: no label words for tasks {missing} (it has {list(self.specs)})")
        self.unseen_tasks = check_unseen(unseen_tasks, list(self.experts), list(self.specs),
                                         where=f" in {tasks_file}")
        kinds = {is_adapter(p) for p in self.experts.values()}
        if len(kinds) > 1:
            raise ValueError("experts mix LoRA adapters and full models: give one kind "
                             f"({ {t: 'lora' if is_adapter(p) else 'full' for t, p in self.experts.items()} })")

    def load(self) -> LoadedPool:
        tf = _transformers()
        dtype = DTYPES[self.dtype] if self.dtype else torch.float32
        lm = tf.AutoModelForCausalLM.from_pretrained(self.base, dtype=dtype)
        tok = tf.AutoTokenizer.from_pretrained(self.tokenizer or self.base)
        encoder = LastTokenLM(lm.eval())
        base_state = {k: v for k, v in lm.state_dict().items()}
        tasks = list(self.experts)
        if all(is_adapter(p) for p in self.experts.values()):
            adapters = {t: read_lora(p, base_state) for t, p in self.experts.items()}
            tv = LowRankTaskVectors.from_adapters(adapters, task_names=tasks)
            loaders = {t: (lambda t=t: self._lora_expert(encoder, adapters[t])) for t in tasks}
        else:
            full = {t: self._full_expert(p) for t, p in self.experts.items()}
            names = sorted(n for n, p in encoder.named_parameters() if p.is_floating_point())
            tv = TaskVectors.from_state_dicts(encoder.state_dict(), full, names=names)
            loaders = {t: (lambda t=t: full[t]) for t in tasks}
        tv.meta.update({"base": self.base})
        heads = {t: VerbaliserHead(verbaliser_ids(tok, self.specs[t]["labels"], t), self.specs[t]["labels"])
                 for t in tasks}
        unseen = {t: VerbaliserHead(verbaliser_ids(tok, self.specs[t]["labels"], t), self.specs[t]["labels"])
                  for t in self.unseen_tasks}
        return LoadedPool(encoder, tv, heads, loaders, unseen_heads=unseen)

    def _full_expert(self, path: str) -> StateDict:
        tf = _transformers()
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return {PREFIX + k: v for k, v in model.state_dict().items()}

    @staticmethod
    def _lora_expert(encoder: nn.Module, adapter: Mapping[str, tuple]) -> StateDict:
        """The expert's full state dict: the base with its adapter merged (for the individual row)."""
        state = {k: v.clone() for k, v in encoder.state_dict().items()}
        for name, (b, a, scale) in adapter.items():
            state[name] = state[name] + (scale * (b @ a)).to(state[name].dtype)
        return state


__all__ = ["HFCausalLMPool", "LastTokenLM", "VerbaliserHead", "is_adapter", "load_tasks_file", "read_lora",
           "verbaliser_ids"]
