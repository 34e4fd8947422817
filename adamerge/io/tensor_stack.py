"""Weights read one tensor at a time, and stacks of task vectors written to and mapped from disk.

* :class:`WeightFolder` reads a Hugging Face model folder (``model.safetensors``, a sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` / its index) one tensor at a time:
  keys, shapes and dtypes come from the headers, and no tensor is read before it is asked for.
  :class:`RenamedReader` shows such a folder under the names a model uses.
* :class:`StackWriter` writes a safetensors file incrementally: the header (every tensor's dtype,
  shape and offsets, known up front) first, then each tensor's bytes as they are produced, with
  plain file writes (the page cache holds them, not this process), atomically (temp file + rename).
* :func:`read_stack` maps such a file: its tensors are views of one private memory map, so pages
  are read from disk only when touched and a process that touches a slice holds only that slice.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Mapping, Protocol, Sequence

import torch

from .checkpoints import CheckpointError, atomic_write

# safetensors' dtype codes (https://huggingface.co/docs/safetensors: the header's "dtype")
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# Weight files of a save_pretrained folder, in the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HEADER_LIMIT = 100_000_000  # safetensors' own cap on a header's length


class TensorReader(Protocol):
    """What streams tensors: names, shapes without reading data, then one tensor at a time."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str) -> torch.Tensor: ...

    def where(self, key: str) -> str: ...


class WeightFolder:
    """The weights of a ``save_pretrained`` folder, read one tensor at a time.

    Each :meth:`read` opens the tensor's file, reads that tensor and closes the file again: a
    handle kept open would keep every page it has read mapped (resident) until it closes.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self.files, shards = _weight_files(self.folder)
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if shards is None:  # one file
            self._specs = _file_specs(self.files[0])
            self._file_of = {k: self.files[0] for k in self._specs}
            return
        self._file_of = shards
        held = {}
        for file in dict.fromkeys(shards.values()):
            specs = _file_specs(file)
            self._specs.update(specs)
            held.update(dict.fromkeys(specs, file))
        absent = [k for k, f in shards.items() if held.get(k) != f]
        if absent:
            raise CheckpointError(f"{self.files[0]}: lists tensor {absent[0]!r} in "
                                  f"{shards[absent[0]].name}, which does not hold it")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._specs[self._known(key)][1]

    def where(self, key: str) -> str:
        """The file holding ``key`` (for messages)."""
        return str(self._file_of[self._known(key)])

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, in its stored dtype; it may be backed by a memory map of its file
        (dropping it unmaps the file), so a caller that keeps it should copy it."""
        file = self._file_of[self._known(key)]
        if file.suffix == ".bin":
            # torch.load(mmap=True) maps the file lazily; the copy lets the map go
            return _load_bin(file)[key].clone()
        from safetensors import safe_open
        try:
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as exc:  # SafetensorError: a file changed or cut short since its header was read
            raise CheckpointError(f"{file}: cannot read tensor {key!r}: {exc}") from exc

    def _known(self, key: str) -> str:
        if key not in self._file_of:
            raise CheckpointError(f"{self.folder}: no tensor {key!r} in {self.files[0].name} "
                                  f"(its {len(self._file_of)} tensors: {_sample(list(self._file_of))})")
        return key


class RenamedReader:
    """A reader under other names: ``names[new] = key in the reader``; ``dtypes[new]``, where
    given, is the dtype a floating-point tensor is read in (as ``from_pretrained(dtype=...)``
    casts a model's tensors on load)."""

    def __init__(self, reader: WeightFolder, names: Mapping[str, str],
                 dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        self.reader, self.names, self.dtypes = reader, dict(names), dict(dtypes or {})

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names and self.names[name] in self.reader

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self._key(name))

    def read(self, name: str) -> torch.Tensor:
        tensor = self.reader.read(self._key(name))
        dtype = self.dtypes.get(name)
        if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        return tensor.to(dtype)

    def where(self, name: str) -> str:
        return f"{self.reader.where(self._key(name))} ({self._key(name)!r})"

    def _key(self, name: str) -> str:
        if name not in self.names:
            raise CheckpointError(f"{self.reader.folder}: no tensor for {name!r} in "
                                  f"{self.reader.files[0].name}")
        return self.names[name]


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a weight file :class:`WeightFolder` reads (a sharded one with every
    shard its index names), without reading any tensor."""
    try:
        _weight_files(Path(folder).expanduser())
    except CheckpointError:
        return False
    return True


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The folder's weight files (first: the one named in messages) and, for a sharded folder,
    the shard of each key its index lists (``None`` for one file)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a save_pretrained folder with model.safetensors "
                              "is expected)")
    found = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder}: no weight file; expected one of {', '.join(WEIGHT_FILES)}")
    if not found.name.endswith(".index.json"):
        return [found], None
    try:
        weight_map = json.loads(found.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{found}: not a shard index (a JSON object with a 'weight_map'): {exc}") from exc
    shards = {name: folder / name for name in dict.fromkeys(weight_map.values())}
    missing = [name for name, path in shards.items() if not path.is_file()]
    if missing:
        key = next(k for k, v in weight_map.items() if v == missing[0])
        raise CheckpointError(f"{found}: shard {missing[0]} (holding {key!r}) not found in {folder}")
    return [found, *shards.values()], {k: shards[v] for k, v in weight_map.items()}


def _file_specs(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of every tensor of one weight file, without reading their data."""
    if file.suffix == ".bin":
        return {k: (t.dtype, tuple(t.shape)) for k, t in _load_bin(file).items()}
    header, _ = read_header(file)
    specs = {}
    for key, info in header.items():
        if info["dtype"] not in CODE_DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {info['dtype']}; "
                                  f"readable: {', '.join(CODE_DTYPES)}")
        specs[key] = (CODE_DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]))
    return specs


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A torch weight file mapped, not read (``mmap=True``), and without running code."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot read weights (torch.load, weights_only, mmap): "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a mapping of names to tensors, got {type(obj).__name__}")
    return dict(obj)


def _sample(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# ------------------------------------------------------------------- safetensors files
def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """A safetensors file's tensor entries (``dtype``, ``shape``, ``data_offsets``) and its
    ``__metadata__``, read without touching the data; offsets are checked against the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: cut short: {8 + n + end} bytes expected, {size} found")
    return header, meta


def _layout(specs: Mapping[str, tuple[torch.dtype, Sequence[int]]]) -> list[str]:
    """The order of the tensors in the file: larger elements first, so every tensor starts at a
    multiple of its element size (a zero-copy view needs it; safetensors allows no gaps)."""
    return sorted(specs, key=lambda k: -specs[k][0].itemsize)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


class StackWriter:
    """Writes a safetensors file tensor by tensor, in :attr:`order`, each in one or more parts
    (``write(name, part)``: e.g. a ``[K, *shape]`` stack as K parts of ``shape``).

    The header goes first (the shapes are known up front); each part's bytes are appended with a
    plain file write, so they go to the page cache, not this process's memory. The file appears
    under ``path`` only when every tensor is complete (temp file + rename).

    Args:
        path: the file to write.
        specs: name -> (dtype, shape) of every tensor.
        metadata: the ``__metadata__`` string map (provenance).
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        bad = {k: v for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"{path}: safetensors metadata is a map of strings; not strings: {_sample(list(bad))}")
        unknown = {k: d for k, (d, _) in specs.items() if d not in DTYPE_CODES}
        if unknown:
            raise ValueError(f"{path}: cannot store dtype {next(iter(unknown.values()))} "
                             f"(tensor {next(iter(unknown))!r}); storable: {', '.join(map(str, DTYPE_CODES))}")
        self.path, self.specs, self.metadata = Path(path), dict(specs), dict(metadata or {})
        self.order = _layout(self.specs)
        self._next = 0  # index in order of the tensor being written
        self._left = 0  # its bytes still to come
        self._stack = ExitStack()
        self._file: BinaryIO | None = None

    def __enter__(self) -> "StackWriter":
        tmp = self._stack.enter_context(atomic_write(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        self._file.write(self._header())
        self._advance()
        return self

    def _header(self) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name in self.order:
            dtype, shape = self.specs[name]
            end = offset + _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned (as safetensors pads it)
        return struct.pack("<Q", len(text)) + text

    def _advance(self) -> None:
        """Skip to the next tensor with bytes still to write (empty tensors have none)."""
        while self._left == 0 and self._next < len(self.order):
            self._left = _nbytes(*self.specs[self.order[self._next]])
            if self._left == 0:
                self._next += 1

    def write(self, name: str, part: torch.Tensor) -> None:
        """Append ``part``'s bytes to tensor ``name`` (which must be the one being written)."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: write inside `with StackWriter(...)`")
        expected = self.order[self._next] if self._next < len(self.order) else None
        dtype = self.specs[name][0] if name in self.specs else None
        if dtype is not None and _nbytes(*self.specs[name]) == 0 and part.numel() == 0:
            return  # an empty tensor has no bytes: nothing to write, whenever it comes
        if name != expected:
            raise ValueError(f"{self.path}: got a part of {name!r}, expected {expected!r} (write in .order)")
        if part.dtype != dtype:
            raise ValueError(f"{self.path}: part of {name!r} has dtype {part.dtype}, expected {dtype}")
        data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise ValueError(f"{self.path}: part of {name!r} of {data.nbytes} bytes, only {self._left} left "
                             f"of its shape {list(self.specs[name][1])}")
        self._file.write(memoryview(data))
        self._left -= data.nbytes
        if self._left == 0:
            self._next += 1
            self._advance()

    def __exit__(self, kind, value, tb) -> None:
        if kind is None and self._next < len(self.order):
            value = ValueError(f"{self.path}: tensor {self.order[self._next]!r} is incomplete "
                               f"({self._left} bytes missing); the file is not written")
            self._stack.__exit__(type(value), value, value.__traceback__)
            raise value
        self._file = None
        self._stack.__exit__(kind, value, tb)


def read_stack(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of one private memory map, and its metadata.

    Nothing is read here: a page comes from disk when a tensor's element on it is first touched
    (so a process that reads one slice of each tensor holds only those slices). The map is
    private (copy-on-write): writing into a tensor never changes the file.
    """
    path = Path(path)
    header, meta = read_header(path)
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    size = path.stat().st_size
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for name, info in header.items():
        dtype = CODE_DTYPES.get(info["dtype"])
        begin, end = (start + int(o) for o in info["data_offsets"])
        shape = [int(s) for s in info["shape"]]
        if dtype is None or end - begin != _nbytes(dtype, shape) or begin % dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']}, shape {shape}) does not fit "
                                  f"its offsets {info['data_offsets']} (or is not aligned to its element size)")
        tensors[name] = whole[begin:end].view(dtype).view(shape)
    return tensors, dict(meta)


__all__ = ["RenamedReader", "StackWriter", "TensorReader", "WeightFolder", "has_weights", "read_header",
           "read_stack"]
