"""Text tasks for language-model pools: prompts from local JSONL/CSV files or Hugging Face
datasets, tokenised once.

Each example is a prompt that ends where the answer token comes next, and a label index into
the task's label words (the verbaliser of :class:`adamerge.models.hf.VerbaliserHead`) or class
logits (a sequence-classification head). Items are ``(tensor [2, L], label)``: token ids and
attention mask, left-padded (the prompt's end is kept when it is longer than ``max_length``),
the layout the language-model encoders of :mod:`adamerge.models.hf` read; so the adaptation
stream, evaluation and every method work on text unchanged.

The prompt of a record is its ``prompt`` field, or the task's ``template`` from the tasks file
filled with the record's fields (``"Review: {sentence}\nSentiment:"``); a label is a class index
or one of the task's label words.
"""

from __future__ import annotations

import csv
import json
from abc import abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import unknown_name
from ..io import offline
from .datamodule import DatasetSource


def load_tasks_file(path: str | Path, need_labels: bool = True) -> dict[str, dict]:
    """``{task: {"labels": [word, ...], "template": ..., "dataset": {...}}}`` from a JSON or YAML
    file (a top-level ``tasks:`` key is optional). ``need_labels``: every task must list its
    label words (verbalisers of causal / seq2seq LMs; sequence classifiers have class logits),
    but an ``open_ended: true`` task, answered over the whole vocabulary (generative prompts)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read the tasks file ({exc.strerror})") from None
    import yaml
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(exc).splitlines()[0]})") from None
    data = data.get("tasks", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping task -> {{labels: [...]}}")
    for task, spec in data.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: task {task!r} must be a mapping (labels, template, dataset), got {spec!r}")
        labels = spec.get("labels")
        if spec.get("open_ended") and labels is not None:  # no label words: the whole vocabulary answers
            raise ValueError(f"{path}: task {task!r} is open_ended (answered over the whole vocabulary); drop its 'labels'")
        if (need_labels and not spec.get("open_ended") or labels is not None) and (not isinstance(labels, list) or not labels):
            raise ValueError(f"{path}: task {task!r} needs 'labels', a list of label words (or open_ended: true)")
    return data


def prompt_rows(records: Iterable[Mapping[str, Any]], where: str, prompt_key: str = "prompt",
                label_key: str = "label", template: str | None = None,
                labels: Sequence[str] | None = None) -> list[tuple[str, int | None]]:
    """``(prompt, label index or None)`` of each record.

    Args:
        records: mappings (a JSONL line, a CSV row, a Hugging Face dataset row).
        where: file or dataset named in errors.
        template: ``str.format`` template over the record's fields; else the ``prompt_key`` field.
        labels: the task's label words: a label may be one of them instead of an index, and an
            index must be below their count.
    """
    rows = []
    for i, rec in enumerate(records, 1):
        if template is not None:
            try:
                prompt = template.format(**rec)
            except KeyError as exc:
                raise ValueError(f"{where}: record {i} has no field {exc.args[0]!r} that the template "
                                 f"{template!r} uses (fields: {sorted(rec)})") from None
        elif prompt_key in rec:
            prompt = str(rec[prompt_key])
        else:
            raise ValueError(f"{where}: record {i} has no {prompt_key!r} (fields: {sorted(rec)}); "
                             "give the field with prompt_key or a template in the tasks file")
        label = rec.get(label_key)
        rows.append((prompt, None if label in (None, "") else _label_index(label, labels, f"{where}: record {i}")))
    return rows


def _label_index(label: Any, labels: Sequence[str] | None, where: str) -> int:
    if isinstance(label, str) and labels is not None and label in labels:
        return list(labels).index(label)
    try:
        index = int(label)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {label!r} is neither a class index nor one of the label words "
                         f"{list(labels or [])}") from None
    if labels is not None and not 0 <= index < len(labels):
        raise ValueError(f"{where}: label {index} is out of range for {len(labels)} classes {list(labels)}")
    return index


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file (one JSON object per line) or a CSV file (one per row)."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not JSON ({exc.msg})") from None
    return records


def read_rows(path: Path, prompt_key: str = "prompt", label_key: str = "label",
              template: str | None = None, labels: Sequence[str] | None = None) -> list[tuple[str, int | None]]:
    """``(prompt, label or None)`` per line of a JSONL file or row of a CSV file."""
    return prompt_rows(read_records(path), str(path), prompt_key, label_key, template, labels)


class PromptDataset(Dataset):
    """Tokenised prompts: item ``i`` is ``(tensor [2, L] (ids, mask), label)``, or the tensor
    alone for unlabeled prompts. ``max_length=None`` pads to the longest prompt."""

    def __init__(self, rows: list[tuple[str, int | None]], tokenizer: Any, max_length: int | None) -> None:
        prepare_tokenizer(tokenizer)
        if not rows:
            raise ValueError("no prompts")
        enc = tokenizer([p for p, _ in rows], return_tensors="pt",
                        **({"padding": "longest"} if max_length is None else
                           {"padding": "max_length", "truncation": True, "max_length": max_length}))
        self.data = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)
        self.labels = [y for _, y in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        y = self.labels[i]
        return self.data[i] if y is None else (self.data[i], y)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding and truncation (the answer position is the last one, a long prompt keeps its
    end) and a pad token (the EOS token when the tokenizer has none, as for GPT-2)."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError("text data need transformers: pip install 'adamerge[llm]'") from exc
    if offline.is_local_path(name):
        return prepare_tokenizer(AutoTokenizer.from_pretrained(name))
    with offline.download_or_cache(
            f"tokenizer {name!r} (a Hugging Face hub id)",
            "give a local folder instead (`tokenizer: DIR`, the base model's folder, fetched once "
            f"where there is a network with `hf download {name} --local-dir DIR`)"):
        return prepare_tokenizer(AutoTokenizer.from_pretrained(name))


def _packaged_builders() -> set[str]:
    """``datasets``' builders that read local files (``csv``, ``json``, ``parquet``, ...)."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return {"csv", "json", "parquet", "text", "arrow", "imagefolder", "audiofolder"}
    return set(_PACKAGED_DATASETS_MODULES)


class _TextSourceBase(DatasetSource):
    """Shared by the text sources: the tokenizer (loaded on first use), the tasks file, the
    common padded length."""

    def __init__(self, tokenizer: str, tasks_file: str | None, max_length: int | None | str) -> None:
        self.tokenizer_name = str(tokenizer)
        if offline.is_local_path(self.tokenizer_name) and not Path(self.tokenizer_name).expanduser().exists():
            raise FileNotFoundError(f"{self.tokenizer_name}: tokenizer folder does not exist")
        self.tasks_file = tasks_file
        self.specs: dict[str, dict] = load_tasks_file(tasks_file, need_labels=False) if tasks_file else {}
        if not (max_length is None or max_length == "longest" or (isinstance(max_length, int) and max_length > 0)):
            raise ValueError(f"max_length must be a positive number of tokens, 'longest' or null, got {max_length!r}")
        self.max_length = max_length
        self._tokenizer = None
        self._longest: int | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def task_spec(self, task: str) -> dict:
        return self.specs.get(task, {})

    @abstractmethod
    def rows(self, task: str, split: str) -> list[tuple[str, int | None]]:
        """The ``(prompt, label)`` rows of one task's split."""

    def longest_prompt(self, splits: Sequence[str] = ("train", "val", "test")) -> int:
        """Tokens in the longest prompt of every task's splits (those that exist)."""
        longest = 0
        for task in self.task_names():
            for split in splits:
                try:
                    rows = self.rows(task, split)
                except (FileNotFoundError, KeyError):
                    continue
                ids = self.tokenizer([p for p, _ in rows], add_special_tokens=True)["input_ids"]
                longest = max([longest, *(len(i) for i in ids)])
        return longest

    def padded_length(self) -> int | None:
        """``max_length``; ``"longest"``: the longest prompt of all tasks and splits (one padded
        length, so the tasks of a step share one forward); ``None``: per dataset."""
        if self.max_length == "longest":
            if self._longest is None:
                self._longest = self.longest_prompt()
            return self._longest
        return self.max_length  # type: ignore[return-value]

    def dataset(self, task: str, split: str) -> Dataset:
        if task not in self.task_names():
            raise ValueError(unknown_name("task", task, self.task_names(), where=f" in {self.where()}"))
        return PromptDataset(self.rows(task, split), self.tokenizer, self.padded_length())

    def where(self) -> str:
        return self.tasks_file or "the text source"


class TextSource(_TextSourceBase):
    """Prompt files laid out as ``root/<task>/<split>.jsonl`` (or ``.csv``), one
    ``{"prompt": ..., "label": class index or label word}`` per line (``label`` may be absent:
    unlabeled).

    Args:
        root: folder of the task folders.
        tokenizer: tokenizer folder or hub id (the base model's).
        tasks: the tasks, in order (default: every sub-folder of ``root``).
        max_length: padded prompt length in tokens; ``longest``: the longest prompt of all the
            files; ``null``: the longest of each file.
        prompt_key, label_key: field names in the files.
        tasks_file: the pool's tasks file; a task's ``template`` there builds its prompts from
            the record's fields and its ``labels`` let labels be given as label words.
    """

    def __init__(self, root: str, tokenizer: str, tasks: list[str] | None = None,
                 max_length: int | str | None = 64, prompt_key: str = "prompt", label_key: str = "label",
                 tasks_file: str | None = None) -> None:
        super().__init__(tokenizer, tasks_file, max_length)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: TextSource root folder does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.tasks = list(tasks or found)
        for t in self.tasks:
            if t not in found:
                raise ValueError(unknown_name("task", t, found, where=f" in {self.root}"))
        self.prompt_key, self.label_key = prompt_key, label_key

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def where(self) -> str:
        return str(self.root)

    def rows(self, task: str, split: str) -> list[tuple[str, int | None]]:
        spec = self.task_spec(task)
        for ext in (".jsonl", ".csv"):
            path = self.root / task / f"{split}{ext}"
            if path.is_file():
                return read_rows(path, self.prompt_key, self.label_key, spec.get("template"), spec.get("labels"))
        raise FileNotFoundError(f"{self.root / task}: no {split}.jsonl or {split}.csv")


class HFTextSource(_TextSourceBase):
    """Prompts from Hugging Face datasets (hub ids for users with a network, or local
    ``save_to_disk`` folders), one dataset per task, described in the tasks file::

        sst2:
          labels: [" negative", " positive"]        # the verbaliser (causal / seq2seq LMs)
          template: "Review: {sentence}\nSentiment:" # or prompt_key: the field holding the prompt
          dataset:
            path: glue                               # load_dataset(path, name), or a save_to_disk folder
            name: sst2
            splits: {test: validation, val: "train[:500]"}   # our split -> the dataset's split
            label_key: label                         # default "label"; index or label word

    Our splits not listed in ``splits`` are looked up under their own name.

    Args:
        tasks_file: the pool's tasks file (JSON or YAML), each task with a ``dataset`` entry.
        tokenizer: tokenizer folder or hub id (the base model's).
        tasks: the tasks, in order (default: every task of the file with a ``dataset``).
        max_length: as for :class:`TextSource`.
    """

    def __init__(self, tasks_file: str, tokenizer: str, tasks: list[str] | None = None,
                 max_length: int | str | None = 128) -> None:
        super().__init__(tokenizer, tasks_file, max_length)
        with_data = [t for t, s in self.specs.items() if isinstance(s.get("dataset"), dict)]
        self.tasks = list(tasks or with_data)
        for t in self.tasks:
            if t not in with_data:
                raise ValueError(unknown_name("task", t, with_data, where=f" with a 'dataset' entry in {tasks_file}"))
            if "path" not in self.specs[t]["dataset"]:
                raise ValueError(f"{tasks_file}: task {t!r}: dataset needs 'path' (a hub id or a save_to_disk folder)")
            path = str(self.specs[t]["dataset"]["path"])
            if offline.is_local_path(path) and not Path(path).expanduser().exists():
                raise FileNotFoundError(f"{path}: dataset folder of task {t!r} ({tasks_file}) does not exist")

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def hf_dataset(self, task: str, split: str):
        """The Hugging Face dataset of one task's split."""
        try:
            import datasets
        except ImportError as exc:
            raise ImportError("Hugging Face text datasets need the datasets package: pip install datasets") from exc
        d = self.specs[task]["dataset"]
        theirs = (d.get("splits") or {}).get(split, split)
        local = Path(str(d["path"])).expanduser()
        if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if theirs not in ds:
                    raise KeyError(f"{local}: no split {theirs!r} (it has {list(ds)}) for task {task!r} split {split!r}")
                ds = ds[theirs]
            return ds
        kwargs = {k: d[k] for k in ("name", "data_files", "revision") if d.get(k) is not None}
        path = str(d["path"])
        hub = not (offline.is_local_path(path) or path in _packaged_builders())
        what = f"task {task!r}: the Hugging Face dataset {path!r}, split {theirs!r},"
        hint = ("give a local copy instead (`dataset: {path: DIR}` of the task in the tasks file): a "
                "save_to_disk folder, made once where there is a network with "
                f"`datasets.load_dataset({path!r}).save_to_disk(DIR)`")
        try:
            with offline.download_or_cache(what, hint, datasets=True) if hub else nullcontext():
                return datasets.load_dataset(path, split=theirs, **kwargs)
        except ValueError as exc:  # an unknown split
            raise KeyError(f"dataset {d['path']!r} (task {task!r}): {str(exc).splitlines()[0]}") from None

    def rows(self, task: str, split: str) -> list[tuple[str, int | None]]:
        spec = self.task_spec(task)
        d = spec["dataset"]
        return prompt_rows(self.hf_dataset(task, split), f"{d['path']} ({task} {split})",
                           d.get("prompt_key", spec.get("prompt_key", "prompt")), d.get("label_key", "label"),
                           spec.get("template"), spec.get("labels"))
