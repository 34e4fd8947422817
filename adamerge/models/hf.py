"""Hugging Face ``transformers`` language models. The merged "encoder" is the model answered at
one position; each task's "head" turns that answer into its class logits.

* :class:`LastTokenLM` wraps a causal LM so the engine can treat text like images: a batch is one
  tensor ``[B, 2, L]`` (token ids and attention mask, left-padded, so position ``L - 1`` is
  where the answer token comes next); the output is the next-token logits ``[B, V]``.
* :class:`FirstTokenSeq2Seq` wraps an encoder-decoder LM (T5, Flan-T5, BART): the prompt goes to
  the encoder, the output is the logits of the *first* decoder token ``[B, V]``.
* :class:`VerbaliserHead` keeps a task's label-word columns: ``[B, V] -> [B, C]``; entropy,
  accuracy and predictions are then over the task's classes, as for an image head.
* :class:`LastTokenFeatures` wraps a decoder-only sequence classifier (GPT-2, Llama, Mistral,
  Qwen ``...ForSequenceClassification``): the output is the last position's hidden state
  ``[B, H]`` and each task's head is its expert's own ``score`` layer (``nn.Linear``).
* :class:`HFLanguageModelPool` loads a causal or seq2seq LM (chosen by the base's config) and its
  experts (local folders or hub ids): PEFT LoRA adapters, kept low-rank (``LowRankTaskVectors``:
  ``B_k A_k`` is never materialised for the whole model), or full fine-tunes (dense task vectors,
  loaded in the base's dtype, or streamed from their files with ``task_vector_file``). Layer-wise
  rows are the adapted weight matrices (one coefficient per task per LoRA-adapted ``nn.Linear``
  / GPT-2 ``Conv1D`` weight), or every floating parameter for full fine-tunes; parameters no
  adapter touches keep the base value. :class:`HFSequenceClassifierPool` does the same for
  sequence classifiers, whose per-task ``score`` layers are the heads (LoRA adapters carry them
  as ``modules_to_save``) and are never merged.

Needs the optional extra ``pip install adamerge[llm]`` (``transformers``, ``peft`` is only needed
to *create* adapters; reading them uses their files).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..engine.lowrank import LowRankTaskVectors
from ..engine.task_vectors import DTYPES, TaskVectors
from ..data.text import load_tasks_file
from ..io import offline
from ..io.checkpoints import CheckpointError, StateDict, check_finite, load_state_dict
from ..io.tensor_stack import RenamedReader, WeightFolder, has_weights
from .layout import Layout, infer_layout
from .pool import LoadedPool, ModelPool, check_unseen

PREFIX = "lm."  # parameter names of LastTokenLM: "lm." + the transformers model's own names
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # a PEFT adapter's weights, preferred first
# What an expert given by hub id is fetched with: its config and weights (a model's or a PEFT
# adapter's), safetensors first as transformers prefers them, .bin only for a repo without them.
HUB_EXPERT_FILES = (("config.json", "adapter_config.json", "model.safetensors", "model-*.safetensors",
                     "model.safetensors.index.json", ADAPTER_FILES[0]),
                    ("config.json", "adapter_config.json", "pytorch_model.bin", "pytorch_model-*.bin",
                     "pytorch_model.bin.index.json", ADAPTER_FILES[1]))


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # the optional extra
        raise ImportError("language-model pools need transformers: pip install 'adamerge[llm]'") from exc
    return transformers


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions over real tokens only, so a left-padded prompt is seen as it is unpadded
    (absolute position embeddings, e.g. GPT-2, depend on it; rotary ones do not)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _accepts(fn: Any, name: str) -> bool:
    import inspect
    return name in inspect.signature(fn).parameters


class _HFWrapper(nn.Module):
    """A ``transformers`` model as ``self.lm`` (parameter names ``lm.<its own names>``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def _merged_copy(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        import copy
        lm = copy.deepcopy(self.lm)
        lm.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
        return lm

    def save_pretrained_merged(self, folder: str | Path, state: Mapping[str, torch.Tensor],
                               heads: Mapping[str, nn.Module] | None = None) -> Path:
        """Write the merged model with ``save_pretrained`` (loadable by plain ``transformers``)."""
        self._merged_copy(state).save_pretrained(folder)
        return Path(folder)


class LastTokenLM(_HFWrapper):
    """A causal LM whose output is the next-token logits at the last (left-padded) position.

    Input: ``[B, 2, L]`` integer tensor, ``x[:, 0]`` token ids and ``x[:, 1]`` attention mask.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__(lm)
        # only the last position's logits are read: models that can, compute no others (the
        # vocabulary projection at every position is ~12 % of a GPT-2-small-shaped step)
        self._keep = {"logits_to_keep": 1} if _accepts(lm.forward, "logits_to_keep") else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                      **self._keep)
        return out.logits[:, -1]


class FirstTokenSeq2Seq(_HFWrapper):
    """An encoder-decoder LM whose output is the logits of the first decoder token (the answer
    of Flan-T5-style prompts), ``[B, V]``; input as for :class:`LastTokenLM`.

    ``start``: the token id fed as the decoder's first input; ``None``: the config's
    ``decoder_start_token_id`` (what ``generate`` feeds; 0 for T5). FusionBench's Flan-T5
    AdaMerging feeds 1 (``torch.ones``, fusion_bench/method/adamerging/
    flan_t5_layer_wise_adamerging.py:227 @54c9e8c; ``</s>`` in T5's vocabulary)."""

    def __init__(self, lm: nn.Module, start: int | None = None) -> None:
        super().__init__(lm)
        if start is None:
            start = lm.config.decoder_start_token_id
            if start is None:
                raise ValueError(f"{type(lm).__name__}: the config has no decoder_start_token_id; "
                                 "the first decoder token cannot be asked for (give the pool's decoder_start)")
        vocab = getattr(lm.config, "vocab_size", None)
        if not 0 <= int(start) < (vocab or int(start) + 1):
            raise ValueError(f"decoder_start must be a token id in [0, {vocab}), got {start}")
        self.start = int(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        dec = torch.full((ids.shape[0], 1), self.start, dtype=torch.long, device=ids.device)
        return self.lm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits[:, 0]


# The classification layer of ...ForSequenceClassification: decoder-only (GPT-2, Llama, ...) and
# encoder-only (BERT, RoBERTa, ...) models.
HEAD_MODULES = ("score", "classifier")
# Encoder-only families, by config.model_type: the child names of each layer's MLP linears (the
# pool's layout; adamerge.models.layout). A family missing here is refused with its model_type.
ENCODER_MLPS: dict[str, tuple[str, str]] = {"bert": ("intermediate.dense", "output.dense"),
                                            "roberta": ("intermediate.dense", "output.dense"),
                                            "xlm-roberta": ("intermediate.dense", "output.dense")}


def classifier_head_name(model: nn.Module) -> str:
    """The name of a sequence classifier's head module (``score`` or ``classifier``), or a
    ValueError naming the class."""
    for name in HEAD_MODULES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and any(isinstance(m, nn.Linear) for m in head.modules()):
            return name
    raise ValueError(f"{type(model).__name__}: no linear 'score' or 'classifier' head; supported sequence "
                     "classifiers are decoder-only (GPT-2, Llama, Mistral, Qwen) and encoder-only "
                     f"({', '.join(ENCODER_MLPS)}) ...ForSequenceClassification")


def _right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows moved to right padding (the first real token at position 0), as
    encoder-only models with absolute positions and a first-token head expect."""
    length = ids.shape[1]
    shift = (mask == 0).sum(1, keepdim=True)
    index = (torch.arange(length, device=ids.device)[None] + shift) % length
    return ids.gather(1, index), mask.gather(1, index)


def _set_head(lm: nn.Module, name: str, head: nn.Module) -> None:
    """Put a task's head into a ``transformers`` classifier (``num_labels`` follows it)."""
    import copy
    inner = head.inner if isinstance(head, FirstTokenHead) else head
    setattr(lm, name, copy.deepcopy(inner))
    lm.config.num_labels = [m for m in inner.modules() if isinstance(m, nn.Linear)][-1].out_features


class LastTokenFeatures(_HFWrapper):
    """A decoder-only sequence classifier without its head: the last (left-padded) position's
    hidden state ``[B, H]``, which the model's own pooling (last non-pad token) also reads."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__(lm)
        self.head_name = classifier_head_name(lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        body = getattr(self.lm, self.lm.base_model_prefix)
        out = body(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        return out.last_hidden_state[:, -1]

    def save_pretrained_merged(self, folder: str | Path, state: Mapping[str, torch.Tensor],
                               heads: Mapping[str, nn.Module] | None = None) -> Path:
        """One ``save_pretrained`` classifier per task, ``folder/<task>``: the merged body with
        that task's head (each folder holds the whole body: K copies on disk)."""
        if not heads:
            raise ValueError("a sequence classifier is exported with its task heads; none given")
        lm = self._merged_copy(state)
        for task, head in heads.items():
            _set_head(lm, self.head_name, head)
            lm.save_pretrained(Path(folder) / task)
        return Path(folder)


class FirstTokenFeatures(LastTokenFeatures):
    """An encoder-only sequence classifier (BERT, RoBERTa) without its head: what its head reads,
    of the prompt moved to right padding: the pooler's output where the body has a pooler (BERT),
    else the first token's hidden state (RoBERTa's head reads it), ``[B, H]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = _right_aligned(x[:, 0].long(), x[:, 1].long())
        body = getattr(self.lm, self.lm.base_model_prefix)
        out = body(input_ids=ids, attention_mask=mask)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class FirstTokenHead(nn.Module):
    """An encoder-only classifier's head that reads the first token of a sequence itself
    (RoBERTa's ``RobertaClassificationHead``), applied to the first-token features ``[B, H]``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features[:, None, :])


class VerbaliserHead(nn.Module):
    """A task's classes = the columns ``token_ids`` of the next-token logits (its label words)."""

    normalizes_features = False
    # the features it reads are the LM's logits over the whole vocabulary (the objective
    # ``vocab_entropy_of_mean`` reads them, adamerge/methods/adamerging.py)
    vocabulary_features = True

    def __init__(self, token_ids: list[int], words: list[str] | None = None) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.words = list(words or [])

    @property
    def num_classes(self) -> int:
        return int(self.token_ids.numel())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, self.token_ids.to(logits.device))


class VocabularyHead(nn.Module):
    """An open-ended task's head (``open_ended: true`` in the tasks file: generative prompts, no
    label words): the next-token logits over the whole vocabulary, unchanged, so the ``entropy``
    objective is the entropy of the next token over the vocabulary. Nothing to export (no tensors)."""

    normalizes_features = False
    vocabulary_features = True  # as VerbaliserHead: its features are the LM's vocabulary logits

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


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


def _pattern_value(name: str, pattern: Mapping[str, Any], default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key matching the module name."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def read_lora(folder: str | Path, base_state: Mapping[str, torch.Tensor], heads: Sequence[str] = ()
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT LoRA adapter folder as ``{base parameter name: (B, A, scale)}`` with
    ``B @ A * scale`` the change of that weight (``fan_in_fan_out`` layers, e.g. GPT-2's
    ``Conv1D``, are transposed here so that the product has the base weight's shape).

    ``heads``: module names whose full copies the adapter may carry as ``modules_to_save`` (a
    sequence classifier's ``score``; read them with :func:`read_lora_head`); any other
    ``modules_to_save`` is refused."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters merge low-rank")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters are not a low-rank weight change; not supported")
    saved = [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", *heads)]
    if cfg.get("bias", "none") != "none" or saved:
        raise ValueError(f"{cfg_path}: bias={cfg.get('bias')!r}, modules_to_save={cfg.get('modules_to_save')}: "
                         "only pure LoRA adapters (bias 'none', no modules_to_save but a classifier's "
                         "head) are supported")
    wfile = _adapter_file(folder)
    weights = load_state_dict(wfile)
    check_finite(weights, str(wfile))
    head_keys = {k for k in weights for h in heads if k.startswith(f"base_model.model.{h}.")}
    r_default, alpha_default = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in weights.items():
        if key in head_keys:
            continue
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


def _adapter_file(folder: Path) -> Path:
    files = [folder / name for name in ADAPTER_FILES]
    wfile = next((f for f in files if f.is_file()), None)
    if wfile is None:
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    return wfile


def read_lora_head(folder: str | Path, head: str) -> dict[str, torch.Tensor]:
    """The ``weight`` (and ``bias``) of module ``head`` that a LoRA adapter saved in full
    (``modules_to_save``, as PEFT does for sequence classifiers); ``{}`` when it has none."""
    weights = load_state_dict(_adapter_file(Path(folder)))
    prefix = f"base_model.model.{head}."
    return {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class HFLanguageModelPool(ModelPool):
    """A Hugging Face causal or seq2seq LM and K experts (PEFT LoRA adapters or full fine-tunes);
    the answer is the next token (causal) or the first decoder token (seq2seq, e.g. Flan-T5),
    restricted to each task's label words.

    Args:
        base: ``save_pretrained`` folder or hub id (downloaded by transformers for users with a
            network) of the pretrained model; its config says causal or encoder-decoder.
        experts: task -> PEFT adapter folder (``adapter_config.json``) or full model folder, or
            the hub id (``org/name``) of either: at load, resolved to its snapshot folder in the
            hub cache (config and weight files only; downloaded where there is a network, else one
            :class:`~adamerge.io.offline.OfflineError` line naming the id). Local-looking paths
            (:func:`~adamerge.io.offline.is_local_path`) must exist when the pool is built.
        tasks_file: JSON/YAML ``{task: {labels: [word, ...], template: ..., dataset: ...}}``;
            each label word must be one token (see :mod:`adamerge.data.text` for the rest).
        tokenizer: folder or id of the tokenizer (default: ``base``).
        dtype: dtype of the loaded base (``float32`` default; ``bfloat16`` halves memory).
        unseen_tasks: tasks with label words but no expert: evaluated, not merged.
        decoder_start: encoder-decoder LMs: the token id fed as the first decoder input
            (``None``: the config's ``decoder_start_token_id``, 0 for T5; FusionBench's Flan-T5
            AdaMerging feeds 1). Refused for causal LMs and sequence classifiers.
        task_vector_file: full experts only: stream the task vectors into this safetensors file
            (one expert tensor in memory at a time, read lazily from the experts' (sharded)
            safetensors) and use them memory-mapped from it, so host memory holds about the base,
            never the K experts. The file is reused while its metadata matches (base and expert
            paths, each local weight file's size and mtime, each hub expert's id and commit, task
            order, names, dtype), else rewritten;
            experts' states for reference rows are ``base + tau_k`` built on demand from it.
            Processes loading the same file at once write it once (a lock on ``<file>.lock``).
            ``None`` (default): every expert is loaded with ``from_pretrained`` and kept.
            Refused for LoRA experts (they stay low-rank).
    """

    needs_labels = True  # verbalisers: every task lists its label words

    def __init__(self, base: str, experts: dict[str, str], tasks_file: str | None = None,
                 tokenizer: str | None = None, dtype: str | None = None,
                 unseen_tasks: list[str] | None = None, decoder_start: int | None = None,
                 task_vector_file: str | None = None) -> None:
        if not experts:
            raise ValueError(f"{type(self).__name__} needs experts: a mapping task -> adapter or model folder")
        if decoder_start is not None and (isinstance(decoder_start, bool) or int(decoder_start) != decoder_start
                                          or decoder_start < 0):
            raise ValueError(f"decoder_start must be a token id (an integer >= 0), got {decoder_start!r}")
        self.decoder_start = decoder_start
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.base, self.experts = str(base), {t: str(p) for t, p in experts.items()}
        self.tasks_file, self.tokenizer, self.dtype = tasks_file, tokenizer, dtype
        if tasks_file is None and self.needs_labels:
            raise ValueError(f"{type(self).__name__} needs tasks_file: the label words of every task")
        self.specs = load_tasks_file(tasks_file, need_labels=self.needs_labels) if tasks_file else {}
        if self.needs_labels:
            missing = [t for t in self.experts if t not in self.specs]
            if missing:
                raise ValueError(f"{tasks_file}: no label words for tasks {missing} (it has {list(self.specs)})")
        self.unseen_tasks = self._check_unseen(unseen_tasks)
        self._hub_experts = [t for t, p in self.experts.items() if not offline.is_local_path(p)]
        missing = [p for t, p in self.experts.items() if t not in self._hub_experts and not Path(p).expanduser().exists()]
        if missing:  # local files first, before anything downloads
            raise FileNotFoundError(f"expert folder(s) not found: {missing}")
        for what, name in (("base", self.base), ("tokenizer", tokenizer)):
            if name and offline.is_local_path(name) and not Path(name).expanduser().exists():
                raise FileNotFoundError(f"{name}: {what} folder does not exist")
        if task_vector_file is not None and Path(task_vector_file).expanduser().is_dir():
            raise ValueError(f"task_vector_file {task_vector_file!r} is a folder; give a file path (e.g. "
                             f"{Path(task_vector_file) / 'task_vectors.safetensors'})")
        self.task_vector_file = str(Path(task_vector_file).expanduser()) if task_vector_file else None
        self._check_kinds({t: p for t, p in self.experts.items() if t not in self._hub_experts})

    def _check_kinds(self, folders: Mapping[str, str]) -> None:
        """The experts in ``folders`` are of one kind (LoRA adapters or full models), and LoRA
        adapters come without ``task_vector_file`` (checked for local experts when the pool is
        built, for all once hub ids are resolved at load)."""
        kinds = {t: "lora" if is_adapter(p) else "full" for t, p in folders.items()}
        if len(set(kinds.values())) > 1:
            raise ValueError(f"experts mix LoRA adapters and full models: give one kind ({kinds})")
        if self.task_vector_file is not None and set(kinds.values()) == {"lora"}:
            raise ValueError(f"task_vector_file {self.task_vector_file!r} streams full fine-tuned experts; these "
                             "are LoRA adapters, kept low-rank (never stacked densely): drop task_vector_file")

    def _expert_folders(self) -> dict[str, str]:
        """Each expert's local folder: as given, or a hub id's snapshot folder (:func:`_hub_expert`)."""
        return {t: _hub_expert(p, t) if t in self._hub_experts else p for t, p in self.experts.items()}

    def _check_unseen(self, unseen: list[str] | None) -> list[str]:
        return check_unseen(unseen, list(self.experts), list(self.specs), where=f" in {self.tasks_file}")

    # -- what differs between model kinds
    def auto_class(self, config: Any) -> Any:
        """The ``transformers`` Auto class of the base (from its config)."""
        tf = _transformers()
        return tf.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else tf.AutoModelForCausalLM

    def wrap(self, model: nn.Module) -> _HFWrapper:
        """The encoder: the model answered at one position."""
        if getattr(model.config, "is_encoder_decoder", False):
            return FirstTokenSeq2Seq(model, self.decoder_start)
        self._refuse_decoder_start(model)
        return LastTokenLM(model)

    def _refuse_decoder_start(self, model: nn.Module) -> None:
        if self.decoder_start is not None:
            raise ValueError(f"decoder_start is the first decoder input of encoder-decoder LMs; {self.base} is a "
                             f"{type(model).__name__}: drop decoder_start")

    def head_modules(self, encoder: _HFWrapper) -> tuple[str, ...]:
        """Modules that are per-task heads, never merged."""
        return ()

    def layout(self, encoder: _HFWrapper) -> Layout:
        """Where the model keeps its blocks, MLPs and attention (:mod:`adamerge.models.layout`)."""
        family = ENCODER_MLPS.get(getattr(encoder.lm.config, "model_type", ""))
        return infer_layout(encoder, [family]) if family else infer_layout(encoder)

    def make_heads(self, tasks: Sequence[str], tokenizer: Any, encoder: _HFWrapper,
                   experts: Mapping[str, Any]) -> dict[str, nn.Module]:
        def vocab() -> int:  # the logits' width (may exceed len(tokenizer)); asked only for open-ended tasks
            return encoder.lm.get_output_embeddings().weight.shape[0]
        return {t: VocabularyHead(vocab()) if self.specs[t].get("open_ended") else
                VerbaliserHead(verbaliser_ids(tokenizer, self.specs[t]["labels"], t), self.specs[t]["labels"])
                for t in tasks}

    # -- shared
    def load(self) -> LoadedPool:
        tf = _transformers()
        dtype = DTYPES[self.dtype] if self.dtype else torch.float32
        folders = self._expert_folders()  # hub ids first: a missing one fails before the base loads
        self._check_kinds(folders)
        with _from_hub(self.base, "base"):
            config = tf.AutoConfig.from_pretrained(self.base)
            auto = self.auto_class(config)
            model = auto.from_pretrained(self.base, dtype=dtype)
        with _from_hub(self.tokenizer or self.base, "tokenizer"):
            tok = tf.AutoTokenizer.from_pretrained(self.tokenizer or self.base)
        if getattr(model.config, "pad_token_id", None) is None:  # batched classifiers pool on it
            model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoder = self.wrap(model.eval())
        heads_of = self.head_modules(encoder)
        base_state = dict(model.state_dict())
        tasks = list(self.experts)
        if all(is_adapter(p) for p in folders.values()):
            adapters = {t: read_lora(p, base_state, heads=heads_of) for t, p in folders.items()}
            tv = LowRankTaskVectors.from_adapters(adapters, task_names=tasks)
            loaders = {t: (lambda t=t: self._lora_expert(encoder, adapters[t])) for t in tasks}
            sources: dict[str, Any] = dict(folders)
        else:
            own = encoder.state_dict()
            names = sorted(n for n, p in encoder.named_parameters()
                           if p.is_floating_point() and not _under(n, heads_of))
            if self.task_vector_file:
                tv, loaders, sources = self._streamed_experts(encoder, own, heads_of, names, folders)
            else:
                full = {t: self._full_expert(auto, p, own, heads_of, dtype) for t, p in folders.items()}
                tv = TaskVectors.from_state_dicts(own, {t: st for t, (st, _) in full.items()}, names=names)
                loaders = {t: (lambda t=t: full[t][0]) for t in tasks}
                sources = {t: head for t, (_, head) in full.items()}
        tv.meta.update({"base": self.base})
        heads = self.make_heads(tasks, tok, encoder, sources)
        unseen = self.make_heads(self.unseen_tasks, tok, encoder, {})
        return LoadedPool(encoder, tv, heads, loaders, unseen_heads=unseen, layout=self.layout(encoder))

    def _full_expert(self, auto: Any, path: str, own: Mapping[str, torch.Tensor], heads_of: Sequence[str],
                     dtype: torch.dtype) -> tuple[StateDict, StateDict]:
        """A full fine-tune's state dict in the encoder's names (head modules at the base value)
        and its head tensors, loaded in ``dtype``, the base's (as MergeBench loads its experts in
        bfloat16), so its tensors match the base's dtypes; task vectors subtract in float32."""
        model = auto.from_pretrained(path, dtype=dtype)
        state = {PREFIX + k: v for k, v in model.state_dict().items()}
        check_finite(state, str(path), [PREFIX + n for n, _ in model.named_parameters()])
        head = {k[len(PREFIX) + len(h) + 1:]: v for k, v in state.items() for h in heads_of
                if k.startswith(f"{PREFIX}{h}.")}
        for name, value in state.items():
            if name in own and not _under(name, heads_of) and value.shape != own[name].shape:
                raise CheckpointError(f"{path}: {name.removeprefix(PREFIX)} has shape {tuple(value.shape)}, "
                                      f"the base model's is {tuple(own[name].shape)}")
        return {k: (own[k] if _under(k, heads_of) else state.get(k, own[k])) for k in own}, head

    def _streamed_experts(self, encoder: _HFWrapper, own: Mapping[str, torch.Tensor], heads_of: Sequence[str],
                          names: Sequence[str], folders: Mapping[str, str]
                          ) -> tuple[TaskVectors, dict[str, Any], dict[str, StateDict]]:
        """Full experts read lazily from their files (``folders``: task -> local folder): the task
        vectors streamed into ``task_vector_file`` (memory-mapped), each expert's state built on
        demand from them, and each expert's head tensors (sequence classifiers)."""
        readers = {t: _expert_reader(p, encoder, own) for t, p in folders.items()}
        with _exclusive(self.task_vector_file):
            tv = TaskVectors.streamed(own, readers, names, self.task_vector_file,
                                      metadata=self._provenance(readers, encoder, folders))
        loaders = {t: (lambda k=k, t=t: _expert_from_stack(own, tv, k, readers[t], heads_of))
                   for k, t in enumerate(readers)}
        return tv, loaders, {t: _read_head(r, own, heads_of) for t, r in readers.items()}

    def _provenance(self, readers: Mapping[str, RenamedReader], encoder: _HFWrapper,
                    folders: Mapping[str, str]) -> dict[str, str]:
        """What a reused task-vector file must have been made from: the base and each expert, a
        local one as its path and each weight file's size and modification time, one from the hub
        as its id and revision (a hub expert: the commit its snapshot folder is named by)."""
        files = [f for t, r in readers.items() if t not in self._hub_experts for f in r.reader.files]
        meta = {"base": self.base, "base_revision": str(getattr(encoder.lm.config, "_commit_hash", None) or "")}
        if offline.is_local_path(self.base):
            meta = {"base": str(Path(self.base).expanduser().resolve())}
            files = _base_weight_files(Path(meta["base"])) + files
        stamps = {str(f.resolve()): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
        experts = {t: p if t in self._hub_experts else str(Path(p).expanduser().resolve())
                   for t, p in self.experts.items()}
        meta.update(experts=json.dumps(experts), sources=json.dumps(stamps))
        if self._hub_experts:
            meta["expert_revisions"] = json.dumps({t: Path(folders[t]).name for t in self._hub_experts})
        return meta

    @staticmethod
    def _lora_expert(encoder: nn.Module, adapter: Mapping[str, tuple]) -> StateDict:
        """The expert's full state dict: the base with its adapter merged (for the individual row)."""
        state = {k: v.clone() for k, v in encoder.state_dict().items()}
        for name, (b, a, scale) in adapter.items():
            state[name] = state[name] + (scale * (b @ a)).to(state[name].dtype)
        return state


def _hub_words(what: str, name: str, setting: str) -> tuple[str, str]:
    """The download of hub id ``name`` and how to give a local folder instead (``setting``, the
    config entry), for :mod:`~adamerge.io.offline`'s one-line errors."""
    return (f"{what} {name!r} (a Hugging Face hub id)",
            f"give a local folder instead (`{setting}`, fetched once where there is a network with "
            f"`hf download {name} --local-dir DIR`)")


def _from_hub(name: str, option: str) -> ContextManager[None]:
    """Around ``from_pretrained(name)``: nothing for a local folder; for a hub id, the cache when
    there is no network, else one :class:`~adamerge.io.offline.OfflineError` line."""
    if offline.is_local_path(name):
        return nullcontext()
    return offline.download_or_cache(*_hub_words(option, name, f"{option}: DIR"))


def _hub_expert(name: str, task: str) -> str:
    """The local snapshot folder of the expert with hub id ``name``, holding its config and
    weights only (:data:`HUB_EXPERT_FILES`): the hub cache's when it has them (no connection),
    else downloaded; with no network, one :class:`~adamerge.io.offline.OfflineError` line naming
    the id."""
    what, hint = _hub_words("expert", name, f"experts: {{{task}: DIR}}")
    return str(offline.hub_snapshot(name, HUB_EXPERT_FILES, _holds_expert, what, hint))


def _holds_expert(folder: Path) -> bool:
    """Whether ``folder`` holds an expert: a PEFT adapter's config and weights, or a model's
    config and (every shard of its) weights."""
    if is_adapter(folder):
        return any((folder / name).is_file() for name in ADAPTER_FILES)
    return (folder / "config.json").is_file() and has_weights(folder)


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Held while the task-vector file ``path`` is checked and (re)written, so processes started
    together (the ranks of a torchrun or SLURM launch) write it once and the others wait, then
    reuse it: an advisory lock on ``<path>.lock`` (POSIX ``flock``; elsewhere no lock, and each
    process may write the file, atomically)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _under(name: str, modules: Sequence[str]) -> bool:
    return any(name.startswith(f"{PREFIX}{m}.") for m in modules)


def _expert_reader(folder: str, encoder: _HFWrapper, own: Mapping[str, torch.Tensor]) -> RenamedReader:
    """A full expert's weight files under the encoder's names (``lm.`` + the model's own): a key
    is found as saved, or with the model's ``base_model_prefix`` dropped or added (a bare
    ``LlamaModel`` folder under a ``LlamaForCausalLM``), as ``from_pretrained`` finds it; each
    floating tensor read in the dtype the base has it in (as ``from_pretrained(dtype=...)`` loads
    the expert in the non-streamed pool, so both give the same task vectors)."""
    files = WeightFolder(folder)
    prefix = getattr(encoder.lm, "base_model_prefix", "") or ""
    names = {}
    for name in own:
        key = name[len(PREFIX):]
        alias = key[len(prefix) + 1:] if key.startswith(prefix + ".") else f"{prefix}.{key}"
        # a key found neither way stays as saved: reading it names the folder, the key and the file
        names[name] = next((k for k in (key, alias if prefix else key) if k in files), key)
    return RenamedReader(files, names, {n: v.dtype for n, v in own.items() if v.is_floating_point()})


def _base_weight_files(folder: Path) -> list[Path]:
    """The base folder's weight files (what its task vectors depend on)."""
    try:
        return WeightFolder(folder).files
    except CheckpointError:  # a layout transformers reads and we do not: every weight-like file
        return sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))


def _read_head(reader: RenamedReader, own: Mapping[str, torch.Tensor], heads_of: Sequence[str]) -> StateDict:
    """A full expert's head tensors (float32, copied out of the file), keyed within the head."""
    head = {}
    for name in own:
        for h in heads_of:
            if name.startswith(f"{PREFIX}{h}."):
                head[name[len(PREFIX) + len(h) + 1:]] = reader.read(name).float().clone()
    check_finite(head, f"{reader.reader.folder} ({'/'.join(heads_of)} head)")
    return head


def _expert_from_stack(own: Mapping[str, torch.Tensor], tv: TaskVectors, k: int, reader: RenamedReader,
                       heads_of: Sequence[str]) -> StateDict:
    """Expert ``k``'s state dict as ``base + tau_k`` from the (memory-mapped) task vectors;
    head modules at the base value (as the non-streamed pool gives them); weights tied to a
    merged one (an LM head tied to the embeddings) follow it; other tensors (buffers) as the
    expert's file has them, else the base's."""
    state: StateDict = {}
    for name, tau in zip(tv.names, tv.tensors):
        b = own[name]
        work = torch.promote_types(b.dtype, torch.float32)
        state[name] = (b.to(work) + tau[k].to(work)).to(b.dtype)
    tied = {own[n].data_ptr(): n for n in tv.names if own[n].numel()}
    for name, value in own.items():
        if name in state:
            continue
        alias = tied.get(value.data_ptr()) if value.numel() else None
        if _under(name, heads_of):
            state[name] = value
        elif alias is not None and own[alias].shape == value.shape:
            state[name] = state[alias]
        elif name in reader:
            state[name] = reader.read(name).to(value.dtype).clone()
        else:
            state[name] = value
    return state


HFCausalLMPool = HFLanguageModelPool  # the name of the first release (causal LMs only)


class HFSequenceClassifierPool(HFLanguageModelPool):
    """A Hugging Face sequence classifier (``...ForSequenceClassification``) and K experts, each
    with its own classification head. The bodies are merged; each task's head is its expert's.
    Decoder-only models (GPT-2, Llama, ...): the ``score`` layer on the last position's hidden
    state (:class:`LastTokenFeatures`). Encoder-only models (BERT, RoBERTa, XLM-R: the GLUE
    experts of the TIES, DARE and Twin-Merging papers): the ``classifier`` head on the pooler's
    output (BERT) or on the first token (RoBERTa), the prompt moved to right padding
    (:class:`FirstTokenFeatures`); their MLPs (``intermediate.dense`` / ``output.dense``) are in
    the pool's layout, so WEMoE and Twin-Merging route them. Entropy is over the class logits.
    Experts: full fine-tunes, or PEFT LoRA adapters (``task_type="SEQ_CLS"``, which saves the head
    in full as ``modules_to_save``; an adapter without it uses the base's head).

    Args:
        base: ``save_pretrained`` folder or hub id of the pretrained classifier (a plain LM folder
            works too: ``transformers`` adds a fresh ``score`` layer).
        experts: task -> adapter or model folder, or its hub id (as for :class:`HFLanguageModelPool`).
        tasks_file: optional; ``labels`` there name the classes (their count must match the head).
        tokenizer, dtype, task_vector_file: as for :class:`HFLanguageModelPool` (the heads of
            streamed experts are read from their files too).
        decoder_start: refused (a classifier has no decoder input).
    """

    needs_labels = False

    def _check_unseen(self, unseen: list[str] | None) -> list[str]:
        if unseen:
            raise ValueError(f"unseen_tasks {unseen}: a sequence classifier's task head comes with its "
                             "expert, so a task without an expert has no head")
        return []

    def auto_class(self, config: Any) -> Any:
        return _transformers().AutoModelForSequenceClassification

    def wrap(self, model: nn.Module) -> _HFWrapper:
        self._refuse_decoder_start(model)
        if classifier_head_name(model) == "score":
            return LastTokenFeatures(model)
        kind = getattr(model.config, "model_type", "")
        if kind not in ENCODER_MLPS:
            raise ValueError(f"{type(model).__name__} (model_type {kind!r}): encoder-only classifiers "
                             f"supported: {', '.join(ENCODER_MLPS)} (adamerge.models.hf.ENCODER_MLPS)")
        return FirstTokenFeatures(model)

    def head_modules(self, encoder: _HFWrapper) -> tuple[str, ...]:
        return (encoder.head_name,)

    def make_heads(self, tasks: Sequence[str], tokenizer: Any, encoder: _HFWrapper,
                   experts: Mapping[str, Any]) -> dict[str, nn.Module]:
        base_head = getattr(encoder.lm, encoder.head_name)
        heads = {}
        for t in tasks:
            source = experts[t]
            tensors = read_lora_head(source, encoder.head_name) if isinstance(source, str) else source
            if not tensors:
                tensors = {k: v.detach() for k, v in base_head.state_dict().items()}
            head = _head_like(base_head, tensors)
            out = [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
            labels = self.specs.get(t, {}).get("labels")
            if labels is not None and len(labels) != out:
                raise ValueError(f"{self.tasks_file}: task {t!r} lists {len(labels)} labels, its expert's "
                                 f"{encoder.head_name} layer has {out} classes")
            if isinstance(encoder, FirstTokenFeatures) and not isinstance(head, nn.Linear):
                head = FirstTokenHead(head)  # e.g. RoBERTa's head reads the first token itself
            heads[t] = head.eval().requires_grad_(False)
        return heads


def _head_like(base: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the base's head module holding ``tensors`` (its linear layers resized to them:
    an expert may have another class count), in the base head's dtype."""
    import copy
    head = copy.deepcopy(base)
    for name, m in list(head.named_modules()):
        w = tensors.get(f"{name}.weight" if name else "weight")
        if isinstance(m, nn.Linear) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, dtype=m.weight.dtype)
            if name:
                parent, _, child = name.rpartition(".")
                setattr(head.get_submodule(parent) if parent else head, child, layer)
            else:
                head = layer
    head.load_state_dict(dict(tensors))
    return head


__all__ = ["FirstTokenFeatures", "FirstTokenHead", "FirstTokenSeq2Seq", "HFCausalLMPool", "HFLanguageModelPool", "HFSequenceClassifierPool",
           "LastTokenFeatures", "LastTokenLM", "VerbaliserHead", "VocabularyHead", "classifier_head_name", "is_adapter",
           "load_tasks_file", "read_lora", "read_lora_head", "verbaliser_ids"]
