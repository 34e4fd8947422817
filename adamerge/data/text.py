"""Text tasks for language-model pools: prompts from local JSONL/CSV files, tokenised once.

Each example is a prompt that ends where the answer token comes next, and a label index into
the task's label words (the verbaliser of :class:`adamerge.models.hf.VerbaliserHead`). Items are
``(tensor [2, L], label)``: token ids and attention mask, left-padded to ``max_length`` (the
prompt's end is kept when it is longer), the layout :class:`adamerge.models.hf.LastTokenLM`
reads; so the adaptation stream, evaluation and every method work on text unchanged.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import unknown_name
from .datamodule import DatasetSource


def read_rows(path: Path, prompt_key: str = "prompt", label_key: str = "label") -> list[tuple[str, int | None]]:
    """``(prompt, label or None)`` per line of a JSONL file or row of a CSV file."""
    rows = []
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    else:
        records = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not JSON ({exc.msg})") from None
    for i, rec in enumerate(records, 1):
        if prompt_key not in rec:
            raise ValueError(f"{path}: record {i} has no {prompt_key!r} (keys: {sorted(rec)})")
        label = rec.get(label_key)
        rows.append((str(rec[prompt_key]), None if label in (None, "") else int(label)))
    return rows


class PromptDataset(Dataset):
    """Tokenised prompts: item ``i`` is ``(tensor [2, L] (ids, mask), label)``, or the tensor
    alone for unlabeled prompts."""

    def __init__(self, rows: list[tuple[str, int | None]], tokenizer: Any, max_length: int) -> None:
        tokenizer.padding_side = "left"        # the answer position is the last one
        tokenizer.truncation_side = "left"     # a long prompt keeps its end
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer([p for p, _ in rows], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        self.data = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)
        self.labels = [y for _, y in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        y = self.labels[i]
        return self.data[i] if y is None else (self.data[i], y)


class TextSource(DatasetSource):
    """Prompt files laid out as ``root/<task>/<split>.jsonl`` (or ``.csv``), one
    ``{"prompt": ..., "label": class index}`` per line (``label`` may be absent: unlabeled).

    Args:
        root: folder of the task folders.
        tokenizer: tokenizer folder or hub id (the base model's).
        tasks: the tasks, in order (default: every sub-folder of ``root``).
        max_length: padded prompt length in tokens.
        prompt_key, label_key: field names in the files.
    """

    def __init__(self, root: str, tokenizer: str, tasks: list[str] | None = None, max_length: int = 64,
                 prompt_key: str = "prompt", label_key: str = "label") -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: TextSource root folder does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.tasks = list(tasks or found)
        for t in self.tasks:
            if t not in found:
                raise ValueError(unknown_name("task", t, found, where=f" in {self.root}"))
        self.tokenizer_name, self.max_length = str(tokenizer), max_length
        self.prompt_key, self.label_key = prompt_key, label_key
        self._tokenizer = None

    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:
                raise ImportError("text data need transformers: pip install 'adamerge[llm]'") from exc
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    def dataset(self, task: str, split: str) -> Dataset:
        if task not in self.tasks:
            raise ValueError(unknown_name("task", task, self.tasks, where=f" in {self.root}"))
        for ext in (".jsonl", ".csv"):
            path = self.root / task / f"{split}{ext}"
            if path.is_file():
                rows = read_rows(path, self.prompt_key, self.label_key)
                return PromptDataset(rows, self.tokenizer, self.max_length)
        raise FileNotFoundError(f"{self.root / task}: no {split}.jsonl or {split}.csv")
