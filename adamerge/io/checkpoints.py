"""Reading and writing weight files safely.

Only formats that cannot run code are read by default: safetensors, and torch files through
``torch.load(weights_only=True)``. Everything adamerge writes goes through :func:`atomic_write`,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

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
    arbitrary code, so that switch must come from the user. An empty, truncated or garbage file
    and a file holding pickled objects raise different one-line :class:`CheckpointError`\\ s.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        _check_not_empty(path)
        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError: bad header length, JSON, offsets, short data
            raise CheckpointError(f"{path}: cannot read checkpoint: truncated or corrupt file "
                                  f"(safetensors: {_safetensors_cut(path) or _first_sentence(exc)}"
                                  f"{_format_hint(path)})") from exc
    obj = _torch_load(path, weights_only=not allow_pickle,
                      pickle_hint="if you trust it, pass allow_pickle / --allow-pickle, or convert it "
                                  "once with `adamerge convert`")
    return _unwrap(obj, path)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format too)


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: cannot read checkpoint: truncated or corrupt file (empty, 0 bytes)")


def _torch_load(path: Path, weights_only: bool, pickle_hint: str) -> Any:
    """``torch.load`` on CPU; a failure becomes one line telling corrupt files from pickles.

    Only a file whose pickle is intact but imports something ``weights_only`` refuses (a class, a
    function) is reported as holding pickled objects; an empty, truncated or garbage file is
    reported as truncated or corrupt, with the reader's first sentence.
    """
    _check_not_empty(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        refused = _refused_globals(exc, path) if weights_only else None
        if refused:
            raise CheckpointError(f"{path}: cannot read checkpoint: it holds pickled objects "
                                  f"({', '.join(refused[:3])}); {pickle_hint}") from exc
        raise CheckpointError(f"{path}: cannot read checkpoint: truncated or corrupt file "
                              f"({_format_of(path, _first_sentence(exc))})") from exc


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _format_of(path: Path, reason: str) -> str:
    """``reason`` prefixed with the format the file's first bytes announce."""
    head = _head(path)
    if head.startswith(ZIP_MAGIC):
        if _zip_cut_short(path):
            return "torch zip archive cut short: no end-of-archive record"
        return "torch zip archive: " + re.sub(r"^PytorchStreamReader failed (reading zip archive: )?", "", reason)
    if head[:1] == bytes([PICKLE_PROTO]):
        return f"pickle stream: {reason}"
    return f"not a torch file, starts with {head!r}; {reason}"


def _zip_cut_short(path: Path) -> bool:
    """Whether a zip file lacks a complete end-of-central-directory record (22 bytes and a comment
    of at most 64 KiB, written last; zip64 archives end with one too)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (65535 + 22)))
        tail = f.read()
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        return True
    return i + 22 + int.from_bytes(tail[i + 20:i + 22], "little") > len(tail)


def _safetensors_cut(path: Path) -> str | None:
    """How a safetensors file is shorter than its header says, if it is."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100_000_000:  # not a header length: garbage
                return None
            if size < 8 + n:
                return f"cut short: the header is {n} bytes, the file {size}"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    if size < 8 + n + end:
        return f"cut short: {8 + n + end} bytes expected, {size} found"
    return None


def _format_hint(path: Path) -> str:
    """For a file named ``.safetensors`` that is really a torch file."""
    head = _head(path)
    if head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO]):
        return "; the file looks like a torch file: name it .pt"
    return ""


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an error's first line (torch's reader errors run on for lines)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    inner = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # the reason, not the advice
    if inner:
        text = inner.group(1)
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    line = re.split(r"(?<=[\w)])\. ", line, maxsplit=1)[0].rstrip(".")
    if isinstance(exc, (EOFError, KeyError)) or not line:  # "Ran out of input", "101": say what it is
        return f"{type(exc).__name__}{': ' + line if line else ''}"
    return line


def _refused_globals(exc: BaseException, path: Path) -> list[str] | None:
    """What ``weights_only`` refused to import, if the file is an intact pickle that imports objects.

    Torch's weights-only unpickler names the global it refuses; a plain pickle (protocol 4+, no
    torch header) fails there earlier ("Unsupported operand"), so its opcodes are scanned
    (``pickletools``, nothing is executed) for imports. ``None`` for a corrupt file.
    """
    found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return found
    if re.search(r"Unsupported class|unsupported class|unrecognized function|Can only build", str(exc)):
        return [_first_sentence(exc)]
    if _head(path, 1) != bytes([PICKLE_PROTO]):
        return None
    import pickletools
    strings: list[str] = []
    imports: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    imports.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    imports.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
                    return imports or None
    except Exception:  # not a pickle, or a truncated one
        return None
    return None


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


def capped(items: Iterable[Any], n: int = 3) -> str:
    """``[a, b, c, +2 more]``: the first ``n`` items of a list for a one-line message."""
    items = [str(i) for i in items]
    more = [f"+{len(items) - n} more"] if len(items) > n else []
    return "[" + ", ".join(items[:n] + more) + "]"


def check_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str,
               target: str) -> None:
    """Raise one line naming the first missing and unexpected keys and shape mismatches of a file's
    ``state`` against the state dict a model ``expected`` (``target``: the model's class name)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"missing keys {capped(missing)}"] if missing else []) \
        + ([f"unexpected keys {capped(unexpected)}"] if unexpected else []) \
        + ([f"shape mismatch {'; '.join(shapes[:3])}" + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else "")]
           if shapes else [])
    if problems:
        raise CheckpointError(f"{source} does not fit {target}: " + "; ".join(problems))


def check_finite(state: Mapping[str, torch.Tensor], source: str, names: Iterable[str] | None = None) -> None:
    """Raise one line naming ``source`` and the first tensor holding NaN or inf.

    Only floating-point (and complex) tensors among ``names`` (default: all of ``state``) are
    checked, one ``torch.isfinite(t).all()`` each; buffers such as attention masks may hold
    ``-inf`` on purpose, so callers pass the parameter names.
    """
    bad = []
    for name in (state if names is None else names):
        t = state.get(name)
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) \
                and not bool(torch.isfinite(t).all()):
            bad.append(name)
    if bad:
        t = state[bad[0]]
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        others = f" (and {len(bad) - 1} more tensor(s): {capped(bad[1:])})" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: {bad[0]!r} holds non-finite values ({nan} NaN, {inf} inf of "
                              f"{t.numel()}){others}; the file is damaged or its training diverged")


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"


def not_a_run_checkpoint(obj: Any) -> str | None:
    """What a loaded file is when it is not an adamerge run checkpoint (``None`` when it is one):
    an ``adamerge online`` state, weights (a state dict), a Lightning checkpoint of another
    program, or something else."""
    if not isinstance(obj, dict):
        return f"not a checkpoint (holds a {type(obj).__name__})"
    if "pytorch-lightning_version" in obj and isinstance(obj.get("adamerge"), dict):
        return None
    if {"learned", "optimizer", "step", "rows"} <= set(obj):
        return "an `adamerge online` state (state.pt), not a run checkpoint; continue the stream with the same `adamerge online` command"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"weights (a state dict of {len(obj)} tensors, e.g. an expert), not a run checkpoint"
    if "pytorch-lightning_version" in obj:
        return "a Lightning checkpoint of another program (it has no adamerge section)"
    return f"not an adamerge run checkpoint (its keys: {sorted(map(str, obj))[:4]})"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint (``.ckpt``) without unpickling code (``weights_only=True``).

    adamerge checkpoints hold only tensors and plain Python data, so a file that needs more is
    either corrupt or not ours; both raise :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        hint = " (an `adamerge export` folder: use it with `adamerge predict --export`)" \
            if (path / "export.json").is_file() else ""
        raise CheckpointError(f"{path}: a folder{hint}, not a checkpoint file (e.g. RUN/checkpoints/last.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj = _torch_load(path, weights_only=True,
                      pickle_hint="adamerge never loads pickled objects from a checkpoint")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (holds a {type(obj).__name__})")
    return obj
