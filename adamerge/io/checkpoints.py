"""Reading and writing weight files safely.

Only formats that cannot run code are read by default: safetensors, and torch files through
``torch.load(weights_only=True)``. Everything adamerge writes goes through :func:`atomic_write`,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not fit the others."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the destination folder (a rename within one file system is
    atomic), is flushed to disk before the rename when ``fsync`` is set, and is removed if the
    body raises. A reader therefore sees the old file or the complete new one, never a prefix;
    a process killed mid-write leaves at most a stray ``.NAME.*.tmp`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp makes 0o600
        os.chmod(tmp, mode)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data to disk (best effort where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON to ``path`` atomically (temp file + rename).

    Only JSON types are accepted (``allow_nan`` is off: NaN/inf have no JSON spelling and would
    make the file unreadable for strict parsers); the error names the offending value.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot write as JSON: {exc}") from exc
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as safetensors atomically (tensors are made contiguous, shared ones copied)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _unwrap(obj: object, path: Path) -> StateDict:
    """Accept a plain state dict or the common ``{"state_dict": ...}`` wrapper."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors, "
                              f"got {type(obj).__name__}")
    return dict(obj)


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> StateDict:
    """Load a state dict from a ``.safetensors`` file or a torch file.

    Torch files are read with ``weights_only=True`` unless ``allow_pickle`` is set; pickles can run
    arbitrary code, so that switch must come from the user.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt, truncated, or a pickle refused by weights_only
        hint = ""
        if not allow_pickle and "weights_only" in str(exc):
            hint = (" (it contains pickled objects; if you trust it, pass allow_pickle / "
                    "--allow-pickle, or convert it once with `adamerge convert`)")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint: {first}{hint}") from exc
    return _unwrap(obj, path)


def check_compatible(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                     other_name: str, base_name: str = "base") -> None:
    """Raise :class:`CheckpointError` naming every key, shape or dtype that differs."""
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if extra:
        problems.append(f"unexpected keys {_few(extra)}")
    for key in sorted(set(base) & set(other)):
        a, b = base[key], other[key]
        if a.shape != b.shape:
            problems.append(f"{key}: shape {tuple(b.shape)}, expected {tuple(a.shape)} as in {base_name}")
        elif a.dtype != b.dtype:
            problems.append(f"{key}: dtype {b.dtype}, expected {a.dtype} as in {base_name}")
    if problems:
        raise CheckpointError(f"{other_name} does not match {base_name}: " + "; ".join(problems[:5])
                              + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint (``.ckpt``) without unpickling code (``weights_only=True``).

    adamerge checkpoints hold only tensors and plain Python data, so a file that needs more is
    either corrupt or not ours; both raise :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage, or pickled objects refused by weights_only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (it holds pickled objects, which adamerge never loads from a checkpoint)" \
            if "weights_only" in str(exc) else ""
        raise CheckpointError(f"{path}: cannot read checkpoint: {first}{hint}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (holds a {type(obj).__name__})")
    return obj
