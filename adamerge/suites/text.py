"""An offline text suite: a tiny causal LM, one LoRA expert per procedural text task, cached.

The text counterpart of :mod:`adamerge.suites.synthetic`, for merging language models. Every
example is a prompt ending in the answer marker ``->`` (``"min : 7 3 9 4 ->"``) and a label
indexing the task's *verbaliser*, its list of one-token label words (``["0", ..., "9"]``); a
model answers with its next-token logits at the prompt's last position, restricted to the
verbaliser.

A word-level tokenizer covers every word of the suite's tasks. A small Llama is "pretrained" with
the next-token objective on the training prompts followed by a *random* label word of their task,
mixed with generic texts in a toy language: it learns the vocabulary, the format and which words
may answer which task, but not the tasks themselves, so restricted to the verbaliser it is near
chance. One LoRA expert per task is then trained with cross-entropy on the answer token.
Everything is deterministic given the spec and cached under a hash of the full spec; the base,
tokenizer and adapters are saved with plain ``save_pretrained``, so ``transformers`` and ``peft``
load them without adamerge.

Layout of a built suite (``ensure_text_suite``)::

    base/                       model (safetensors) + tokenizer, save_pretrained
    experts/<task>/             LoRA adapter: adapter_config.json + adapter_model.safetensors
    experts_full/<task>/        fully fine-tuned model (only with ``full_experts``)
    data/<task>/<split>.jsonl   {"prompt": str, "label": int} per line; splits train/val/test
    tasks.json                  {task: {"labels": [words...], "description": str}}
    suite.json                  spec, test accuracies, logit fingerprints (written last)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .pinned import build_pinned, cpu_capability
from ..errors import unknown_name
from ..io.cache import default_cache_dir
from ..io.checkpoints import write_json_atomic
from ..data.text import TextSource
from ..models.hf import HFLanguageModelPool, verbaliser_ids  # noqa: F401  (verbaliser_ids: re-exported)
from ..models.pool import LoadedPool, ModelPool, check_unseen
from .synthetic import spec_with

# bump when generators or training change: it is part of the cache key. 2: build 1's computation,
# run with the CPU kernels pinned to AVX2 (adamerge.suites.pinned)
TEXT_SUITE_VERSION = 2

ANSWER = "->"  # every prompt ends with this marker; the answer is the next token
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, in this order
SPLITS = ("train", "val", "test")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINGERPRINT_N = 4  # test prompts per task whose answer logits suite.json records


# ------------------------------------------------------------------------------- tasks
LETTERS = list("abcdefgh")
DIGITS = [str(d) for d in range(10)]
TOPICS = {"fruit": ["apple", "banana", "pear", "plum", "grape", "mango"],
          "animal": ["dog", "cat", "horse", "mouse", "lion", "sheep"],
          "vehicle": ["car", "bus", "train", "bike", "boat", "truck"],
          "colour": ["red", "blue", "green", "yellow", "black", "white"]}
MOODS = {"positive": ["good", "great", "nice", "happy", "fun", "lovely"],
         "negative": ["bad", "awful", "sad", "boring", "poor", "ugly"]}
NEUTRAL = ["movie", "plot", "actor", "scene", "music", "ending"]
COUNTS = ["zero", "one", "two", "three"]


@dataclass(frozen=True)
class TextTask:
    """A procedural classification task over words.

    ``sample(rng)`` draws one example: the prompt's words before the answer marker (starting
    with the task's name) and the label's index in ``labels``.
    """

    name: str
    labels: tuple[str, ...]
    description: str
    words: tuple[str, ...]  # every word a prompt may contain besides its name, ':' and '->'
    sample: Callable[[np.random.Generator], tuple[list[str], int]]


def _pick(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def _count(rng: np.random.Generator) -> tuple[list[str], int]:
    # The label is drawn first, so every count is equally frequent.
    label = int(rng.integers(0, len(COUNTS)))
    body = ["a"] * label + _pick(rng, LETTERS[1:5], 6 - label)
    return ["count", ":", *rng.permutation(body).tolist()], label


def _min(rng: np.random.Generator) -> tuple[list[str], int]:
    # Draw the minimum first (uniform over 0-9), then the other digits at or above it.
    low = int(rng.integers(0, 10))
    digits = rng.integers(low, 10, 4)
    digits[rng.integers(0, 4)] = low
    return ["min", ":", *map(str, digits.tolist())], low


def _topic(rng: np.random.Generator) -> tuple[list[str], int]:
    names = list(TOPICS)
    label = int(rng.integers(0, len(names)))
    rivals = [n for n in names if n != names[label]]
    body = _pick(rng, TOPICS[names[label]], 3) + [
        TOPICS[rivals[i]][rng.integers(0, 6)] for i in rng.integers(0, len(rivals), 2)]
    return ["topic", ":", *rng.permutation(body).tolist()], label


def _last(rng: np.random.Generator) -> tuple[list[str], int]:
    body = _pick(rng, LETTERS, int(rng.integers(3, 7)))
    return ["last", ":", *body], LETTERS.index(body[-1])


def _review(rng: np.random.Generator) -> tuple[list[str], int]:
    label = int(rng.integers(0, 2))
    names = list(MOODS)
    body = (_pick(rng, MOODS[names[label]], 3) + _pick(rng, MOODS[names[1 - label]], int(rng.integers(0, 3)))
            + _pick(rng, NEUTRAL, 2))
    return ["review", ":", *rng.permutation(body).tolist()], label


TEXT_TASKS: dict[str, TextTask] = {t.name: t for t in [
    TextTask("count", tuple(COUNTS), "how many times the letter a occurs among six letters (a-e)",
             tuple(LETTERS[:5]), _count),
    TextTask("min", tuple(DIGITS), "the smallest of four digits", tuple(DIGITS), _min),
    TextTask("topic", tuple(TOPICS), "the class (fruit/animal/vehicle/colour) of the majority of five words",
             tuple(w for ws in TOPICS.values() for w in ws), _topic),
    TextTask("last", tuple(LETTERS), "the last of 3-6 letters", tuple(LETTERS), _last),
    TextTask("review", tuple(MOODS), "whether positive or negative words dominate a short review",
             tuple(w for ws in [*MOODS.values(), NEUTRAL] for w in ws), _review),
]}


def _check_task(task: str) -> TextTask:
    if task not in TEXT_TASKS:
        raise ValueError(unknown_name("task", task, sorted(TEXT_TASKS), where=" in the text suites"))
    return TEXT_TASKS[task]


# ------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TextSuiteSpec:
    """Everything that determines a text suite's data and weights (its hash is the cache key)."""

    tasks: tuple[str, ...] = ("count", "min", "topic", "last", "review")
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 500
    hidden: int = 64
    intermediate: int = 192
    layers: int = 2
    heads: int = 4
    max_positions: int = 64
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    generic_fraction: float = 0.5  # of pretraining texts that are generic texts (see _pretrain)
    expert_steps: int = 200
    expert_lr: float = 5e-3
    batch_size: int = 32
    lora_rank: int = 8
    lora_alpha: int = 16
    full_experts: bool = False  # also fine-tune every weight per task (experts_full/)
    full_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a text suite needs distinct tasks, got {self.tasks!r}")
        for t in self.tasks:
            _check_task(t)
        for name in ("n_train", "n_test", "hidden", "intermediate", "layers", "heads", "max_positions",
                     "batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"text suite field {name!r} must be >= 1, got {getattr(self, name)!r}")
        if self.hidden % (2 * self.heads):  # rotary embeddings need an even head size
            raise ValueError(f"hidden={self.hidden} must be a multiple of 2 * heads={2 * self.heads}")
        if not 0 <= self.generic_fraction < 1:
            raise ValueError(f"generic_fraction must be in [0, 1), got {self.generic_fraction!r}")

    def key(self) -> str:
        """``text-`` and 12 hex digits of the spec's hash (the prefix keeps it apart from vision suites)."""
        blob = json.dumps({"kind": "text", "version": TEXT_SUITE_VERSION, **asdict(self)}, sort_keys=True)
        return "text-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


TEXT_PRESETS: dict[str, TextSuiteSpec] = {
    "tiny": TextSuiteSpec(tasks=("topic", "last", "min"), n_train=400, n_val=50, n_test=100, hidden=32,
                          intermediate=64, layers=2, heads=2, max_positions=32, pretrain_steps=60,
                          expert_steps=60, expert_lr=1e-2, full_lr=3e-3, batch_size=32),
    "demo": TextSuiteSpec(),
}


def get_text_spec(suite: str | TextSuiteSpec, **overrides: Any) -> TextSuiteSpec:
    """A preset by name (``tiny``, ``demo``) or a spec, with field overrides (checked by
    :func:`adamerge.suites.synthetic.spec_with`; ``__post_init__`` checks the values)."""
    return spec_with(suite, TEXT_PRESETS, "text suite", overrides)


# -------------------------------------------------------------------------------- data
def task_prompts(spec: TextSuiteSpec, task: str) -> dict[str, list[dict]]:
    """``{split: [{"prompt": str, "label": int}, ...]}`` for train/val/test.

    Each split has its own random stream, seeded by (seed, task, split): changing one split's
    size or adding a task leaves the other splits' examples unchanged. The splits are drawn
    independently, so a few short prompts (``last`` of 3 letters) occur in more than one split.
    """
    t = _check_task(task)
    sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    out = {}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([spec.seed, zlib.crc32(task.encode()), i])
        rows = []
        for _ in range(sizes[split]):
            words, label = t.sample(rng)
            rows.append({"prompt": " ".join([*words, ANSWER]), "label": label})
        out[split] = rows
    return out


def suite_words(tasks: Sequence[str]) -> list[str]:
    """The sorted union of the tasks' words: names, prompt words, label words, ':' and '->'."""
    words = {":", ANSWER}
    for name in tasks:
        t = _check_task(name)
        words |= {t.name, *t.words, *t.labels}
    return sorted(words)


def load_tasks(folder: str | os.PathLike) -> dict[str, dict]:
    """A built suite's ``{task: {"labels": [words...], "description": str}}``."""
    return json.loads((Path(folder) / "tasks.json").read_text())


def load_prompts(folder: str | os.PathLike, task: str, split: str) -> list[dict]:
    """The ``{"prompt", "label"}`` rows of a built suite's task split."""
    if split not in SPLITS:
        raise ValueError(unknown_name("split", split, SPLITS))
    path = Path(folder) / "data" / task / f"{split}.jsonl"
    if not path.is_file():
        known = sorted(p.name for p in (Path(folder) / "data").iterdir()) if (Path(folder) / "data").is_dir() else []
        raise ValueError(unknown_name("task", task, known, where=f" in {folder}"))
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(tasks: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` over the tasks' words.

    Words are split on whitespace only, so ``->`` and ``:`` are single tokens. ``<bos>`` is
    prepended to every text. Padding is on the *left*: the last position of every row of a batch
    is then its prompt's last token, where the answer is read (see :func:`model_inputs`).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *suite_words(tasks)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def model_inputs(tokenizer, prompts: Sequence[str | Mapping], device: torch.device | str | None = None
                 ) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for a batch of prompts, left-padded.

    The position ids count real tokens only, as ``generate`` does, so a prompt's positions do not
    depend on its batch's padding (Llama would otherwise number the pads too).
    """
    texts = [p["prompt"] if isinstance(p, Mapping) else p for p in prompts]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": pos}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_logits(model: nn.Module, tokenizer, prompts: Sequence[str | Mapping], label_ids: Sequence[int],
                  batch_size: int = 256) -> torch.Tensor:
    """``[N, C]`` next-token logits at each prompt's last position, restricted to ``label_ids``.

    Runs in the caller's grad mode (AdaMerging differentiates through it); wrap it in
    ``torch.no_grad()`` to evaluate.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = _device(model)
    ids = torch.as_tensor(list(label_ids), dtype=torch.long, device=dev)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = model_inputs(tokenizer, prompts[i:i + batch_size], dev)
        out.append(model(**batch, logits_to_keep=1).logits[:, -1].index_select(-1, ids))
    return torch.cat(out) if out else torch.zeros(0, len(ids), device=dev)


def accuracy(model: nn.Module, tokenizer, folder: str | os.PathLike, task: str, split: str = "test",
             batch_size: int = 256) -> float:
    """The fraction of a built suite's task split that ``model`` answers right."""
    tasks = load_tasks(folder)
    if task not in tasks:
        raise ValueError(unknown_name("task", task, list(tasks), where=f" in {folder}"))
    rows = load_prompts(folder, task, split)
    with torch.no_grad():
        logits = answer_logits(model, tokenizer, rows, verbaliser_ids(tokenizer, tasks[task]["labels"]), batch_size)
    return _hits(logits, rows) / max(len(rows), 1)


def _hits(logits: torch.Tensor, rows: list[dict]) -> int:
    labels = torch.tensor([r["label"] for r in rows], device=logits.device)
    return int((logits.argmax(-1) == labels).sum())


# ------------------------------------------------------------------------------- model
def make_model(spec: TextSuiteSpec, vocab_size: int) -> nn.Module:
    """A freshly initialised tiny ``LlamaForCausalLM`` (random weights from torch's global RNG)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, max_position_embeddings=spec.max_positions,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def lora_config(spec: TextSuiteSpec):
    """The experts' ``peft.LoraConfig``: every linear layer of every block, no dropout, no bias."""
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=list(LORA_TARGETS),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def load_base(folder: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A built suite's base model and tokenizer, through plain ``transformers``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(folder) / "base"
    return AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)


def load_expert(folder: str | os.PathLike, task: str, full: bool = False) -> nn.Module:
    """A task's expert: the base with its LoRA adapter (a ``PeftModel``), or with ``full`` the
    fully fine-tuned model (only if the suite was built with ``full_experts``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sub = Path(folder) / ("experts_full" if full else "experts") / task
    if not sub.is_dir():
        known = sorted(p.name for p in sub.parent.iterdir()) if sub.parent.is_dir() else []
        raise ValueError(unknown_name("expert", task, known, where=f" in {sub.parent}"))
    if full:
        return AutoModelForCausalLM.from_pretrained(sub)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(Path(folder) / "base"), sub)


def lora_task_vector(folder: str | os.PathLike, task: str) -> dict[str, torch.Tensor]:
    """A LoRA expert's weight delta ``alpha / r * B @ A``, keyed by the base's parameter names
    (``model.layers.0.self_attn.q_proj.weight``...): the expert is ``base + delta``."""
    from safetensors.torch import load_file

    sub = Path(folder) / "experts" / task
    if not (sub / "adapter_config.json").is_file():
        raise ValueError(f"no LoRA expert {task!r} in {sub.parent}")
    cfg = json.loads((sub / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{sub}: per-module LoRA ranks/alphas are not supported, got {cfg.get('rank_pattern')!r}")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    state = load_file(str(sub / "adapter_model.safetensors"))
    delta = {}
    for key, a in state.items():
        if ".lora_A." in key:
            b = state[key.replace(".lora_A.", ".lora_B.")]
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
            delta[name] = scale * (b @ a)
    return delta


# ---------------------------------------------------------------------------- training
def _generic_texts(spec: TextSuiteSpec, words: Sequence[str], n: int) -> list[str]:
    """``n`` generic texts: 6-12 word walks where each word is mostly followed by one fixed successor.

    A toy "language" over the suite's words in which every word, label words included, is often
    predictable with confidence.
    """
    rng = np.random.default_rng([spec.seed, zlib.crc32(b"generic")])
    succ = rng.permutation(len(words))
    out = []
    for _ in range(n):
        i, seq = int(rng.integers(0, len(words))), []
        for _ in range(int(rng.integers(6, 13))):
            seq.append(words[i])
            i = int(succ[i]) if rng.random() < 0.8 else int(rng.integers(0, len(words)))
        out.append(" ".join(seq + ["<eos>"]))
    return out


def _check_length(spec: TextSuiteSpec, enc: dict[str, torch.Tensor]) -> None:
    longest = int(enc["attention_mask"].sum(-1).max())
    if longest > spec.max_positions:
        raise ValueError(f"max_positions={spec.max_positions} is below the longest text ({longest} tokens)")


def _pretrain(spec: TextSuiteSpec, model: nn.Module, tokenizer, data: dict, say: Callable[[str], None]) -> None:
    """Next-token loss on two kinds of text, mixed in each batch.

    Task prompts followed by a *random* label word of their task (redrawn at every visit) and
    <eos>: the base learns the format and which words answer which task, nothing more, so it is
    at chance on the tasks. Generic texts (:func:`_generic_texts`, a ``generic_fraction`` of
    the mix): the base learns to predict any word, label words included, with confidence.
    Without them no LoRA expert can be confident: LoRA leaves the output layer as the random
    answers made it (label words hard to tell apart), and AdaMerging's entropy would then say
    little about which merge is right.
    """
    rows = [(i, r["prompt"]) for i, t in enumerate(spec.tasks) for r in data[t]["train"]]
    n_generic = round(len(rows) * spec.generic_fraction / max(1 - spec.generic_fraction, 1e-9))
    texts = [f"{p} {ANSWER} <eos>" for _, p in rows]  # ANSWER: placeholder for the random answer
    texts += _generic_texts(spec, [w for w in suite_words(spec.tasks) if w not in (":", ANSWER)], n_generic)
    enc = model_inputs(tokenizer, texts)  # once; batches are row subsets (extra left pads are masked)
    _check_length(spec, enc)
    task_of = torch.tensor([i for i, _ in rows] + [-1] * n_generic)
    verb = [torch.tensor(verbaliser_ids(tokenizer, TEXT_TASKS[t].labels)) for t in spec.tasks]
    g = torch.Generator().manual_seed(spec.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(spec.pretrain_steps, 1))
    model.train()
    for step in range(spec.pretrain_steps):
        idx = torch.randint(0, len(texts), (spec.batch_size,), generator=g)
        batch = {k: v[idx] for k, v in enc.items()}
        ids = batch["input_ids"].clone()
        for j, t in enumerate(task_of[idx].tolist()):  # a prompt's answer sits just before <eos>
            if t >= 0:
                ids[j, -2] = verb[t][torch.randint(0, len(verb[t]), (1,), generator=g)]
        # Pads and <bos> are no targets (a pad's logits would have to predict the <bos> after it).
        labels = ids.masked_fill((batch["attention_mask"] == 0) | (ids == tokenizer.bos_token_id), -100)
        loss = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(spec.pretrain_steps // 4, 1) == 0:
            say(f"pretrain step {step + 1}/{spec.pretrain_steps} loss {loss.item():.3f}")
    model.eval()


def _train_answers(spec: TextSuiteSpec, model: nn.Module, tokenizer, task: str, rows: list[dict],
                   lr: float, say: Callable[[str], None], label: str) -> None:
    """Cross-entropy on the answer token, over the verbaliser only, for the trainable parameters."""
    enc = model_inputs(tokenizer, [r["prompt"] for r in rows])
    y = torch.tensor([r["label"] for r in rows])
    ids = torch.tensor(verbaliser_ids(tokenizer, TEXT_TASKS[task].labels))
    g = torch.Generator().manual_seed(spec.seed + 2 + zlib.crc32(task.encode()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(spec.expert_steps, 1))
    model.train()
    for step in range(spec.expert_steps):
        idx = torch.randint(0, len(y), (spec.batch_size,), generator=g)
        logits = model(**{k: v[idx] for k, v in enc.items()}, logits_to_keep=1).logits[:, -1, ids]
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(spec.expert_steps // 2, 1) == 0:
            say(f"{label} step {step + 1}/{spec.expert_steps} loss {loss.item():.3f}")
    model.eval()


def _fingerprint(model: nn.Module, tokenizer, rows: list[dict], labels: Sequence[str]) -> list[list[float]]:
    with torch.no_grad():
        logits = answer_logits(model, tokenizer, rows[:FINGERPRINT_N], verbaliser_ids(tokenizer, labels))
    return [[round(v, 5) for v in row] for row in logits.tolist()]


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_text_suite(spec: TextSuiteSpec, out: str | os.PathLike,
                     progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Write data, tokenizer, base and experts of ``spec`` to ``out``; return the ``suite.json`` record.

    ``suite.json`` is written last: a folder without it is unfinished. It holds the spec, per-task
    test accuracies of the base and the experts, and a *fingerprint* per model (answer logits of
    the first test prompts) that a reload must reproduce.
    """
    threads = torch.get_num_threads()
    # One thread: these matrices are tiny, so more threads mostly add overhead (several times
    # slower when the cores are busy), and the build is the same on every machine.
    torch.set_num_threads(1)
    try:
        return _build(spec, Path(out), progress or (lambda s: None))
    finally:
        torch.set_num_threads(threads)


def _build(spec: TextSuiteSpec, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from peft import get_peft_model

    start = time.perf_counter()
    data = {t: task_prompts(spec, t) for t in spec.tasks}
    for t, splits in data.items():
        for split, rows in splits.items():
            _write_jsonl(rows, out / "data" / t / f"{split}.jsonl")
    tasks = {t: {"labels": list(TEXT_TASKS[t].labels), "description": TEXT_TASKS[t].description}
             for t in spec.tasks}
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    tokenizer = build_tokenizer(spec.tasks)
    torch.manual_seed(spec.seed)
    base = make_model(spec, len(tokenizer))
    _pretrain(spec, base, tokenizer, data, say)
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    record: dict[str, Any] = {"version": TEXT_SUITE_VERSION, "key": spec.key(), "spec": asdict(spec),
                              "cpu_capability": cpu_capability(), "accuracy": {}, "fingerprint": {}}

    def evaluate(model: nn.Module, t: str) -> tuple[float, list]:
        rows = data[t]["test"]
        with torch.no_grad():
            logits = answer_logits(model, tokenizer, rows, verbaliser_ids(tokenizer, tasks[t]["labels"]))
        return _hits(logits, rows) / len(rows), _fingerprint(model, tokenizer, rows, tasks[t]["labels"])

    for i, t in enumerate(spec.tasks):
        acc, fp = evaluate(base, t)
        record["accuracy"][t] = {"base": acc}
        record["fingerprint"][t] = {"base": fp}
        torch.manual_seed(spec.seed + 1000 + i)  # LoRA's A init
        with warnings.catch_warnings():  # peft asks a deprecated transformers property; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            expert = get_peft_model(copy.deepcopy(base), lora_config(spec))
        _train_answers(spec, expert, tokenizer, t, data[t]["train"], spec.expert_lr, say, f"expert {t}")
        expert.save_pretrained(out / "experts" / t)
        record["accuracy"][t]["expert"], record["fingerprint"][t]["expert"] = evaluate(expert, t)
        if spec.full_experts:
            full = copy.deepcopy(base)
            _train_answers(spec, full, tokenizer, t, data[t]["train"], spec.full_lr, say, f"full expert {t}")
            full.save_pretrained(out / "experts_full" / t)
            record["accuracy"][t]["expert_full"], record["fingerprint"][t]["expert_full"] = evaluate(full, t)
        say(f"{t}: base {record['accuracy'][t]['base']:.3f} expert {record['accuracy'][t]['expert']:.3f}")
    record["build_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(record, out / "suite.json")
    return record


def text_suite_folder(spec: TextSuiteSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``spec``'s suite lives (built or not): ``<cache>/suites/<key>``."""
    return Path(cache_dir or default_cache_dir()) / "suites" / spec.key()


def ensure_text_suite(spec: TextSuiteSpec, cache_dir: str | os.PathLike | None = None,
                      progress: Callable[[str], None] | None = print) -> Path:
    """The folder of ``spec``'s suite, building it on first use.

    The build goes to a hidden temporary folder next to the final one, renamed into place once
    complete: an interrupted build leaves no folder under the suite's name (and removes its own
    temporary one unless the process is killed outright).
    """
    folder = text_suite_folder(spec, cache_dir)
    if (folder / "suite.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key()}.", suffix=".tmp", dir=folder.parent))
    try:
        if progress:
            progress(f"building text suite {spec.key()} ({len(spec.tasks)} experts) in {folder}")
        build_pinned("text", asdict(spec), tmp, lambda: build_text_suite(spec, tmp, progress), progress)
        if folder.exists() and not (folder / "suite.json").is_file():
            shutil.rmtree(folder)  # left by an older, non-atomic writer: never complete
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "suite.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------ pool and data source
class TextSuitePool(ModelPool):
    """The base LM and LoRA experts of a built-in text suite (built on first use, then cached),
    for configs: ``model.pool.class_path: adamerge.suites.TextSuitePool``.

    Args:
        suite: preset name (``tiny``, ``demo``).
        tasks: the merged tasks, in order (default: the suite's tasks but ``unseen_tasks``).
        seed: suite seed (data and weights).
        cache_dir: where the suite is cached (default ``$ADAMERGE_CACHE`` or ``~/.cache/adamerge``).
        full_experts: merge the fully fine-tuned experts instead of the LoRA adapters.
        task_vector_file: with ``full_experts``: stream the task vectors into this file
            (:class:`~adamerge.models.hf.HFLanguageModelPool`'s option of that name).
        overrides: other spec fields (see :class:`TextSuiteSpec`).
        unseen_tasks: suite tasks evaluated with their label words but not merged.
    """

    def __init__(self, suite: str = "tiny", tasks: list[str] | None = None, seed: int = 0,
                 cache_dir: str | None = None, full_experts: bool = False,
                 overrides: dict[str, Any] | None = None, unseen_tasks: list[str] | None = None,
                 task_vector_file: str | None = None) -> None:
        self.task_vector_file = task_vector_file
        self.spec = get_text_spec(suite, **{**(overrides or {}), "seed": seed,
                                            **({"full_experts": True} if full_experts else {})})
        unseen = list(unseen_tasks or [])
        self.tasks = list(tasks or [t for t in self.spec.tasks if t not in unseen])
        self.unseen_tasks = check_unseen(unseen, self.tasks, self.spec.tasks, where=f" in text suite {suite!r}")
        for t in self.tasks:
            if t not in self.spec.tasks:
                raise ValueError(unknown_name("task", t, self.spec.tasks, where=f" in text suite {suite!r}"))
        self.cache_dir, self.full_experts = cache_dir, full_experts

    def hf_pool(self) -> HFLanguageModelPool:
        """The suite's files as a :class:`HFLanguageModelPool` (building the suite if needed)."""
        folder = ensure_text_suite(self.spec, self.cache_dir)
        kind = "experts_full" if self.full_experts else "experts"
        return HFLanguageModelPool(base=str(folder / "base"), experts={t: str(folder / kind / t) for t in self.tasks},
                                   tasks_file=str(folder / "tasks.json"), unseen_tasks=self.unseen_tasks,
                                   task_vector_file=self.task_vector_file)

    def load(self) -> LoadedPool:
        return self.hf_pool().load()


class TextSuiteSource(TextSource):
    """The prompts of a built-in text suite (splits ``train``, ``val``, ``test``), padded to the
    longest prompt of the suite, for configs: ``data.source.class_path: adamerge.suites.TextSuiteSource``.

    Args:
        suite, seed, cache_dir, overrides: as for :class:`TextSuitePool` (the same suite).
        tasks: a subset / order of the suite's tasks (default: all, unseen ones included).
    """

    def __init__(self, suite: str = "tiny", tasks: list[str] | None = None, seed: int = 0,
                 cache_dir: str | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.spec = get_text_spec(suite, **{**(overrides or {}), "seed": seed})
        for t in tasks or []:
            if t not in self.spec.tasks:
                raise ValueError(unknown_name("task", t, self.spec.tasks, where=f" in text suite {suite!r}"))
        self.cache_dir, self.suite_tasks = cache_dir, list(tasks or self.spec.tasks)
        self._built = False

    def _build(self) -> None:
        if not self._built:
            folder = ensure_text_suite(self.spec, self.cache_dir)
            TextSource.__init__(self, str(folder / "data"), tokenizer=str(folder / "base"),
                                tasks=self.suite_tasks, max_length="longest")
            self._built = True

    def task_names(self) -> list[str]:
        return list(self.suite_tasks)

    def rows(self, task: str, split: str):
        self._build()
        return super().rows(task, split)

    def dataset(self, task: str, split: str):
        self._build()
        return super().dataset(task, split)
