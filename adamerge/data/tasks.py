"""The task registry: where each benchmark task's images come from and how its zero-shot head is built.

The registry is data (``adamerge/tasks.yaml``); users add or override tasks with their own YAML
file of the same structure (``tasks_file``), without code changes. :func:`load_registry` merges
the two, :func:`get_task` looks a task up by name or alias and suggests the nearest names when
it does not exist.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

BUILTIN_TASKS = Path(__file__).with_name("tasks.yaml")
_FIELDS = ("hf_path", "hf_name", "splits", "image_column", "label_column", "classnames",
           "templates", "aliases", "path")


@dataclass(frozen=True)
class TaskSpec:
    """One classification task.

    Attributes:
        name: registry name (e.g. ``sun397``).
        classnames: class names in label order.
        templates: prompt templates containing ``{c}``.
        hf_path: Hugging Face dataset id (``datasets.load_dataset(hf_path, hf_name)``).
        hf_name: dataset config name, if any.
        splits: adamerge split name (``train``/``test``/...) -> the dataset's split name.
        image_column: column holding the images.
        label_column: column holding the class indices.
        aliases: other accepted spellings of the name.
        path: a local ``save_to_disk`` folder or image folder used instead of ``hf_path``.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    hf_path: str | None = None
    hf_name: str | None = None
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    image_column: str = "image"
    label_column: str = "label"
    aliases: tuple[str, ...] = ()
    path: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, split: str) -> str:
        """The dataset's name for adamerge split ``split`` (unmapped names pass through)."""
        return self.splits.get(split, split)

    def prompts(self, classname: str) -> list[str]:
        """The prompts of one class."""
        return [t.format(c=classname) for t in self.templates]


def _spec(name: str, entry: Mapping[str, Any], source: str) -> TaskSpec:
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{source}: task {name!r} has unknown keys {unknown}; known keys are "
                         f"{list(_FIELDS)}")
    for key in ("classnames", "templates"):
        value = entry.get(key)
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{source}: task {name!r} needs a non-empty list '{key}', got {value!r}")
    bad = [t for t in entry["templates"] if "{c}" not in str(t)]
    if bad:
        raise ValueError(f"{source}: task {name!r}: templates must contain '{{c}}' where the class "
                         f"name goes; these do not: {bad[:3]}")
    if not entry.get("hf_path") and not entry.get("path"):
        raise ValueError(f"{source}: task {name!r} needs 'hf_path' (a Hugging Face dataset id) or "
                         "'path' (a local dataset folder)")
    return TaskSpec(name=name, classnames=tuple(str(c) for c in entry["classnames"]),
                    templates=tuple(str(t) for t in entry["templates"]),
                    hf_path=entry.get("hf_path"), hf_name=entry.get("hf_name"),
                    splits=dict(entry.get("splits") or {"train": "train", "test": "test"}),
                    image_column=entry.get("image_column", "image"),
                    label_column=entry.get("label_column", "label"),
                    aliases=tuple(entry.get("aliases") or ()), path=entry.get("path"))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tasks file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
        raise ValueError(f"{path}: expected a mapping with a 'tasks' mapping of task name -> entry")
    return data


def load_registry(tasks_file: str | Path | None = None) -> dict[str, TaskSpec]:
    """Built-in tasks, with the entries of ``tasks_file`` merged over them key by key.

    A relative ``path`` in ``tasks_file`` is relative to that file.
    """
    raw = {k: dict(v) for k, v in _read(BUILTIN_TASKS)["tasks"].items()}
    sources = {k: str(BUILTIN_TASKS) for k in raw}
    if tasks_file is not None:
        user_file = Path(tasks_file).expanduser()
        for name, entry in _read(user_file)["tasks"].items():
            if not isinstance(entry, dict):
                raise ValueError(f"{user_file}: task {name!r} must be a mapping, got {entry!r}")
            entry = dict(entry)
            if entry.get("path") and not Path(entry["path"]).expanduser().is_absolute():
                entry["path"] = str(user_file.parent / entry["path"])
            raw[name] = {**raw.get(name, {}), **entry}
            sources[name] = str(user_file)
    return {name: _spec(name, entry, sources[name]) for name, entry in raw.items()}


def suites() -> dict[str, list[str]]:
    """Named task lists of the built-in registry (``tall8``, ``tall14``, ``tall20``)."""
    return {k: list(v) for k, v in _read(BUILTIN_TASKS).get("suites", {}).items()}


def get_task(name: str, registry: Mapping[str, TaskSpec] | None = None,
             tasks_file: str | Path | None = None) -> TaskSpec:
    """Look a task up by name or alias; an unknown name raises ``KeyError`` naming the closest ones."""
    registry = load_registry(tasks_file) if registry is None else registry
    if name in registry:
        return registry[name]
    for spec in registry.values():
        if name in spec.aliases or name.lower() in (a.lower() for a in spec.aliases):
            return spec
    known = sorted(set(registry) | {a for s in registry.values() for a in s.aliases})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown task {name!r}{hint} (known tasks: {', '.join(sorted(registry))}; "
                   "add your own with a tasks_file)")


def resolve_tasks(names: list[str] | str, registry: Mapping[str, TaskSpec]) -> list[TaskSpec]:
    """Task specs of ``names``; a single string may name a suite (``tall8``/``tall14``/``tall20``)."""
    if isinstance(names, str):
        all_suites = suites()
        if names not in all_suites:
            raise KeyError(f"unknown task suite {names!r}; suites: {sorted(all_suites)}")
        names = all_suites[names]
    specs = [get_task(n, registry) for n in names]
    dup = sorted({s.name for s in specs if sum(t.name == s.name for t in specs) > 1})
    if dup:
        raise ValueError(f"tasks {dup} are listed more than once")
    return specs
