"""Reading and writing weight files safely.

Only formats that cannot run code are read by default: safetensors, and torch files through
``torch.load(weights_only=True)``. Everything adamerge writes goes through :func:`atomic_write`,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not fit the others."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
